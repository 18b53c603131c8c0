"""`archpass optimize` on real models, side by side: writes benchmarks/results/search.json.

Sections (``--only a,b``; each run merges its sections into the results file):

* ``proxy``: the zero-shot score (search/zeroshot.py) on MobileNetV2: its seed-to-seed
  noise on the original, and the scores of fusion and of damaged architectures (width
  x0.25, channels at the minimum, an 8-channel bottleneck) against the default guard's
  threshold, beside the paper's whole-network NASWOT ``log det`` (which counts layers);
* ``edgetpu``: MobileNetV2 224 (torchvision architecture), retrain mode on ``edgetpu``
  with the default guard (zero-shot score no lower than the original's minus its measured
  noise) and without a guard; the latency-proxy Pareto front over candidates spread along
  the latency range, and where the guard's threshold cuts it;
* ``zigzag``: the emitted models evaluated whole by the ZigZag backend against their
  prediction (run under ``flock -s /tmp/archpass-quiet.lock``);
* ``cpu``: retrain mode on ``cpu`` (emits the models); ``cpu_time`` times them against the
  input in onnxruntime, interleaved windows, median of the window medians (run under
  ``flock -x /tmp/archpass-quiet.lock``);
* ``objectives``: ``--objective macs`` vs ``--objective latency``, both models' edgetpu latency;
* ``fusion``: ``--passes fuse_ibn`` on edgetpu against the exhaustive best set of blocks
  (latency sums over layers, so block by block), and on cpu: no fused block predicted slower;
* ``memory``: ``--objective memory``: params + peak activation;
* ``post_training``: the digits model (benchmarks/digits_model.py) with ``--calib``, and a table of
  candidates' held-out fidelity against their test accuracy (is the default threshold meaningful?);
* ``efficiency``: 300 trials against a 3,000-trial run (best objective), with the default
  channel granularity (stage); ``efficiency_group`` the same per channel group; both runs
  include the warm start (search/warmstart.py), whose evaluations are reported;
* ``speed``: trials per second of a latency-only search on MobileNetV2, per channel
  granularity (run under ``flock -x /tmp/archpass-quiet.lock``: it is a wall-clock figure);
* ``zoo``: every architecture of tests/zoo.py: ``--trials 50`` on edgetpu emits a valid
  model that runs in onnxruntime and is never predicted slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, write_results, zoo_path  # noqa: E402

NAME = "search"
WORK = ROOT / "benchmarks" / "work" / "search"  # emitted models (not committed)
SECTIONS = ("proxy", "edgetpu", "zigzag", "cpu", "cpu_time", "objectives", "fusion", "memory", "post_training",
            "post_training_strict", "efficiency",
            "efficiency_group", "speed", "zoo")
TRIALS = 300
ZIGZAG_ONLY: list[str] = []


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def optimize(name: str, model: Path, target: str, **kw) -> dict:
    from archpass import api

    out = WORK / f"{name}.onnx"
    t0 = time.perf_counter()
    doc = api.optimize(model, out, target, **kw)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    b, a = doc["baseline"], doc["optimized"]
    doc["latency_reduction_pct"] = (1 - a["latency_ms"] / b["latency_ms"]) * 100
    doc["memory_reduction_pct"] = (1 - (a["params_bytes"] + a["peak_activation_bytes"]) /
                                   (b["params_bytes"] + b["peak_activation_bytes"])) * 100
    log(f"{name}: {b['latency_ms']:.3f} -> {a['latency_ms']:.3f} ms ({doc['latency_reduction_pct']:.1f}% lower), "
        f"{doc['trials']} trials in {doc['seconds']} s; {doc.get('message') or ''}")
    return doc


def brief(doc: dict) -> dict:
    keep = ("baseline", "optimized", "latency_reduction_pct", "memory_reduction_pct", "trials", "seconds", "message",
            "proxy", "fidelity", "output", "improved")
    d = {k: doc[k] for k in keep if k in doc}
    d["rewrites"] = _count(doc["recipe"])
    return d


def _count(recipe: dict) -> dict:
    c: dict[str, int] = {}
    for r in recipe["rewrites"]:
        c[r["pass"]] = c.get(r["pass"], 0) + 1
    return c


def mobilenet() -> Path:
    return zoo_path("mobilenet_v2")


# ---------------------------------------------------------------------------- sections
def edgetpu() -> dict:
    """Retrain mode, default guard; the latency-proxy front."""
    from archpass.analysis import analyze
    from archpass.model import load_model
    from archpass.search import guard as g
    from archpass.search import study as st

    m = mobilenet()
    guarded = optimize("mbv2_edgetpu_retrain", m, "edgetpu", trials=TRIALS, mode="retrain")
    free = optimize("mbv2_edgetpu_noguard", m, "edgetpu", trials=TRIALS, guard=False)
    # the latency-proxy front: proxy scores of candidates spread along the latency range
    model = load_model(m)
    s = analyze(model)
    guard = g.proxy_guard(model, s)
    recs = [r for r in st.records(st.load_study(Path(free["storage"]), sampler=None)) if r.feasible]
    recs.sort(key=lambda r: r.values[0])
    base = free["baseline"]["latency_ms"]
    better = [r for r in recs if r.values[0] < base]
    picks = sorted({int(q * (len(better) - 1)) for q in (0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0)}) if better else []
    from archpass.passes.engine import apply_recipe
    from archpass.search.zeroshot import naswot_logdet

    points = [{"number": 0, "latency_ms": base, "proxy": guard.baseline, "naswot_logdet": naswot_logdet(model),
               "original": True}]
    for i in picks:
        r = better[i]
        t0 = time.perf_counter()
        res = guard.check(r.recipe)
        points.append({"number": r.number, "latency_ms": r.values[0], "proxy": res.score,
                       "naswot_logdet": naswot_logdet(apply_recipe(model, r.recipe, structure=s, verify=False).proto),
                       "reduction_pct": (1 - r.values[0] / base) * 100, "rewrites": _count(r.recipe.to_json()),
                       "seconds": round(time.perf_counter() - t0, 1)})
        log(f"proxy of trial {r.number}: {r.values[0]:.3f} ms -> {res.score:.2f} (original {guard.baseline:.2f})")
    front = [p for p in points if not any(o["latency_ms"] <= p["latency_ms"] and o["proxy"] >= p["proxy"] and o is not p
                                         and (o["latency_ms"], o["proxy"]) != (p["latency_ms"], p["proxy"])
                                         for o in points)]
    front.sort(key=lambda p: p["latency_ms"])
    threshold = guard.threshold
    kept = [p for p in front if p["proxy"] >= threshold]
    need55 = [p for p in points if p.get("reduction_pct", 0) >= 55]
    return {
        "model": "mobilenet_v2 224 (torchvision, random weights)",
        "retrain_default_guard": brief(guarded),
        "finalists_checked": guarded.get("finalists"),
        "no_guard": brief(free),
        "latency_proxy_points": points,
        "latency_proxy_front": front,
        "guard_threshold": threshold,
        "guard_baseline": guard.baseline,
        "guard_cut": {"front_points_kept": len(kept), "front_points_cut": len(front) - len(kept),
                      "lowest_latency_kept_ms": min(p["latency_ms"] for p in kept) if kept else None},
        "min_proxy_for_55pct": max((p["proxy"] for p in need55), default=None),
        "target_55pct_met": guarded["latency_reduction_pct"] >= 55,
    }


def proxy(seeds: int = 10) -> dict:
    """Seed noise of the zero-shot score on the original, and fused / damaged candidates
    against the default retrain guard's threshold (seed 0, as the guard scores them)."""
    from archpass.analysis import analyze
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe
    from archpass.recipe import Recipe, Rewrite
    from archpass.search.guard import PROXY_TOLERANCE, proxy_guard
    from archpass.search.zeroshot import naswot_logdet, trainability

    model = load_model(mobilenet())
    s = analyze(model)
    t0 = time.perf_counter()
    noise = [trainability(model, seed=k) for k in range(seeds)]
    per_eval = (time.perf_counter() - t0) / seeds
    guard = proxy_guard(model, s)
    ibn = [b.id for b in s.blocks if b.kind == "ibn"]
    adj = [g.id for g in s.groups if g.adjustable]
    wm = lambda f: Recipe((Rewrite("width_multiplier", None, {"multiplier": f, "parallelism": 8}),))  # noqa: E731
    cands = {"fuse_all_16_ibn": Recipe(tuple(Rewrite("fuse_ibn", b) for b in ibn)),
             "width_x0.75": wm(0.75), "width_x0.5": wm(0.5),
             "damaged_width_x0.25": wm(0.25),
             "damaged_channels_minimum_8": Recipe(tuple(Rewrite("channels", g, {"channels": 8}) for g in adj)),
             "damaged_bottleneck_8_group11": Recipe((Rewrite("channels", "group11", {"channels": 8}),))}
    out = {}
    for name, r in cands.items():
        m2 = apply_recipe(model, r, structure=s, verify=False).proto
        res = guard.check(r)
        seeds3 = [res.score] + [trainability(m2, seed=k) for k in (1, 2)]
        out[name] = {"score_seed0": res.score, "scores_seeds_0_2": seeds3, "passes_default_guard": res.ok,
                     "naswot_logdet": naswot_logdet(m2)}
        log(f"proxy {name}: {res.score:.3f} (threshold {guard.threshold:.3f}) ok={res.ok}")
    return {"original_scores_by_seed": noise, "original_mean": statistics.mean(noise),
            "original_sd": statistics.stdev(noise), "seconds_per_score": round(per_eval, 2),
            "original_naswot_logdet": naswot_logdet(model),
            "default_threshold": guard.threshold, "tolerance": PROXY_TOLERANCE, "candidates": out,
            "damaged_all_rejected": all(not v["passes_default_guard"] for k, v in out.items() if k.startswith("damaged")),
            "fusion_passes": out["fuse_all_16_ibn"]["passes_default_guard"]}


