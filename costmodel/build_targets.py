"""Regenerate the built-in targets: ``python -m archpass.costmodel.build_targets [--only edgetpu,tpu,cpu]``.

* ``edgetpu``: ZigZag on its bundled ``edge_tpu_like`` hardware and mapping (8x8 MACs over
  output x input channels, 4x4 over output columns x rows), 500 MHz clock (assumed, the
  order of the Edge TPU's).
* ``tpu``: ZigZag ``tpu_like`` (32x32 weight-stationary systolic array), 700 MHz (TPU v1).
* ``cpu``: onnxruntime's CPU execution provider on this machine, 1 thread, kernels timed
  in context (generated blocks, onnxruntime's profiler).

Measured points are cached in each target's ``dataset.jsonl``: a rerun only measures
what is missing and refits.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARDWARE = HERE / "hardware"
TARGETS = HERE / "targets"

BUILTINS = {
    "edgetpu": {
        "backend": "zigzag",
        "hardware": HARDWARE / "edge_tpu_like.hardware.yaml",
        "mapping": HARDWARE / "edge_tpu_like.mapping.yaml",
        "clock_hz": 500e6,
        "samples": 560,
        "description": "Edge-TPU-like accelerator (ZigZag edge_tpu_like: 8x8 MACs over K x C, 4x4 over OX x OY), int8, 500 MHz",
    },
    "tpu": {
        "backend": "zigzag",
        "hardware": HARDWARE / "tpu_like.hardware.yaml",
        "mapping": HARDWARE / "tpu_like.mapping.yaml",
        "clock_hz": 700e6,
        "samples": 533,
        "description": "TPU-like accelerator (ZigZag tpu_like: 32x32 weight-stationary systolic array over K x C), int8, 700 MHz",
    },
    "cpu": {
        "backend": "onnxruntime",
        "provider": "CPUExecutionProvider",
        "threads": 1,
        "samples": 1000,
        "description": "onnxruntime CPU execution provider on the build machine, 1 thread, float32",
    },
}


def _progress(name: str):
    state = {"t0": time.time(), "last": 0.0}

    def report(done: int, total: int, note: str) -> None:
        now = time.time()
        if now - state["last"] >= 5 or done == total:
            state["last"] = now
            rate = done / max(now - state["t0"], 1e-9)
            print(f"[{name}] {done}/{total} {rate:.2f}/s {note[:80]}", file=sys.stderr, flush=True)

    return report


def build(name: str, samples: int | None = None, workers: int = 2):
    from archpass.costmodel import calibrate as cal

    spec = BUILTINS[name]
    out = TARGETS / name
    n = samples or spec["samples"]
    if spec["backend"] == "zigzag":
        return cal.calibrate_zigzag(
            name=name, out_dir=out, hardware=spec["hardware"], mapping=spec["mapping"], clock_hz=spec["clock_hz"],
            samples=n, workers=workers, description=spec["description"], progress=_progress(name),
        )
    return cal.calibrate_onnxruntime(
        name=name, out_dir=out, provider=spec["provider"], threads=spec["threads"], samples=n,
        workers=1, description=spec["description"], progress=_progress(name),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BUILTINS), help="comma-separated target names")
    ap.add_argument("--samples", type=int, default=None, help="override the sample count")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ranges-only", action="store_true",
                    help="only record each predictor's calibrated range from the existing dataset (no measuring, no refit)")
    args = ap.parse_args(argv)
    for name in args.only.split(","):
        if args.ranges_only:
            from archpass.costmodel.calibrate import record_ranges

            print(f"[{name}] ranges of {', '.join(record_ranges(TARGETS / name.strip()))}", file=sys.stderr)
            continue
        t0 = time.time()
        t = build(name.strip(), args.samples, args.workers)
        acc = t.accuracy.get("all_kernels", {})
        print(f"[{name}] done in {time.time() - t0:.0f}s: {t.accuracy.get('measured_points')} points, "
              f"held-out kernels within ±10%: {acc.get('within_10pct', float('nan')):.1f}%", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
