"""Where a 2-thread adaptation's MobileNetV3-Small error sits (a diagnostic of ``adapt.py``).

In every 2-thread adaptation of ``adapt.py`` MobileNetV3-Small comes out 10-26% high.
This script asks two questions of stored adaptations (``adapt.py --phase ort-adapt``):

* **Is it the real export, or the architecture?**  A twin of MobileNetV3-Small built
  with the adaptation's own network generator (``chains.ChainBuilder``: the same
  layers, squeeze-excitation blocks, HardSwish and classifier, random weights) is
  timed against the real export in interleaved rounds, and both are predicted.
* **Which layers carry it?**  The twin's prefixes (stem, then one more inverted
  bottleneck each, each ending in a global average pool so that no large output is
  reordered) are timed and predicted: a step from one prefix to the next is one block's
  measured and predicted time.

Timing is ``measure.measure_latency`` (the truths' protocol: interleaved windows, the
host's fast-state windows) at the adaptations' 2 threads, all graph optimizations; run it
alone on the machine::

    benchmarks/quiet.sh python benchmarks/adapt_twin.py [--tags s14,s16,s12,s3] [--rounds 8]

It writes ``benchmarks/results/adapt_twin.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

#: torchvision's MobileNetV3-Small: (in, kernel, expanded, out, squeeze-excitation,
#: activation, stride) per inverted bottleneck
V3_SMALL = [(16, 3, 16, 16, True, "relu", 2), (16, 3, 72, 24, False, "relu", 2), (24, 3, 88, 24, False, "relu", 1),
            (24, 5, 96, 40, True, "hardswish", 2), (40, 5, 240, 40, True, "hardswish", 1),
            (40, 5, 240, 40, True, "hardswish", 1), (40, 5, 120, 48, True, "hardswish", 1),
            (48, 5, 144, 48, True, "hardswish", 1), (48, 5, 288, 96, True, "hardswish", 2),
            (96, 5, 576, 96, True, "hardswish", 1), (96, 5, 576, 96, True, "hardswish", 1)]


def _divisible(v: float, d: int = 8) -> int:
    """torchvision's ``_make_divisible``: the squeeze-excitation width."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def twin(blocks: int | None = None):
    """MobileNetV3-Small (224 px) rebuilt by the plan generator; with ``blocks``, its stem
    and first ``blocks`` inverted bottlenecks, then a global average pool."""
    from archpass.costmodel.chains import ChainBuilder
    from onnx import TensorProto, helper

    b = ChainBuilder(0)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])
    x, shape = b.conv("input", (3, 224, 224), 16, 3, 2, 1, "hardswish")
    for cin, k, mid, cout, se, act, s in V3_SMALL[:blocks]:
        y, sh = b.conv(x, shape, mid, 1, 1, 1, act) if mid != cin else (x, shape)
        y, sh = b.conv(y, sh, mid, k, s, mid, act)
        if se:
            r = _divisible(mid // 4)
            p = b.op("GlobalAveragePool", [y], "gap")
            z, _ = b.conv(p, (mid, 1, 1), r, 1, 1, 1, "relu")
            z, _ = b.conv(z, (r, 1, 1), mid, 1, 1, 1, "hardsigmoid")
            y = b.op("Mul", [y, z], "semul")
        y, sh = b.conv(y, sh, cout, 1, 1, 1, None)
        if s == 1 and cin == cout:
            y = b.op("Add", [y, x], "add")
        x, shape = y, sh
    if blocks is not None:
        return b._model(b.op("GlobalAveragePool", [x], "gap"), inp, (shape[0], 1, 1), "v3s_prefix")
    x, shape = b.conv(x, shape, 576, 1, 1, 1, "hardswish")
    f = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    w1 = b.const(b.np.standard_normal((1024, 576)).astype(np.float32) * 0.04)
    g = b.act(b.op("Gemm", [f, w1, b.const(np.zeros(1024, np.float32), "b")], "gemm", transB=1), "hardswish")
    w2 = b.const(b.np.standard_normal((1000, 1024)).astype(np.float32) * 0.03)
    g = b.op("Gemm", [g, w2, b.const(np.zeros(1000, np.float32), "b")], "gemm", transB=1)
    return b._model(g, inp, (1000,), "v3s_twin")


def _time(variants: dict, target, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds (every variant once a round) of ``measure_latency``."""
    from archpass.costmodel.measure import measure_latency

    got = {k: [] for k in variants}
    for r in range(rounds):
        for k, proto in variants.items():
            got[k].append(measure_latency(proto, target, windows=3)["ms"])
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return got


def main(argv: list[str] | None = None) -> int:
    import adapt as A
    import onnx
    from _common import write_results
    from archpass.costmodel import estimate
    from archpass.costmodel.adapt import refit

    from archpass.analysis import analyze
    from archpass.model import model_from_proto

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tags", default="s14,s16,s12,s3", help="stored 2-thread adaptations (adapt.py tags)")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    tags = args.tags.split(",")
    doc = A._json(A.work_dir() / "ort_runs.json", {})
    targets = {t: refit(doc["adaptations"][t]["2threads"]["dir"]) for t in tags}
    real = A.load_models(["mobilenet_v3_small"])["mobilenet_v3_small"][0].proto
    whole = twin()
    onnx.checker.check_model(whole, full_check=True)

    def predict(proto) -> dict[str, float]:
        structure = analyze(model_from_proto(proto))
        return {t: float(estimate(structure, tg, best_order=False).latency_ms) for t, tg in targets.items()}

    # 1. the twin against the real export
    pred = {"real": predict(real), "twin": predict(whole)}
    kernels = {k: len(estimate(analyze(model_from_proto(p)), targets[tags[0]], best_order=False).kernels)
               for k, p in (("real", real), ("twin", whole))}
    got = _time({"real": real, "twin": whole}, targets[tags[0]], args.rounds)
    ratio = float(np.median(np.array(got["twin"]) / np.array(got["real"])))
    real_ms = float(np.median(got["real"]))
    twin_doc = {
        "kernels": kernels, "rounds": args.rounds,
        "measured_ms": {k: round(float(np.median(v)), 4) for k, v in got.items()},
        "twin_over_real_median_of_round_ratios": round(ratio, 4),
        "predicted_ms": {k: {t: round(v, 4) for t, v in p.items()} for k, p in pred.items()},
        "predicted_error_pct_against_this_run": {t: round((pred["real"][t] / real_ms - 1) * 100, 1) for t in tags},
    }
    print(f"twin/real {ratio:.3f} (real {real_ms:.3f} ms)", file=sys.stderr)
    # 2. the prefixes: which blocks carry the error
    variants = {f"blocks_{n:02d}": twin(n) for n in range(len(V3_SMALL) + 1)}
    variants["whole"] = whole
    pred = {k: predict(v) for k, v in variants.items()}
    got = _time(variants, targets[tags[0]], args.rounds)
    rows, prev = [], None
    for k in variants:
        m = float(np.median(got[k]))
        row = {"prefix": k, "measured_ms": round(m, 4), "predicted_ms": {t: round(pred[k][t], 4) for t in tags},
               "error_pct": {t: round((pred[k][t] / m - 1) * 100, 1) for t in tags}}
        if prev is not None:  # one more block (or the classifier head, for the whole model)
            row["step_measured_ms"] = round(m - prev[0], 4)
            row["step_predicted_ms"] = {t: round(pred[k][t] - prev[1][t], 4) for t in tags}
        rows.append(row)
        prev = (m, pred[k]) if k != "whole" else prev
        print(f"{k:10s} measured {m:.4f} " + " ".join(f"{t}:{row['error_pct'][t]:+.1f}%" for t in tags), file=sys.stderr)
    figures = {"adaptations": tags, "threads": 2, "twin_against_real_export": twin_doc, "prefixes": rows}
    print(write_results("adapt_twin", figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
