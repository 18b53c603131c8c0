"""Whole detectors, post-processing included, as users export them from torchvision.

``torch.onnx.export`` (TorchScript, opset 17) of a torchvision detector called on a list
of one image: the input is ``images`` (3, H, W) without a batch axis, and the graph ends
in box decoding, ``TopK``/``NonZero``, NMS (in ``If`` branches), ``RoiAlign`` and, for
Mask R-CNN, a ``Loop`` that pastes the masks.  The score threshold is 0 so a randomly
initialized model still returns detections to compare.  For each detector:

* ``inspect --json``: exit code, what was set aside (the load note);
* ``apply`` of the empty recipe: the emitted model against the source on a random image
  (the post-processing put back, the input without its batch axis again);
* ``apply --allow-growth`` of an exact recipe (every depthwise conv to a dense one, every
  adjustable channel group rounded up to the next multiple of 16): the detections against
  the source's, onnxruntime with graph optimizations disabled;
* ``optimize`` in the modes asked (``edgetpu``, ``cpu``: retrain mode; ``ptq``: random
  calibration, fidelity guard and weight recovery): exit code, estimates before/after,
  and the emitted model through the checker and onnxruntime with the source's outputs.

Prints one line per detector and writes ``benchmarks/results/detectors.json``.  Needs the
``bench`` extra.  Wall times are of the whole command on a 2-core machine, for scale only.

    python benchmarks/detectors.py [--models a,b] [--modes edgetpu,cpu,ptq] [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import write_results
from real_exports import cli, inspect_row, last_line

# name -> (constructor kwargs, image size, modes it runs by default)
MODELS: dict[str, tuple[dict, int, tuple[str, ...]]] = {
    "ssdlite320_mobilenet_v3_large": ({"score_thresh": 0.0}, 320, ("edgetpu", "cpu", "ptq")),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ({"box_score_thresh": 0.0}, 320, ("edgetpu", "cpu", "ptq")),
    "maskrcnn_resnet50_fpn": ({"box_score_thresh": 0.0}, 320, ("edgetpu",)),  # runs at 800 inside: slow
}
CACHE = Path(os.environ.get("ARCHPASS_BENCH_CACHE", Path.home() / ".cache" / "archpass-bench" / "detectors"))
MODES = {"edgetpu": ["--target", "edgetpu"], "cpu": ["--target", "cpu"],
         "ptq": ["--target", "edgetpu", "--calib", "random", "--samples", "8"]}


def export(name: str) -> Path:
    import torch
    import torchvision

    kwargs, hw, _ = MODELS[name]
    path = CACHE / f"{name}-torch{torch.__version__}-tv{torchvision.__version__}.onnx".replace("+", "_")
    if path.exists():
        return path
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **kwargs).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp_path = Path(tmp) / path.name
        torch.onnx.export(model, ([torch.rand(3, hw, hw)],), str(tmp_path), opset_version=17, dynamo=False,
                          input_names=["images"])
        os.replace(tmp_path, path)
    return path


def run(path: Path, image) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: image})


def compare(src: Path, out: Path, image) -> dict:
    """The emitted model's outputs against the source's on ``image``."""
    import numpy as np
    import onnx

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    want, got = run(src, image), run(out, image)
    same_shapes = [tuple(a.shape) == tuple(b.shape) for a, b in zip(want, got)]
    return {"outputs": len(got), "source_outputs": len(want), "shapes": [list(a.shape) for a in got],
            "same_shapes": all(same_shapes) and len(got) == len(want),
            "max_abs_diff": [float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if s and a.size else 0.0
                             for a, b, s in zip(want, got, same_shapes)]}


def exact_recipe(inspect_doc: dict) -> dict:
    rewrites = []
    for s in inspect_doc["sites"]:
        if s["pass"] == "dw_to_dense":
            rewrites.append({"pass": "dw_to_dense", "site": s["site"]})
        elif s["pass"] == "channels":
            c = s["domains"]["channels"]["current"]
            rewrites.append({"pass": "channels", "site": s["site"], "channels": (c // 16 + 1) * 16})
    return {"rewrites": rewrites}


def run_model(name: str, modes: list[str], trials: int, out: Path) -> dict:
    import numpy as np

    src = export(name)
    hw = MODELS[name][1]
    image = np.random.default_rng(0).random((3, hw, hw), dtype=np.float32)
    row: dict = {"model": name, "export": src.name}
    doc = inspect_row(src, row)
    if doc is None:
        return row
    row["inspect"].update(gmacs=round(doc["totals"]["macs"] / 1e9, 3), notes=doc["notes"])
    for what, recipe in (("identity", {"rewrites": []}), ("exact", exact_recipe(doc))):
        rfile, dest = out / f"{name}.{what}.recipe.json", out / f"{name}.{what}.onnx"
        rfile.write_text(json.dumps(recipe))
        # dense convs for every depthwise one can grow a detector past the 16x limit: allowed here
        rc, so, se, dt = cli("apply", str(src), str(rfile), "-o", str(dest), "--json",
                             *(["--allow-growth"] if what == "exact" else []))
        r = {"exit": rc, "s": round(dt, 1), "rewrites": len(recipe["rewrites"])}
        row[f"apply_{what}"] = r
        if rc:
            r["error"] = last_line(se)
            continue
        r["exact"] = json.loads(so)["exact"]
        r.update(compare(src, dest, image))
    for mode in modes:
        dest = out / f"{name}.{mode}.onnx"
        rc, so, se, dt = cli("optimize", str(src), "-o", str(dest), "-n", str(trials), "--json", *MODES[mode])
        r = {"exit": rc, "s": round(dt, 1)}
        row[mode] = r
        if rc:
            r["error"] = last_line(se)
            continue
        d = json.loads(so)
        r.update(rewrites=len(d.get("rewrites") or []), baseline=d["baseline"], optimized=d["optimized"])
        try:
            c = compare(src, dest, image)
            r["emitted"] = {k: c[k] for k in ("outputs", "source_outputs", "shapes")}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            r["emitted"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def failed(row: dict) -> bool:
    for key, v in row.items():
        if not isinstance(v, dict):
            continue
        if v.get("exit"):
            return True
        if key.startswith("apply_") and not (v.get("same_shapes") and max(v.get("max_abs_diff") or [0]) <= 1e-3):
            return True
        if isinstance(v.get("emitted"), str) or (isinstance(v.get("emitted"), dict)
                                                  and v["emitted"]["outputs"] != v["emitted"]["source_outputs"]):
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=None, help="default: each model's own (Mask R-CNN: edgetpu only)")
    ap.add_argument("--trials", type=int, default=20)
    a = ap.parse_args()
    names = a.models.split(",")
    unknown = [n for n in names if n not in MODELS] + [m for m in (a.modes or "").split(",") if m and m not in MODES]
    if unknown:
        sys.exit(f"unknown model or mode: {', '.join(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            modes = a.modes.split(",") if a.modes else list(MODELS[name][2])
            row = run_model(name, modes, a.trials, Path(tmp))
            rows.append(row)
            parts = [f"{k}={v['exit']}" + (f" ({v['s']}s)" if "s" in v else "") for k, v in row.items() if isinstance(v, dict)]
            diffs = {k: max(v.get("max_abs_diff") or [0]) for k, v in row.items() if k.startswith("apply_") and "max_abs_diff" in v}
            print(f"{name:38s} {row['inspect'].get('gmacs', '-')} GMACs  " + "  ".join(parts) + f"  diffs {diffs}", flush=True)
    bad = [r["model"] for r in rows if failed(r)]
    path = write_results("detectors", {"exporter": "torch.onnx.export TorchScript, opset 17, a list of one image",
                                       "trials": a.trials, "models": rows, "failed": bad})
    print(f"{len(rows) - len(bad)}/{len(rows)} detectors through every command; wrote {path}")


if __name__ == "__main__":
    main()
