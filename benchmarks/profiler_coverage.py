"""How much of a profiled onnxruntime run its per-node profiler times account for.

The onnxruntime backend times each kernel with the profiler inside a whole generated
network (``calibrate._ort_work``).  The per-node times should cover most of the profiled
run (the rest is executor overhead between nodes) and should not exceed it by much (the
profiler's own bookkeeping, taken out later per node by ``profiler_overhead_ms``).  This
was a timed assertion in a unit test; it is a measured figure here.  Run it alone on the
machine (``flock -x /tmp/archpass-quiet.lock python benchmarks/profiler_coverage.py``).
Writes benchmarks/results/profiler_coverage.json.
"""

from __future__ import annotations

import statistics
import sys

from _common import write_results

SEEDS = (7, 11, 23, 42, 101)
BOUNDS = (0.5, 1.2)  # node-time sum / profiled run: the range the backend's design assumes


def main() -> int:
    from archpass.costmodel.calibrate import _ort_work
    from archpass.costmodel.kernels import FusionRules

    rows = []
    for style in ("chain", "network"):
        for seed in SEEDS:
            rec = _ort_work({"seed": seed, "style": style, "provider": "CPUExecutionProvider", "threads": 1,
                             "warmup": 2, "repeats": 9, "max_wait": 0,
                             "fusion": FusionRules(residual_add=True).to_json()})
            if "error" in rec:
                print(f"{style} {seed}: {rec['error']}", file=sys.stderr)
                continue
            node_sum = sum(p["ms"] for p in rec["points"])
            rows.append({"style": style, "seed": seed, "run_ms": rec["run_ms"], "plain_ms": rec["plain_ms"],
                         "node_sum_ms": node_sum, "coverage": node_sum / rec["run_ms"],
                         "profiled_over_plain": rec["run_ms"] / rec["plain_ms"]})
            r = rows[-1]
            print(f"{style:8s} seed {seed:4d}: run {r['run_ms']:8.3f} ms  plain {r['plain_ms']:8.3f} ms  "
                  f"node sum {node_sum:8.3f} ms  coverage {r['coverage']:.2f}")
    cov = [r["coverage"] for r in rows]
    inside = sum(BOUNDS[0] <= c <= BOUNDS[1] for c in cov)
    figures = {"bounds": BOUNDS, "networks": rows, "median_coverage": statistics.median(cov),
               "within_bounds": f"{inside}/{len(cov)}",
               "median_profiled_over_plain": statistics.median(r["profiled_over_plain"] for r in rows)}
    out = write_results("profiler_coverage", figures)
    print(f"coverage median {figures['median_coverage']:.2f}, {inside}/{len(cov)} within {BOUNDS}; results: {out}")
    return 0 if inside == len(cov) else 1


if __name__ == "__main__":
    sys.exit(main())