def zigzag(results: dict) -> dict:
    """Whole-model ZigZag evaluation of the emitted edgetpu models against their prediction."""
    import onnx

    from archpass.costmodel import load_target
    from archpass.costmodel.backends.zigzag import evaluate_cycles

    t = load_target("edgetpu")
    hw, mp = str(t.source_file("hardware")), str(t.source_file("mapping"))
    lpf = int(t.source.get("lpf_limit", 4))
    out = dict(results.get("zigzag") or {}) if ZIGZAG_ONLY else {}  # a partial run keeps the other models' rows
    out.pop("section_seconds", None)
    for name in ("mbv2_edgetpu_retrain", "mbv2_edgetpu_noguard", "mbv2_objective_latency", "mbv2_objective_macs"):
        path = WORK / f"{name}.onnx"
        if not path.exists() or (ZIGZAG_ONLY and name not in ZIGZAG_ONLY):
            continue
        t0 = time.perf_counter()
        cycles = evaluate_cycles(onnx.load(str(path)), hw, mp, lpf)
        ms = cycles / t.clock_hz * 1e3
        pred = _predict(path, "edgetpu")
        out[name] = {"zigzag_ms": ms, "predicted_ms": pred, "error_pct": (pred / ms - 1) * 100,
                     "within_10pct": abs(pred / ms - 1) <= 0.10, "seconds": round(time.perf_counter() - t0, 1)}
        log(f"zigzag {name}: {ms:.3f} ms, predicted {pred:.3f} ({out[name]['error_pct']:+.1f}%)")
    return out


