"""Adapting a target to a new device from a few measurements (``archpass calibrate --adapt``).

Two scenarios, each scored on held-out models no calibration or adaptation data contains
(torchvision architectures, their width/resolution variants, models rewritten by
archpass's passes; the set of ``predictor_accuracy.py``):

* **ZigZag, new hardware**: ``edgetpu`` (8x8 K x C, 4x4 OX x OY) adapted to ZigZag's
  ``ascend_like`` hardware (16x16 K x C, 2x2 OX x OY) from at most 50 layer evaluations,
  against ZigZag's whole-model evaluation.  Compared with a from-scratch target fitted on
  the same 50 measurements and a full calibration (420 sampled layers).  Every correction
  the adaptation can choose is also reported.
* **onnxruntime, new host** (simulated: the machines here are all one kind): ``cpu``
  (1 thread) adapted to 2 threads, and to onnxruntime with basic graph optimizations only,
  each from at most 60 s of measurement; against each model's whole-model latency (median
  of window medians, windows interleaved over models), all timing under the exclusive lock.
  The same adaptation run twice at different times gives the drift.

    python benchmarks/adapt.py --phase truths|zigzag|ort|drift|report

Phases write into the benchmark cache (``$ARCHPASS_BENCH_CACHE``/adapt) and
``report`` writes ``benchmarks/results/adapt.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import predictor_accuracy as pa  # noqa: E402  (exports, ZigZag whole-model truths)

RESULTS = ROOT / "results" / "adapt.json"
LOCK = "/tmp/archpass-quiet.lock"
CLOCK_HZ = 500e6
ZIGZAG_SAMPLES = 50
#: held-out models for ZigZag (whole-model evaluations take minutes each: a subset of
#: predictor_accuracy's set covering every family and rewrite)
ZIGZAG_MODELS = [
    "mobilenet_v2", "mobilenet_v2_w0.35_r160", "mobilenet_v2_w0.75_r192", "mobilenet_v2_r128", "mobilenet_v2_w1.4",
    "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "mnasnet1_0", "resnet18",
    "resnet18_r160", "resnet50", "regnet_x_400mf", "regnet_y_400mf", "squeezenet1_1", "shufflenet_v2_x1_0",
    "mobilenet_v2+fuse_early", "mobilenet_v2+dense_early", "mobilenet_v2+odd_channels", "resnet18+odd_channels",
    "efficientnet_b0+fuse_early",
]
ORT_MODELS = [
    "mobilenet_v2", "mobilenet_v2_w0.35_r160", "mobilenet_v2_w0.75_r192", "mobilenet_v2_r128", "mobilenet_v3_large",
    "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "mnasnet1_0", "resnet18", "resnet18_r160",
    "regnet_x_400mf", "regnet_y_400mf", "squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2+fuse_early",
    "mobilenet_v2+dense_early", "mobilenet_v2+odd_channels", "resnet18+odd_channels", "efficientnet_b0+fuse_early",
]


def work_dir() -> Path:
    d = pa.cache_dir() / "adapt"
    d.mkdir(parents=True, exist_ok=True)
    return d


def zigzag_yamls() -> tuple[Path, Path]:
    import shutil

    import zigzag

    src = Path(zigzag.__file__).resolve().parent / "inputs"
    hw, mp = work_dir() / "ascend_like.hardware.yaml", work_dir() / "ascend_like.mapping.yaml"
    for a, b in ((src / "hardware" / "ascend_like.yaml", hw), (src / "mapping" / "ascend_like.yaml", mp)):
        if not b.exists():
            shutil.copyfile(a, b)
    return hw, mp


def _json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _save(path: Path, doc) -> None:
    from archpass.model import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def load_models(names):
    from archpass.analysis import analyze
    from archpass.model import load_model

    out = {}
    for name in names:
        path = pa.export(name)
        model = load_model(path)
        canon = pa.cache_dir() / f"{name}.canonical.onnx"
        if not canon.exists():
            import onnx

            onnx.save(model.proto, str(canon))
        out[name] = (model, analyze(model), canon)
    return out


# ------------------------------------------------------------------ phase: ZigZag truths
def phase_truths(args) -> None:
    import multiprocessing as mp_

    hw, mp = zigzag_yamls()
    models = load_models(ZIGZAG_MODELS)
    path = work_dir() / "zigzag_truths.json"
    truths = _json(path, {})
    jobs = [(n, "ascend_like", str(models[n][2]), str(hw), str(mp), 4, CLOCK_HZ) for n in ZIGZAG_MODELS
            if n not in truths]
    with mp_.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
        for name, _, res in pool.imap_unordered(pa._zigzag_truth, jobs):
            truths[name] = res
            _save(path, truths)
            print(f"zigzag ascend_like {name}: {res}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", required=True, choices=["truths", "zigzag", "ort", "drift", "report"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    {"truths": phase_truths}[args.phase](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
