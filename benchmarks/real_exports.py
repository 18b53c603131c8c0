"""The main job on real exports as users make them today: torch's default exporter.

torch 2.14's ``torch.onnx.export`` uses the dynamo exporter by default (opset 18+, weights
in ``<model>.onnx.data`` beside the model, batch sizes spelled in Reshape shapes), not the
TorchScript one the test skeletons come from.  For each torchvision architecture this
exports it that way (seeded random weights, cached in ``$ARCHPASS_BENCH_CACHE``, default
``~/.cache/archpass-bench/dynamo``) and runs the CLI as a user would, in subprocesses:

* ``inspect --json``: exit code, MACs against the torchvision model card's figure
  (``video.r3d_18``: a video network, whose 3-D convs no pass rewrites);
* ``optimize --target edgetpu`` and ``--target cpu`` (retrain mode: zero-shot guard), and
  ``--calib random`` (post-training: fidelity guard and weight recovery), ``--trials N``;
* every emitted model: ``onnx.checker.check_model(full_check=True)`` and one onnxruntime
  run; ``apply`` of the emitted recipe and ``inspect`` of the emitted model.

Prints one line per model and writes ``benchmarks/results/real_exports.json``.  Needs the
``bench`` extra (torch, torchvision, onnxscript).  Wall times are of the whole command on
a 2-core machine, for scale only.

    python benchmarks/real_exports.py [--models a,b] [--modes edgetpu,cpu,ptq] [--trials 30]
                                      [--exporter dynamo|dynamo-batch|torchscript]

``--exporter dynamo-batch`` exports with a dynamic batch (``dynamic_shapes``), ``torchscript``
with the TorchScript exporter and a dynamic batch; ``--input-shape`` pins it, each emitted
model is checked for keeping it, and the figures go to ``real_exports_<exporter>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_results

# name -> (constructor kwargs, input size, published GMACs from the torchvision model card)
MODELS: dict[str, tuple[dict, int, float]] = {
    "mobilenet_v2": ({}, 224, 0.30),
    "mobilenet_v3_large": ({}, 224, 0.22),
    "efficientnet_b0": ({}, 224, 0.39),
    "efficientnet_v2_s": ({}, 224, None),  # the card's 8.37 is at 384x384
    "mnasnet1_0": ({}, 224, 0.31),
    "regnet_y_400mf": ({}, 224, 0.40),
    "shufflenet_v2_x1_0": ({}, 224, 0.14),
    "squeezenet1_1": ({}, 224, 0.35),
    "resnet18": ({}, 224, 1.81),
    "resnext50_32x4d": ({}, 224, 4.23),
    "densenet121": ({}, 224, 2.83),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 224, 1.50),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 299, 5.71),
    "convnext_tiny": ({}, 224, 4.46),
    "swin_t": ({}, 224, 4.491),
    "vit_b_16": ({}, 224, 17.564),
    "maxvit_t": ({}, 224, 5.558),
    "video.r3d_18": ({}, 112, 40.697),  # a video network: 16 frames, every conv 3-D
}
CACHE = Path(os.environ.get("ARCHPASS_BENCH_CACHE", Path.home() / ".cache" / "archpass-bench" / "dynamo"))


def export(name: str, exporter: str = "dynamo") -> Path:
    """The export of ``name`` (cached by name, exporter and torch/torchvision versions):
    torch's default ``dynamo`` exporter, the same with a dynamic batch ``N``
    (``dynamo-batch``), or the ``torchscript`` one with a dynamic batch ``N``, as older
    pipelines still write them."""
    import torch
    import torchvision

    path = CACHE / f"{name}-{exporter}-torch{torch.__version__}-tv{torchvision.__version__}.onnx".replace("+", "_")
    if path.exists():
        return path
    kwargs, hw, _ = MODELS[name]
    torch.manual_seed(0)
    module, _, short = name.rpartition(".")  # "video.r3d_18": torchvision.models.video
    model = getattr(getattr(torchvision.models, module) if module else torchvision.models, short)(
        weights=None, **kwargs).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp_path = Path(tmp) / path.name
        x = (torch.randn(1, 3, 16, hw, hw) if module == "video" else torch.randn(1, 3, hw, hw),)
        if exporter == "dynamo":
            torch.onnx.export(model, x, str(tmp_path))  # the default
        elif exporter == "dynamo-batch":  # a batch of 2: torch.export specializes a dim traced at size 1
            torch.onnx.export(model, (torch.cat([x[0], x[0]]),), str(tmp_path), input_names=["image"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},))
        else:
            torch.onnx.export(model, x, str(tmp_path), dynamo=False, opset_version=17, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
        for f in Path(tmp).iterdir():  # the model and its <name>.data, moved together
            os.replace(f, CACHE / f.name)
    return path


def cli(*args: str, timeout: float = 3600) -> tuple[int, str, str, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "archpass", *args], check=False, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def check_emitted(path: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
             .astype(np.float32) for i in sess.get_inputs()}
    sess.run(None, feeds)


def inspect_row(src: Path, row: dict, extra: tuple[str, ...] = ()) -> dict | None:
    """``inspect --json`` of ``src``: its exit code and time in ``row["inspect"]``; the document, or None on failure."""
    rc, so, se, dt = cli("inspect", str(src), "--json", *extra)
    row["inspect"] = {"exit": rc, "s": round(dt, 1)}
    if rc:
        row["inspect"]["error"] = last_line(se)
        return None
    return json.loads(so)


MODES = {"edgetpu": ["--target", "edgetpu"], "cpu": ["--target", "cpu"],
         "ptq": ["--target", "edgetpu", "--calib", "random", "--samples", "8"]}


def run_model(name: str, modes: list[str], trials: int, out: Path, src: Path | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    """Every command on ``src`` (default: the torchvision export of ``name``), with ``extra``
    arguments (``--input-shape``) for inspect, optimize and apply."""
    src = src or export(name)
    row: dict = {"model": name, "export": src.name}
    doc = inspect_row(src, row, extra)
    if doc is None:
        return row
    macs = doc["totals"]["macs"]
    published = MODELS[name][2] if name in MODELS else None
    row["inspect"].update(gmacs=round(macs / 1e9, 3), published_gmacs=published,
                          vs_published=None if published is None else round(macs / 1e9 / published - 1, 4))
    for mode in modes:
        dest = out / f"{name}.{mode}.onnx"
        rc, so, se, dt = cli("optimize", str(src), "-o", str(dest), "-n", str(trials), "--json", *MODES[mode], *extra)
        r: dict = {"exit": rc, "s": round(dt, 1)}
        row[mode] = r
        if rc:
            r["error"] = last_line(se)
            continue
        doc = json.loads(so)
        r["rewrites"] = len(doc.get("rewrites") or [])
        r["improved"] = bool(doc.get("improved"))
        if doc.get("baseline") and doc.get("optimized"):
            r["latency_ms"] = [round(doc["baseline"]["latency_ms"], 3), round(doc["optimized"]["latency_ms"], 3)]
        r["notes"] = [n for n in doc.get("notes", []) if "dims" in n]
        if extra:  # a source with a dynamic batch, pinned: did the output keep it?
            r["dynamic_batch"] = any(n.startswith("kept the source's dynamic dims") and "[0" in n.split(" dynamic (")[0]
                                     for n in r["notes"])
        try:
            check_emitted(dest)
            r["emitted"] = "checker and onnxruntime ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            r["emitted"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if mode == modes[0]:
            rc2, _, se2, _ = cli("apply", str(src), str(dest.with_suffix(".recipe.json")), "-o",
                                 str(out / f"{name}.applied.onnx"), *extra)
            rc3, _, se3, _ = cli("inspect", str(dest), *extra)
            r["apply_exit"], r["inspect_emitted_exit"] = rc2, rc3
            if rc2 or rc3:
                r["apply_error"] = last_line(se2 or se3)
    return row


def failures(rows: list[dict]) -> list[str]:
    """The models of ``rows`` some command failed on, or whose output lost the source's dynamic batch."""
    return [r["model"] for r in rows if any(
        isinstance(v, dict) and (v.get("exit") or v.get("apply_exit") or v.get("inspect_emitted_exit")
                                 or "ok" not in v.get("emitted", "ok") or v.get("dynamic_batch") is False)
        for v in r.values())]


