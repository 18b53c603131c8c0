"""Time `archpass apply` of a recipe that touches every block of MobileNetV2 (target: under 2 s wall),
and the shape-only path the search uses (target: well under 1 ms per rewrite).

The recipe fuses the 16 IBN blocks, turns block0's depthwise conv dense, rounds three
channel groups up to a multiple of 8 and changes the resolution to 192x192 (20 rewrites).
Measured in one run:

* ``cli_process``: a fresh ``archpass apply ... --json`` process (start-up, imports,
  load + canonicalize, analyze, rewrite, checker, shape verification, atomic save);
* ``api_apply``: the same through ``archpass.api.apply`` in a warm interpreter;
* ``engine_only``: ``apply_recipe`` on an already loaded and analyzed model;
* ``shape_only``: ``apply_recipe_shapes`` for the whole recipe, per rewrite, and per pass.

Writes benchmarks/results/apply_mobilenet_v2.json.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import summary, timed, write_results, zoo_path

TARGET_S = 2.0
TARGET_SHAPE_MS = 1.0


def recipe_for(structure) -> dict:
    rewrites = [{"pass": "fuse_ibn", "site": b.id} for b in structure.blocks if b.kind == "ibn"]
    rewrites += [{"pass": "dw_to_dense", "site": b.role("depthwise")} for b in structure.blocks if b.kind == "depthwise"]
    adjustable = [g for g in structure.groups if g.adjustable and g.channels % 8]
    adjustable += [g for g in structure.groups if g.adjustable and not g.channels % 8][: max(0, 3 - len(adjustable))]
    rewrites += [{"pass": "channels", "site": g.id, "channels": (g.channels // 8 + 1) * 8} for g in adjustable[:3]]
    rewrites.append({"pass": "resolution", "height": 192, "width": 192})
    return {"rewrites": rewrites}


def main() -> int:
    from archpass import api
    from archpass.analysis import analyze
    from archpass.model import load_model
    from archpass.passes.base import get_pass
    from archpass.passes.engine import apply_recipe, apply_recipe_shapes, plan
    from archpass.recipe import Recipe

    path = zoo_path("mobilenet_v2")
    model = load_model(path)
    structure = analyze(model)
    doc = recipe_for(structure)
    recipe = Recipe.from_json(doc)
    touched = {r["site"] for r in doc["rewrites"] if r["pass"] in ("fuse_ibn",)} | {
        b.id for b in structure.blocks if b.kind == "depthwise"}
    assert touched == {b.id for b in structure.blocks}, "the recipe must touch every block"

    with tempfile.TemporaryDirectory() as tmp:
        rpath = Path(tmp) / "recipe.json"
        rpath.write_text(json.dumps(doc))
        out = Path(tmp) / "out.onnx"
        cli = [sys.executable, "-m", "archpass", "apply", str(path), str(rpath), "-o", str(out), "--json"]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_runs = timed(lambda: subprocess.run(cli, check=True, capture_output=True), repeats=5)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu_s = ((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)) / 6  # warmup + 5 runs
        api_runs = timed(lambda: api.apply(path, rpath, out), repeats=5)
    engine_runs = timed(lambda: apply_recipe(model, recipe, structure=structure), repeats=5)

    n = len(recipe)
    shape_runs = timed(lambda: apply_recipe_shapes(structure, recipe), repeats=50, warmup=3)
    per_pass: dict[str, list[float]] = {}
    steps = plan(structure, recipe).steps
    for _ in range(20):
        for st in steps:
            p = get_pass(st.rewrite.pass_name)
            t = time.perf_counter()
            p.apply_shapes(st.before, p.check(st.before, st.rewrite.site, st.rewrite.choice))
            per_pass.setdefault(st.rewrite.pass_name, []).append(time.perf_counter() - t)
    shape_median_ms = statistics.median(shape_runs) * 1e3
    figures = {
        "model": "torchvision mobilenet_v2 (opset 17, 224x224)",
        "rewrites": n,
        "recipe": doc,
        "target_s": TARGET_S,
        "cli_process": summary(cli_runs),
        "cli_process_cpu_s_mean": cli_cpu_s,
        "load_average_1min": os.getloadavg()[0],
        "api_apply": summary(api_runs),
        "engine_only": summary(engine_runs),
        "shape_only_recipe": summary(shape_runs),
        "shape_only_ms_per_rewrite": shape_median_ms / n,
        "shape_only_ms_per_pass": {k: statistics.median(v) * 1e3 for k, v in per_pass.items()},
        "target_shape_ms_per_rewrite": TARGET_SHAPE_MS,
    }
    path_out = write_results("apply_mobilenet_v2", figures)
    c, a, e = (figures[k]["median_s"] for k in ("cli_process", "api_apply", "engine_only"))
    print(f"apply mobilenet_v2 ({n} rewrites, every block): CLI process median {c:.3f} s, API {a:.3f} s, "
          f"engine only {e:.3f} s (target {TARGET_S} s); CLI CPU time {cli_cpu_s:.3f} s/run, "
          f"load average {figures['load_average_1min']:.2f} on {os.cpu_count()} cores")
    print(f"shape-only: {shape_median_ms:.2f} ms per recipe, {shape_median_ms / n:.3f} ms per rewrite; per pass (check + apply_shapes): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in figures["shape_only_ms_per_pass"].items()))
    print(f"results: {path_out}")
    return 0 if c < TARGET_S and shape_median_ms / n < TARGET_SHAPE_MS else 1


if __name__ == "__main__":
    sys.exit(main())
