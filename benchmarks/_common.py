"""Shared helpers for benchmark scripts: timing medians, models, results files."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # tests/zoo.py exports torchvision models


def zoo_path(name: str) -> Path:
    import zoo

    return zoo.export_model(name)


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "runs": len(samples)}


def write_results(name: str, figures: dict) -> Path:
    from archpass.io import atomic_write_text

    doc = {
        "benchmark": name,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        **figures,
    }
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path