def bench_args(doc: str, models, modes: str, trials: int,
               exporters: tuple[str, ...] = ("dynamo", "torchscript")) -> tuple[list[str], list[str], int, str]:
    """``--models`` (of ``models``), ``--modes`` (of :data:`MODES`), ``--trials`` and
    ``--exporter`` (of ``exporters``, the first the default) from the command line, an
    unknown name refused."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default=",".join(models))
    ap.add_argument("--modes", default=modes)
    ap.add_argument("--trials", type=int, default=trials)
    ap.add_argument("--exporter", choices=exporters, default=exporters[0])
    a = ap.parse_args()
    names, chosen = a.models.split(","), a.modes.split(",")
    unknown = [n for n in names if n not in models] + [m for m in chosen if m not in MODES]
    if unknown:
        sys.exit(f"unknown model or mode: {', '.join(unknown)}")
    return names, chosen, a.trials, a.exporter


def main() -> None:
    names, modes, trials, exporter = bench_args(__doc__, MODELS, "edgetpu,cpu,ptq", 30,
                                                ("dynamo", "dynamo-batch", "torchscript"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            extra: tuple[str, ...] = ()
            if exporter != "dynamo":  # its batch is dynamic: pinned as for a user
                hw = MODELS[name][1]
                extra = ("--input-shape", "image:1,3," + ("16," if name.startswith("video.") else "") + f"{hw},{hw}")
            row = run_model(name, modes, trials, Path(tmp), src=export(name, exporter), extra=extra)
            rows.append(row)
            parts = [f"{k}={v['exit']}" + (f" ({v['s']}s)" if "s" in v else "")
                     + (" dynamic-batch" if v.get("dynamic_batch") else "") for k, v in row.items() if isinstance(v, dict)]
            print(f"{name:20s} {row['inspect'].get('gmacs', '-')} GMACs  " + "  ".join(parts), flush=True)
    failed = failures(rows)
    label = {"dynamo": "torch.onnx.export default (dynamo)", "dynamo-batch": "dynamo, dynamic_shapes batch",
             "torchscript": "TorchScript, opset 17, dynamic batch"}[exporter]
    path = write_results("real_exports" + ("" if exporter == "dynamo" else f"_{exporter.replace('-', '_')}"),
                         {"exporter": label, "trials": trials, "modes": modes, "models": rows, "failed": failed})
    print(f"{len(rows) - len(failed)}/{len(rows)} models through every command; wrote {path}")


if __name__ == "__main__":
    main()