def _predict(path: Path, target: str) -> float:
    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.model import load_model

    return estimate(analyze(load_model(path)), load_target(target), best_order=False).latency_ms


def cpu() -> dict:
    m = mobilenet()
    guarded = optimize("mbv2_cpu_retrain", m, "cpu", trials=TRIALS, mode="retrain")
    free = optimize("mbv2_cpu_noguard", m, "cpu", trials=TRIALS, guard=False)
    return {"retrain_default_guard": brief(guarded), "no_guard": brief(free)}


def cpu_time(windows: int = 7) -> dict:
    """onnxruntime latency of the input and the emitted cpu models, interleaved windows."""
    from archpass.costmodel import load_target
    from archpass.costmodel.backends.onnxruntime import measure_model

    t = load_target("cpu")
    threads = int(t.source.get("threads", 1))
    models = {"input": mobilenet()}
    for name in ("mbv2_cpu_retrain", "mbv2_cpu_noguard"):
        if (WORK / f"{name}.onnx").exists():
            models[name] = WORK / f"{name}.onnx"
    samples: dict[str, list[float]] = {k: [] for k in models}
    for w in range(windows):
        for k, p in models.items():
            samples[k].append(measure_model(p, "CPUExecutionProvider", threads, warmup=10, repeats=40, min_seconds=1.0)["ms"])
        log(f"cpu window {w + 1}/{windows}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in samples.items()))
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {"threads": threads, "windows": windows, "median_of_window_medians_ms": med, "window_medians_ms": samples}
    for k in models:
        if k != "input":
            out[f"{k}_reduction_pct"] = (1 - med[k] / med["input"]) * 100
            out[f"{k}_predicted_ms"] = _predict(models[k], "cpu")
    out["input_predicted_ms"] = _predict(models["input"], "cpu")
    return out


def objectives() -> dict:
    m = mobilenet()
    lat = optimize("mbv2_objective_latency", m, "edgetpu", trials=TRIALS, guard=False)
    macs = optimize("mbv2_objective_macs", m, "edgetpu", trials=TRIALS, guard=False, objective="macs")
    return {"guard": "none (both runs)", "latency_driven": brief(lat), "macs_driven": brief(macs),
            "edgetpu_ms": {"latency_driven": lat["optimized"]["latency_ms"], "macs_driven": macs["optimized"]["latency_ms"]},
            "macs": {"latency_driven": lat["optimized"]["macs"], "macs_driven": macs["optimized"]["macs"]},
            "latency_driven_faster_pct": (1 - lat["optimized"]["latency_ms"] / macs["optimized"]["latency_ms"]) * 100}


def exhaustive_fusion(model_path: Path, target: str) -> dict:
    """Block by block: fuse a block when fusing it alone lowers the predicted latency."""
    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe, Rewrite

    t = load_target(target)
    s = analyze(load_model(model_path))
    base = estimate(s, t, best_order=False).latency_ms
    deltas = {}
    for b in s.blocks:
        if b.kind == "ibn":
            deltas[b.id] = estimate(apply_recipe_shapes(s, Recipe((Rewrite("fuse_ibn", b.id),))), t, best_order=False).latency_ms - base
    best = [b for b, d in deltas.items() if d < 0]
    lat = estimate(apply_recipe_shapes(s, Recipe(tuple(Rewrite("fuse_ibn", b) for b in best))), t, best_order=False).latency_ms
    return {"baseline_ms": base, "deltas_ms": deltas, "best_set": best, "best_set_ms": lat}


def fusion() -> dict:
    m = mobilenet()
    out = {}
    for target in ("edgetpu", "cpu"):
        ex = exhaustive_fusion(m, target)
        doc = optimize(f"mbv2_fuse_only_{target}", m, target, trials=TRIALS, guard=False, passes=["fuse_ibn"])
        fused = [r["site"] for r in doc["recipe"]["rewrites"]]
        slower = [b for b in fused if ex["deltas_ms"][b] > 0]
        out[target] = {"search_ms": doc["optimized"]["latency_ms"], "exhaustive_ms": ex["best_set_ms"],
                       "gap_pct": (doc["optimized"]["latency_ms"] / ex["best_set_ms"] - 1) * 100,
                       "search_set": fused, "exhaustive_set": ex["best_set"], "fused_predicted_slower": slower,
                       "block_deltas_ms": ex["deltas_ms"], "baseline_ms": ex["baseline_ms"]}
        log(f"fusion {target}: search {doc['optimized']['latency_ms']:.4f} ms, exhaustive {ex['best_set_ms']:.4f} ms, "
            f"slower fused: {slower}")
    return out


def memory() -> dict:
    doc = optimize("mbv2_memory", mobilenet(), "edgetpu", trials=TRIALS, guard=False, objective="memory")
    return {"guard": "none", **brief(doc)}


def post_training_strict() -> dict:
    return {str(f): post_training(f) for f in (0.995, 0.999)}


def post_training(min_fidelity: float = 0.99) -> dict:
    import numpy as np

    from digits_model import accuracy, digits_model  # benchmarks/digits_model.py (issue 8)

    d = digits_model()
    calib = WORK / "digits_calib.npy"
    np.save(calib, d.calib)
    name = "digits_post_training" + ("" if min_fidelity == 0.99 else f"_{min_fidelity}")
    doc = optimize(name, d.onnx, "edgetpu", trials=TRIALS, calib=str(calib), min_fidelity=min_fidelity)
    after = accuracy(WORK / f"{name}.onnx", d.test_x, d.test_y)
    lad = doc.get("ladder") or {}
    out = {**brief(doc), "min_fidelity": min_fidelity, "finalists_checked": doc.get("finalists"),
           "guard_evaluations": doc["fidelity"]["evaluations"],
           "ladder": {k: lad.get(k) for k in ("options", "probed", "rungs", "best")},
           "test_accuracy_before": d.accuracy,
           "test_accuracy_after": after, "accuracy_loss_points": (d.accuracy - after) * 100,
           "targets_met": {"latency_25pct": doc["latency_reduction_pct"] >= 25,
                           "accuracy_loss_le_0.5_points": (d.accuracy - after) * 100 <= 0.5}}
    if min_fidelity == 0.99:
        out["fidelity_vs_accuracy"] = fidelity_vs_accuracy(d, calib, doc)
    return out


def fidelity_vs_accuracy(d, calib: Path, doc: dict) -> dict:
    """Is the default threshold meaningful?  Candidates the run's guard scored (the ladder's
    rungs, the finalists) and a few fixed recipes (width multipliers; the fidelity
    benchmark's recipes), each recovered and scored as the guard does (held-out quarter of
    the calibration samples), then measured on the test set."""
    from digits_model import accuracy

    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe, Rewrite
    from archpass.search import study as st
    from archpass.search.calib import load_calibration
    from archpass.search.fidelity import FidelityEvaluator
    from archpass.search.runner import Runner

    model = load_model(d.onnx)
    s = analyze(model)
    target = load_target("edgetpu")
    base = estimate(s, target, best_order=False).latency_ms
    ev = FidelityEvaluator(model, load_calibration(str(calib), model), structure=s)
    ref = Runner(model.proto).run({"input": d.test_x})[0].argmax(1)
    cands: dict[str, Recipe] = {}
    for i, r in enumerate((doc.get("ladder") or {}).get("rungs") or []):
        cands[f"rung {i}"] = Recipe.from_json(r["recipe"])
    # the passing single rewrites closest to the threshold (the most lossy that pass)
    probes = sorted((p for p in (doc.get("ladder") or {}).get("probes") or [] if p["score"] >= doc["fidelity"]["threshold"]),
                    key=lambda p: p["score"])
    for p in probes[:8]:
        cands[f"{p['param']}={p['value']}"] = Recipe.from_json(p["recipe"])
    by_number = {r.number: r for r in st.records(st.load_study(Path(doc["storage"]), sampler=None))}
    for f in doc.get("finalists") or []:
        cands.setdefault(f"trial {f['number']}", by_number[f["number"]].recipe)
    for m in (0.5, 0.625, 0.75, 0.875):
        cands[f"width x{m}"] = Recipe((Rewrite("width_multiplier", None, {"multiplier": m, "parallelism": 8}),))
    fuse = [Rewrite("fuse_ibn", f"block{i}") for i in (1, 2, 3)]
    cands["fuse 2 + group6 88"] = Recipe((*fuse[:2], Rewrite("channels", "group6", {"channels": 88})))
    cands["fuse 3 + width x0.875"] = Recipe((*fuse, Rewrite("width_multiplier", None, {"multiplier": 0.875, "parallelism": 8})))
    rows = []
    seen = set()
    for label, recipe in cands.items():
        key = recipe.dumps()
        if key in seen:
            continue
        seen.add(key)
        e = ev.evaluate(recipe)
        f = e.fidelity
        acc = accuracy(e.proto, d.test_x, d.test_y)
        pred = Runner(e.proto).run({"input": d.test_x})[0].argmax(1)
        lat = estimate(apply_recipe_shapes(s, recipe), target, best_order=False).latency_ms
        rows.append({"candidate": label, "rewrites": len(recipe), "latency_reduction_pct": (1 - lat / base) * 100,
                     "fidelity": f.score, "snr_db": f.outputs[0].snr_db, "top1_agreement": f.outputs[0].top1_agreement,
                     "test_accuracy": acc, "accuracy_loss_points": (d.accuracy - acc) * 100,
                     "test_top1_agreement": float((pred == ref).mean())})
        log(f"  {label:24s} {rows[-1]['latency_reduction_pct']:5.1f}% fidelity {f.score:.4f} "
            f"top1 {f.outputs[0].top1_agreement:.3f} -> test {acc * 100:.2f}% ({rows[-1]['accuracy_loss_points']:+.2f})")
    rows.sort(key=lambda r: -r["fidelity"])
    passing = [r for r in rows if r["fidelity"] >= 0.99]
    return {"rows": rows,
            "max_loss_points_at_default_threshold": max((r["accuracy_loss_points"] for r in passing), default=None),
            "candidates_passing": len(passing), "candidates": len(rows),
            "note": "fidelity and top1_agreement on the held-out quarter of the 512 calibration samples (the guard's "
                    "score); test figures on the 539 test images (one image = 0.19 point)"}


def efficiency_group() -> dict:
    return efficiency("group")


def warm_start_cost(granularity: str) -> dict:
    """Evaluations and seconds the warm start spends on MobileNetV2 edgetpu, and where it ends."""
    from archpass.analysis import analyze
    from archpass.costmodel import load_target
    from archpass.model import load_model
    from archpass.search.objective import Objective
    from archpass.search.space import Space
    from archpass.search.warmstart import DefaultTrial, warm_start

    t = load_target("edgetpu")
    ob = Objective(Space.build(analyze(load_model(mobilenet())), parallelism=t.parallelism, granularity=granularity), t)
    n = [0]

    def ev(params):
        n[0] += 1
        tr = DefaultTrial(params)
        r, st = ob.space.suggest(tr)
        return ob.score_structure(r, st), tr

    t0 = time.perf_counter()
    pts = warm_start(ob, evaluate=ev)
    sec = time.perf_counter() - t0
    ends = [ob.score_structure(*ob.space.suggest(DefaultTrial(p))).values[0] for p in pts]
    return {"evaluations": n[0], "seconds": round(sec, 2), "points": len(pts), "points_latency_ms": ends}


#: the 3,000-trial run in chunks (``--long-trials 1000``, then ``--long-trials 2000 --resume-long``, ...), each
#: its own process, so no heavy job holds the shared lock for half an hour; a chunk resumes the study
LONG = {"trials": 3000, "resume": False}


def efficiency(granularity: str = "stage") -> dict:
    m = mobilenet()
    tag = "" if granularity == "stage" else f"_{granularity}"
    short = optimize(f"mbv2_eff_300{tag}", m, "edgetpu", trials=300, guard=False, seed=1, granularity=granularity)
    long = optimize(f"mbv2_eff_3000{tag}", m, "edgetpu", trials=LONG["trials"], guard=False, seed=1,
                    granularity=granularity, resume=LONG["resume"])
    if LONG["trials"] < 3000:
        return {"partial": f"long run at {long['trials']} of 3000 trials; continue with --resume-long"}
    b = short["baseline"]["latency_ms"]
    gain_short, gain_long = b - short["optimized"]["latency_ms"], b - long["optimized"]["latency_ms"]
    return {"granularity": granularity, "warm_start": warm_start_cost(granularity),
            "trials_300": brief(short), "trials_3000": brief(long),
            "best_ms": {"300": short["optimized"]["latency_ms"], "3000": long["optimized"]["latency_ms"]},
            "ratio_of_best_objective": long["optimized"]["latency_ms"] / short["optimized"]["latency_ms"],
            "ratio_of_improvement": gain_short / gain_long,
            "target_95pct_met": long["optimized"]["latency_ms"] / short["optimized"]["latency_ms"] >= 0.95,
            "trials_per_second": {"300": 300 / short["seconds"], "3000": 3000 / long["seconds"]}}


def speed() -> dict:
    m = mobilenet()
    out = {}
    for gran in ("stage", "group"):
        doc = optimize(f"mbv2_speed_{gran}", m, "edgetpu", trials=300, guard=False, granularity=gran)
        out[gran] = {"trials": doc["trials"], "seconds_total": doc["seconds"], "trials_per_second": doc["trials"] / doc["seconds"],
                     "latency_ms": doc["optimized"]["latency_ms"], "latency_reduction_pct": doc["latency_reduction_pct"]}
    out["note"] = ("seconds_total includes loading, analysis, the enqueued baseline, the warm start, writing the "
                   "output model (everything `archpass optimize` does); stage is the default granularity")
    return out


def zoo() -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tests"))
    import zoo as z

    out = {}
    for name in z.MODELS:
        try:
            doc = optimize(f"zoo_{name}", zoo_path(name), "edgetpu", trials=50, guard=False)
            proto = onnx.load(doc["output"])
            onnx.checker.check_model(proto, full_check=True)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            feeds = {i.name: np.random.default_rng(0).standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
                     .astype(np.float32) for i in proto.graph.input}
            y = sess.run(None, feeds)
            out[name] = {"valid": True, "runs_in_onnxruntime": all(np.isfinite(v).all() for v in y),
                         "never_slower": doc["optimized"]["latency_ms"] <= doc["baseline"]["latency_ms"],
                         **{k: doc[k] for k in ("latency_reduction_pct", "seconds", "message")},
                         "rewrites": _count(doc["recipe"])}
        except Exception as exc:  # recorded, not hidden
            out[name] = {"valid": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"zoo {name}: FAILED {out[name]['error']}")
    out["all_valid_running_never_slower"] = all(v.get("valid") and v.get("runs_in_onnxruntime") and v.get("never_slower")
                                                for v in out.values() if isinstance(v, dict))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(s for s in SECTIONS if s not in ("zigzag", "cpu_time", "speed")),
                    help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--long-trials", type=int, default=3000, help="efficiency: run the long study up to this many trials")
    ap.add_argument("--resume-long", action="store_true", help="efficiency: resume the long study of the previous chunk")
    ap.add_argument("--zigzag-models", default="", help="zigzag: only these emitted models (comma-separated)")
    args = ap.parse_args(argv)
    LONG.update(trials=args.long_trials, resume=args.resume_long)
    ZIGZAG_ONLY[:] = [x for x in args.zigzag_models.split(",") if x]
    warnings.simplefilter("ignore")
    WORK.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {k: v for k, v in results.items() if k in SECTIONS}
    for sec in args.only.split(","):
        sec = sec.strip()
        if sec not in SECTIONS:
            ap.error(f"unknown section {sec}")
        log(f"== {sec}")
        t0 = time.perf_counter()
        res = zigzag(results) if sec == "zigzag" else globals()[sec]()
        res["section_seconds"] = round(time.perf_counter() - t0, 1)
        results[sec] = res
        # merge into the file as it is now (another run may have written other sections meanwhile)
        now = json.loads(path.read_text()) if path.exists() else {}
        write_results(NAME, {**{k: v for k, v in now.items() if k in SECTIONS}, sec: res})
    print(json.dumps(results, indent=2, default=str)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
