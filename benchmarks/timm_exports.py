"""The main job on timm architectures: exports that are not torchvision's.

Users' models come from timm as often as from torchvision, with blocks torchvision does
not have (GhostNet's ghost modules, MixNet's mixed kernels, MobileViT's unfold,
EfficientFormer's and LeViT's attention, RepVGG/MobileOne branches, HRNet's fusions,
DLA's trees, Res2Net's splits).  For each architecture this exports it with seeded random
weights (no network: timm's pretrained weights are not fetched) with a dynamic batch ``N``
through the TorchScript exporter, as deployment pipelines write them, or with
``--exporter dynamo`` through torch's default one (``dynamic_shapes``, opset 18, weights in
``<model>.onnx.data``), cached in ``$ARCHPASS_BENCH_CACHE`` (default
``~/.cache/archpass-bench/dynamo``), and runs the CLI in
subprocesses as :mod:`real_exports` does (``inspect``, ``optimize`` per mode, the emitted
model through the checker and onnxruntime, ``apply`` of its recipe, ``inspect`` of it),
with ``--input-shape`` pinning the batch; it also records whether the emitted model kept
the dynamic batch.

Prints one line per model and writes ``benchmarks/results/timm_exports.json`` (with
``--exporter dynamo``: ``timm_exports_dynamo.json``; with other ``--modes``, their names
appended: ``timm_exports_dynamo_ptq.json``).  Needs the
``bench`` extra (torch, timm).  Wall times are of the whole command, for scale only.

    python benchmarks/timm_exports.py [--models a,b] [--modes edgetpu,cpu,ptq] [--trials 8]
                                      [--exporter torchscript|dynamo]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _common import write_results
from real_exports import CACHE, bench_args, failures, run_model

MODELS = ("mixnet_s", "ghostnet_100", "lcnet_050", "efficientnet_lite0", "tinynet_a", "rexnet_100", "mobilevit_xs",
          "fastvit_t8", "efficientformer_l1", "repvgg_a0", "mobileone_s0", "hardcorenas_a", "mobilenetv4_conv_small",
          "edgenext_x_small", "levit_128s", "convnextv2_atto", "resnet50d", "hrnet_w18_small", "cspdarknet53", "dla34",
          "vovnet39a", "tf_efficientnet_lite0", "mobilenetv3_large_100", "semnasnet_050", "fbnetc_100", "dpn68",
          "selecsls42b", "res2net50_14w_8s", "gernet_s", "regnetx_002")


def export(name: str, exporter: str = "torchscript") -> tuple[Path, int]:
    """The cached export of timm's ``name`` with a dynamic batch, and its input size."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False)
    hw = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[1])
    tag = "" if exporter == "torchscript" else f"{exporter}-"  # the TorchScript cache predates the option
    path = CACHE / f"timm-{name}-{tag}torch{torch.__version__}-timm{timm.__version__}.onnx".replace("+", "_")
    if path.exists():
        return path, hw
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp_path = Path(tmp) / path.name
        if exporter == "dynamo":  # a batch of 2: torch.export specializes a dim traced at size 1
            torch.onnx.export(model, (torch.randn(2, 3, hw, hw),), str(tmp_path), input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},))
        else:
            torch.onnx.export(model, (torch.randn(1, 3, hw, hw),), str(tmp_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        for f in Path(tmp).iterdir():  # the model and its <name>.data, moved together
            os.replace(f, CACHE / f.name)
    return path, hw


def main() -> None:
    names, modes, trials, exporter = bench_args(__doc__, MODELS, "edgetpu", 8, ("torchscript", "dynamo"))
    rows, unexported = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                src, hw = export(name, exporter)
            except Exception as exc:  # noqa: BLE001 - torch could not export it: not archpass's to run
                unexported[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                print(f"{name:24s} not exported: {unexported[name]}", flush=True)
                continue
            row = run_model(name, modes, trials, Path(tmp), src=src, extra=("--input-shape", f"input:1,3,{hw},{hw}"))
            rows.append(row)
            parts = [f"{k}={v['exit']}" + (f" ({v['s']}s)" if "s" in v else "")
                     + (f" {v['latency_ms'][0]}->{v['latency_ms'][1]} ms" if "latency_ms" in v else "")
                     + (" dynamic-batch" if v.get("dynamic_batch") else "")
                     for k, v in row.items() if isinstance(v, dict)]
            print(f"{name:24s} {row['inspect'].get('gmacs', '-')} GMACs  " + "  ".join(parts), flush=True)
    failed = failures(rows)
    improved = {m: sum(1 for r in rows if isinstance(r.get(m), dict) and r[m].get("improved")) for m in modes}
    label = ("torch.onnx.export TorchScript, opset 17, dynamic batch" if exporter == "torchscript"
             else "torch.onnx.export default (dynamo), dynamic_shapes batch")
    # one file per exporter and, beyond the default edgetpu, per set of modes
    path = write_results("timm_exports" + ("" if exporter == "torchscript" else f"_{exporter}")
                         + ("" if modes == ["edgetpu"] else "_" + "_".join(modes)),
                         {"exporter": label, "weights": "timm random init, torch.manual_seed(0)", "trials": trials,
                          "modes": modes, "models": rows, "failed": failed, "improved": improved,
                          "not_exported": unexported})
    print(f"{len(rows) - len(failed)}/{len(rows)} models through every command with a dynamic batch kept; "
          f"improved: {improved}; not exported by torch: {len(unexported)}; wrote {path}")


if __name__ == "__main__":
    main()
