"""Loading real exports: onnxslim's shape inference with and without the weights.

Canonicalization runs onnxslim, which infers shapes after each of its (up to ten) rounds
and serializes the whole model several times a round to do it.  archpass hands that
inference the model with its float weights as typed graph inputs
(``archpass.model._weights_as_inputs_for_shape_inference``).  For each torchvision
architecture this times ``load_model`` both ways, side by side in interleaved windows
(A B A B ..., each window ``--repeats`` loads; median of the windows' medians), checks the
two canonical models are identical (nodes, initializers, value_info, outputs) and prints
the ratio.  Models come from torch's default (dynamo) exporter as ``real_exports.py``
makes them, and from the TorchScript exporter with a dynamic batch (pinned to 1 here), as
older pipelines still write them.

Writes ``benchmarks/results/load_speed.json``.  Needs the ``bench`` extra (torch,
torchvision, onnxscript).  Run it alone on the machine (``benchmarks/quiet.sh``).

    python benchmarks/load_speed.py [--models vit_b_16,swin_t] [--windows 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import time

from _common import write_results

DEFAULT = ["vit_b_16", "swin_t", "convnext_tiny", "efficientnet_v2_s", "resnext50_32x4d", "mobilenet_v2"]


def fingerprint(proto) -> str:
    h = hashlib.sha256()
    for n in proto.graph.node:
        h.update(n.SerializeToString())
    for group in (proto.graph.initializer, proto.graph.value_info):
        for t in sorted(group, key=lambda t: t.name):
            h.update(t.SerializeToString())
    for v in proto.graph.output:
        h.update(v.SerializeToString())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--windows", type=int, default=3, help="windows per variant, interleaved")
    ap.add_argument("--repeats", type=int, default=1, help="loads per window")
    args = ap.parse_args(argv)

    import onnx

    import archpass.model as am
    from real_exports import export

    light_ctx = am._weights_as_inputs_for_shape_inference
    rows, failed = [], []
    for name in [m for m in args.models.split(",") if m]:
        for exporter in ("dynamo", "torchscript"):
            try:
                src = export(name, exporter)
            except Exception as exc:  # noqa: BLE001 - an export torch cannot make is reported, not fatal
                failed.append({"model": name, "exporter": exporter, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{name:18s} {exporter:11s} export failed: {type(exc).__name__}", flush=True)
                continue
            head = onnx.load(str(src), load_external_data=False)
            shapes = {i.name: tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim) for i in head.graph.input
                      if any(d.dim_param or not d.dim_value for d in i.type.tensor_type.shape.dim)} or None
            times: dict[str, list[float]] = {"light": [], "plain": []}
            prints: dict[str, str] = {}
            for _ in range(args.windows):
                for variant in ("plain", "light"):
                    am._weights_as_inputs_for_shape_inference = light_ctx if variant == "light" else contextlib.nullcontext
                    window = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        model = am.load_model(src, shapes)
                        window.append(time.perf_counter() - t)
                    prints[variant] = fingerprint(model.proto)
                    times[variant].append(statistics.median(window))
                    del model
            am._weights_as_inputs_for_shape_inference = light_ctx
            plain, light = statistics.median(times["plain"]), statistics.median(times["light"])
            files = [src] + [f for f in src.parent.glob(src.name + ".data")]
            row = {"model": name, "exporter": exporter, "file_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
                   "plain_s": round(plain, 2), "light_s": round(light, 2), "speedup": round(plain / light, 2),
                   "windows_plain_s": [round(x, 2) for x in times["plain"]],
                   "windows_light_s": [round(x, 2) for x in times["light"]],
                   "identical": prints["plain"] == prints["light"]}
            rows.append(row)
            print(f"{name:18s} {exporter:11s} plain {plain:6.2f} s  light {light:6.2f} s  x{plain / light:4.2f}  "
                  f"identical {row['identical']}", flush=True)
    path = write_results("load_speed", {"windows": args.windows, "repeats": args.repeats, "models": rows,
                                        "failed": failed})
    print(f"wrote {path}")
    return 0 if rows and all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
