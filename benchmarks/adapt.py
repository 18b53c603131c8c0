"""Adapting a target to a new device from a few measurements (``archpass calibrate --adapt``).

Two scenarios, each scored on held-out models no calibration or adaptation data contains
(torchvision architectures, their width/resolution variants, models rewritten by
archpass's passes; the set of ``predictor_accuracy.py``):

* **ZigZag, new hardware**: ``edgetpu`` (8x8 K x C, 4x4 OX x OY) adapted to ZigZag's
  ``ascend_like`` hardware (16x16 K x C, 2x2 OX x OY) from at most 50 layer evaluations,
  against ZigZag's whole-model evaluation.  Compared with a from-scratch target fitted on
  the same 50 measurements and a full calibration (420 sampled layers planned; the
  results file gives how many were measured).  Every correction
  the adaptation can choose is also reported.
* **onnxruntime, new host** (simulated: the machines here are all one kind): ``cpu``
  (1 thread) adapted to 2 threads, and to onnxruntime with basic graph optimizations only,
  each from at most 60 s of measurement (and, as a control, to this host in its own
  setting, 1 thread with all optimizations); against each model's whole-model latency (the
  mean of the faster half of its window latencies, windows interleaved over models; with
  several threads of the host's fast-state windows, see ``TRUTH_WINDOWS``; the median over
  the truth measurements combined), all timing under the exclusive lock.
  The same adaptation run twice at different times gives the drift.  Each adapted target
  is also scored against each truth measurement alone, with its mean signed error: the
  host's speed at the time of a measurement moves every model together; and against the
  truth measurements taken within ``NEARBY_S`` before and after it, combined (the host in
  the same period: take a truth, adapt, take a truth).  Adaptations with other plan seeds
  (``--seed``: which networks the plan draws) show how much a result depends on the draw;
  the report pools every adaptation of a scenario, and apart those that timed the networks
  today's plan draws (:func:`plan_is_current`: older ones timed an earlier generator's),
  with the drift between two of those with the same seed.  ``--phase ort-split`` times the
  held-out models together with the adaptations' own generated networks (drawn again
  from today's plan for their seed), and the report splits each adaptation's error into the host's level (its
  networks now against then) and the model's (held-out models against its own networks in
  the same minutes).  For comparison, a full
  calibration in a scenario's setting (``--phase ort-full``: ``calibrate --backend
  onnxruntime`` of as many generated networks as the built-in ``cpu`` was made from, 1000) is scored
  the same way against its nearby truths.

    python benchmarks/adapt.py --phase truths|zigzag-measure|zigzag|prepare|report   # truths, zigzag-measure: ZigZag runs
    benchmarks/quiet.sh python benchmarks/adapt.py --phase ort-truth --tag first          # one quiet section each
    benchmarks/quiet.sh python benchmarks/adapt.py --phase ort-adapt --scenario 2threads --tag first [--seed 0] [--windows 3]
    benchmarks/quiet.sh python benchmarks/adapt.py --phase ort-full --scenario 2threads --tag f1   # about 20 min
    benchmarks/quiet.sh python benchmarks/adapt.py --phase ort-split --scenario 1thread --tag s1 --adapt-tags first,second
    python benchmarks/adapt.py --phase report --adapt-tags first,second   # the adaptations scored; drift between them
        [--scenario-tags basic=third,fourth]                               # other adaptations for one scenario

Phases write into the benchmark cache (``$ARCHPASS_BENCH_CACHE``/adapt) and
``report`` writes ``benchmarks/results/adapt.json``.  The onnxruntime figures are this
machine's (its fingerprint is ``onnxruntime.host``); a report on another machine, whose
cache starts empty, keeps the earlier machines' figures in brief under
``onnxruntime.other_hosts`` (the full ones are in the repository's history).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import predictor_accuracy as pa  # noqa: E402  (exports, ZigZag whole-model truths)

RESULTS = ROOT / "results" / "adapt.json"
CLOCK_HZ = 500e6
ZIGZAG_SAMPLES = 50
ZIGZAG_FULL_SAMPLES = 420
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
    from archpass.io import atomic_write_text

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
    pa.ZIGZAG_TIMEOUT = 1800  # a shared machine slows ZigZag down; a timeout is evaluated again
    jobs = [(n, "ascend_like", str(models[n][2]), str(hw), str(mp), 4, CLOCK_HZ) for n in ZIGZAG_MODELS
            if n not in truths or "TimeoutError" in truths[n].get("error", "")]
    with mp_.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
        for name, _, res in pool.imap_unordered(pa._zigzag_truth, jobs):
            truths[name] = res
            _save(path, truths)
            print(f"zigzag ascend_like {name}: {res}", file=sys.stderr, flush=True)


def phase_zigzag_measure(args) -> None:
    """The two ZigZag targets the report compares with the adaptation's, in the cache
    (CPU work; each resumes from its dataset): ``edgetpu`` adapted from ZIGZAG_SAMPLES
    layer evaluations (``calibrate --adapt edgetpu --backend zigzag``), and a full
    calibration from ZIGZAG_FULL_SAMPLES sampled layers (``calibrate --backend zigzag``)."""
    from archpass.costmodel.adapt import adapt_zigzag
    from archpass.costmodel.calibrate import calibrate_zigzag

    hw, mp = zigzag_yamls()

    def progress(label):
        return lambda done, total, err: print(f"zigzag {label}: {done}/{total} {err}", file=sys.stderr, flush=True)

    adapt_zigzag(base="edgetpu", name="ascend_adapted", out_dir=work_dir() / "ascend_adapted", hardware=hw, mapping=mp,
                 samples=ZIGZAG_SAMPLES, workers=args.workers, progress=progress("adapted"))
    calibrate_zigzag(name="ascend_full", out_dir=work_dir() / "ascend_full", hardware=hw, mapping=mp, clock_hz=CLOCK_HZ,
                     samples=ZIGZAG_FULL_SAMPLES, workers=args.workers, progress=progress("full calibration"))


# ------------------------------------------------------------------ scoring
def score(rows: list[dict]) -> dict:
    import numpy as np

    ok = [r for r in rows if "measured_ms" in r]
    errs = np.array([abs(r["error_pct"]) for r in ok])
    if not len(errs):
        return {"models": 0}
    ratio = np.array([1 + r["error_pct"] / 100 for r in ok])
    # the shape alone: every prediction divided by the geometric mean of predicted/measured,
    # what is left when the host's speed at the time of the measurement (every model moving
    # together) is taken out
    shape = np.abs(ratio / np.exp(np.mean(np.log(ratio))) - 1) * 100
    return {"models": len(ok), "within_10pct": float(np.mean(errs <= 10) * 100),
            "within_20pct": float(np.mean(errs <= 20) * 100), "mape_pct": float(errs.mean()),
            "max_abs_error_pct": float(errs.max()),
            "mean_error_pct": float(np.mean([r["error_pct"] for r in ok])),  # the level: every model moving together
            "within_10pct_level_taken_out": float(np.mean(shape <= 10) * 100)}


def score_variants(prefix: str, variants: dict, models, truths: dict) -> dict:
    """Rows and figures of every target in ``variants`` (a target, or its predictions from
    :func:`predict`) against ``truths``, printed."""
    out = {}
    for label, t in variants.items():
        rows = rows_for(t, models, truths)
        s = out[label] = {**score(rows), "rows": rows}
        print(f"{prefix} {label:32s} within ±10%: {s.get('within_10pct', 0):5.1f}% of {s['models']}  "
              f"MAPE {s.get('mape_pct', float('nan')):5.1f}%  max {s.get('max_abs_error_pct', float('nan')):5.1f}%")
    return out


def predict(target, models) -> dict[str, float]:
    """A target's whole-model latency of each model, in ms: what the report scores against
    every set of truths (a target's predictions do not change with the truths), so that a
    report holds no more than one fitted target at a time."""
    from archpass.costmodel import estimate

    return {name: estimate(structure, target, best_order=False).latency_ms
            for name, (_, structure, _) in models.items()}


def rows_for(target, models, truths: dict) -> list[dict]:
    """Each model's prediction by ``target`` (a target, or its :func:`predict` dict) against ``truths``."""
    pred = target if isinstance(target, dict) else predict(target, models)
    rows = []
    for name in models:
        row = {"model": name, "predicted_ms": pred[name]}
        t = truths.get(name) or {}
        if "ms" in t:
            row.update(measured_ms=t["ms"], error_pct=(pred[name] / t["ms"] - 1) * 100)
        rows.append(row)
    return rows


def rss_gib() -> float:
    """This process's peak resident memory, in GiB (the report prints it as it goes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------ phase: ZigZag comparison
def phase_zigzag(args) -> dict:
    """Adapted (50 layers), from scratch on the same 50, full calibration, the base as is."""
    from dataclasses import replace

    from archpass.costmodel import load_target
    from archpass.costmodel.adapt import refit
    from archpass.costmodel.adapt_fit import METHODS, PER_KIND
    from archpass.costmodel.calibrate import DATASET, Dataset, fit_predictors

    truths = _json(work_dir() / "zigzag_truths.json", {})
    names = [n for n in ZIGZAG_MODELS if "ms" in truths.get(n, {})]
    models = load_models(names)
    adapted = load_target(work_dir() / "ascend_adapted")
    shell = replace(adapted, prior=None, corrections={}, accuracy={}, path=None)
    ds = Dataset(work_dir() / "ascend_adapted" / DATASET)
    same = ds.points()
    scratch = replace(shell, predictors=fit_predictors(shell, same)[0])
    full_ds = Dataset(work_dir() / "ascend_full" / DATASET)
    full_pts = full_ds.points()
    full = replace(shell, predictors=fit_predictors(shell, full_pts)[0])
    base = load_target("edgetpu")
    variants = {"adapted": adapted, "from_scratch_same_50": scratch, "full_calibration": full, "base_edgetpu_as_is": base}
    variants = {k: predict(t, models) for k, t in variants.items()}
    for m in (*METHODS, PER_KIND):
        variants[f"adapted[{m}]"] = predict(refit(work_dir() / "ascend_adapted", m), models)
    out = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "held_out_models": names,
           "truth": "ZigZag whole-model evaluation, ascend_like (16x16 K x C, 2x2 OX x OY), "
           f"lpf_limit 4, {CLOCK_HZ / 1e6:.0f} MHz",
           "layer_evaluations": {"adapted": len(ds.records), "from_scratch_same_50": len(ds.records),
                                 "full_calibration": len(full_ds.records),
                                 "full_calibration_failed": len(full_ds.failed)},
           "adapted_method": adapted.accuracy.get("method"),
           "adapted_cross_validation": adapted.accuracy.get("cross_validation"),
           "targets": score_variants("zigzag", variants, models, truths)}
    _save(work_dir() / "zigzag_report.json", out)
    return out


# ------------------------------------------------------------------ phase: onnxruntime (each run via benchmarks/quiet.sh)
#: the issue's two simulated new hosts, and the base's own setting adapted to this host
#: (what ``calibrate --adapt cpu`` does by default: it separates what full graph
#: optimizations cost the adaptation from what a second thread does)
#: the base target's own setting, timed too: how right ``cpu`` is on this host before adapting
BASE_SCENARIO = {"1thread": {"threads": 1, "graph_opt": "all"}}
SCENARIOS = {"2threads": {"threads": 2, "graph_opt": "all"}, "basic": {"threads": 1, "graph_opt": "basic"},
             **BASE_SCENARIO}
BUDGET_S = 60.0


def adapt_run(sc: str, tag: str, seed: int = 0, windows: int = 3, spread_s: float | None = None,
              warmup_s: float | None = None) -> dict:
    """One adaptation of ``cpu`` to scenario ``sc`` with the plan drawn from ``seed`` (its
    own quiet section), recorded in ort_runs.json.  ``warmup_s``: the least time of untimed
    runs before each one-thread timed block instead of ``adapt_measure.WARMUP_MIN_S_1T`` (0:
    the run count alone, as before that setting existed; for side-by-side comparisons)."""
    import shutil

    from archpass.costmodel import adapt_measure
    from archpass.costmodel.adapt import adapt_onnxruntime
    from archpass.costmodel.adapt_measure import WARMUP_RUNS_1T, WARMUP_RUNS_MT

    if warmup_s is not None:
        adapt_measure.WARMUP_MIN_S_1T = warmup_s

    d = work_dir() / f"ort_{sc}_{tag}"
    shutil.rmtree(d, ignore_errors=True)  # a fresh adaptation (the dataset would resume an earlier one)
    t0 = time.time()
    extra = {} if spread_s is None else {"spread_s": spread_s}
    t = adapt_onnxruntime(base="cpu", name=f"cpu_{sc}", out_dir=d, budget_s=BUDGET_S, seed=seed, windows=windows,
                          progress=lambda m: print(f"adapt {sc}: {m}", file=sys.stderr, flush=True), **SCENARIOS[sc],
                          **extra)
    entry = {"dir": str(d), "seed": seed, "windows": windows, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "wall_seconds": round(time.time() - t0, 1), "measurement": t.accuracy["measurement"],
             "method": t.accuracy["method"], "network_fit": t.accuracy.get("network_fit"),
             "cross_validation": t.accuracy["cross_validation"],
             # untimed runs before each timed block (one thread: none before this setting existed;
             # several threads: one before)
             "warmup_runs_1t": WARMUP_RUNS_1T, "warmup_runs_mt": WARMUP_RUNS_MT,
             # and their least time with one thread (none before this setting existed; the
             # 2-thread rounds q1 and q2 of the eleventh machine had it at 2 threads too)
             "warmup_min_s_1t": adapt_measure.WARMUP_MIN_S_1T}
    print(f"adapted {sc} ({tag}): {entry['measurement']['seconds']} s of measurement, "
          f"{entry['measurement']['networks']} networks, method {entry['method']}", file=sys.stderr)
    path = work_dir() / "ort_runs.json"
    doc = _json(path, {})
    doc.setdefault("adaptations", {}).setdefault(tag, {})[sc] = entry
    _save(path, doc)
    return entry


def canonical_protos(names) -> dict:
    """The held-out models as canonical ONNX (written by :func:`load_models` before the quiet section)."""
    import onnx

    return {n: onnx.load(str(pa.cache_dir() / f"{n}.canonical.onnx")) for n in names}


#: windows per truth measurement.  A model's truth is the mean of the faster half of its
#: windows (``measure.combine``; it was their median, which followed slow stretches of the
#: host that took half of the windows); with several threads, of its fast-state windows.  At 2 threads this host alternates between
#: a fast state and slow ones for seconds to minutes at a time (MobileNetV2 1.8, 2.7 or
#: 7.8 ms, while the one-thread time of the same moments does not move; pinning threads
#: does not change it, and no process of the guest is busy): the hypervisor keeps a virtual
#: core busy with other work.  A median of a few windows lands in either state at random
#: (two truth measurements of the first protocol differed by 11.8% median).  Every window
#: is preceded and followed by a probe reading (:mod:`archpass.costmodel.hoststate`, as in
#: the adaptation), waits for the fast state (up to 10 s), and is taken again (up to twice)
#: when the probe showed a slow state; a window's latency is the 25th percentile of its
#: runs with several threads (``hoststate.run_statistic``, as in the adaptation).  All
#: windows are kept, so the report also gives the median over every window and the share
#: of slow-state windows.
TRUTH_WINDOWS = 7
TRUTH_PROTOCOL = 4  # earlier protocols (no probe, window medians with several threads) are not combined
TRUTH_RUNS, TRUTH_MIN_S = 10, 0.15
#: truth measurements taken this close to an adaptation (before or after it) are its
#: same-period reference: the host's speed drifts over hours (four truth measurements of
#: one morning differed by 4.4% median, up to 15%, every model moving together)
NEARBY_S = 20 * 60


def ort_truths(protos: dict, windows: int = TRUTH_WINDOWS, only: str | None = None) -> dict:
    """Whole-model latency per scenario: ``windows`` interleaved windows (every model and
    scenario once per window, sessions built once, so a model's windows spread over the
    whole measurement), each the protocol of :func:`archpass.costmodel.measure.timed_window`
    (>= TRUTH_RUNS runs and >= TRUTH_MIN_S s after a pause and an untimed run, started in a
    quiet moment and, with several threads, in the host's fast state, taken again up to
    twice when other processes kept a needed core busy or the probe showed the slow
    state); a model's latency is :func:`~archpass.costmodel.measure.combine` of its
    windows (the mean of the faster half of the fast-state ones), as ``inspect --measure``
    times a model.  ``only``: that scenario alone (a shorter measurement)."""
    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import random_feeds, session_options
    from archpass.costmodel.hoststate import ParallelProbe
    from archpass.costmodel.measure import combine, timed_window

    scen = {sc: kw for sc, kw in {**BASE_SCENARIO, **SCENARIOS}.items() if only is None or sc == only}
    res = {sc: {n: {"windows": [], "other_cores": [], "probe_ms": []} for n in protos} for sc in scen}
    probes = {kw["threads"]: ParallelProbe(kw["threads"]) for kw in scen.values() if kw["threads"] > 1}
    sessions = {}
    for name, proto in protos.items():
        feeds = random_feeds(proto)
        for sc, kw in scen.items():
            s = ort.InferenceSession(proto.SerializeToString(), session_options(kw["threads"], graph_opt=kw["graph_opt"]),
                                     providers=["CPUExecutionProvider"])
            for _ in range(3):
                s.run(None, feeds)
            sessions[name, sc] = (s, feeds)
    for w in range(windows):
        for name in protos:
            for sc, kw in scen.items():
                s, feeds = sessions[name, sc]
                got = timed_window(s, feeds, kw["threads"], probes.get(kw["threads"]), TRUTH_RUNS, TRUTH_MIN_S)
                res[sc][name]["windows"].append(got.ms)
                res[sc][name]["other_cores"].append(got.other_cores)
                res[sc][name]["probe_ms"].append(got.probe_ms)
        print(f"truth window {w + 1}/{windows} done", file=sys.stderr, flush=True)
    for sc, kw in scen.items():
        best = probes[kw["threads"]].best if kw["threads"] in probes else None
        for name, d in res[sc].items():
            d["ms"] = combine(d["windows"], d["probe_ms"], best)
            d["window_spread_pct"] = (max(d["windows"]) / min(d["windows"]) - 1) * 100
    return res


def phase_ort_truth(args) -> None:
    """One truth measurement of every held-out model in every scenario, or in ``--scenario``
    alone (its own quiet section)."""
    protos = canonical_protos(ORT_MODELS)
    settle()
    t0 = time.time()
    truths = ort_truths(protos, only=args.scenario)
    path = work_dir() / "ort_runs.json"
    doc = _json(path, {})
    doc.setdefault("truths", {})[args.tag] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "seconds": round(time.time() - t0, 1), "protocol": TRUTH_PROTOCOL,
                                              "scenarios": truths}
    _save(path, doc)


def settle(threads: int = 2, max_wait: float = 180.0) -> float:
    """Wait (inside the quiet section) until no other process keeps a core busy: processes
    that ignore the lock (or outlive it) would otherwise be timed with ours."""
    from archpass.costmodel.adapt_measure import wait_quiet

    waited = wait_quiet(threads, max_wait, window=1.0)
    print(f"waited {waited:.0f} s for a quiet host", file=sys.stderr, flush=True)
    return waited


def need_scenario(args) -> None:
    """The one-line message of a phase that times a scenario's setting run without ``--scenario``."""
    if args.scenario is None:
        raise SystemExit(f"--phase {args.phase} needs --scenario (" + ", ".join(SCENARIOS) + ")")


def phase_ort_adapt(args) -> None:
    need_scenario(args)
    settle()
    adapt_run(args.scenario, args.tag, args.seed, args.windows, args.spread_s, args.warmup_s)


def full_samples() -> int:
    """Generated networks of a full onnxruntime calibration: as many as the built-in
    ``cpu`` was made from (``costmodel/build_targets.py``)."""
    from archpass.costmodel.build_targets import BUILTINS

    return int(BUILTINS["cpu"]["samples"])


def phase_ort_full(args) -> None:
    """A full calibration (``archpass calibrate --backend onnxruntime``, no ``--adapt``) in
    a scenario's setting, its own quiet section: what the adaptation's 60 s are compared
    with.  Recorded in ort_runs.json under ``full``, scored by the report against the truth
    measurements taken within :data:`NEARBY_S` of it."""
    import shutil

    from archpass.costmodel.calibrate import DATASET, Dataset, calibrate_onnxruntime

    need_scenario(args)
    settle()
    d = work_dir() / f"ort_full_{args.scenario}_{args.tag}"
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    n = full_samples()
    t = calibrate_onnxruntime(name=f"cpu_{args.scenario}_full", out_dir=d, samples=n, workers=1,
                              **SCENARIOS[args.scenario])
    entry = {"dir": str(d), "samples": n, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "wall_seconds": round(time.time() - t0, 1), "accuracy": t.accuracy}
    print(f"full calibration {args.scenario} ({args.tag}): {entry['wall_seconds']:.0f} s, "
          f"{len(Dataset(d / DATASET).records)} networks", file=sys.stderr)
    path = work_dir() / "ort_runs.json"
    doc = _json(path, {})
    doc.setdefault("full", {}).setdefault(args.tag, {})[args.scenario] = entry
    _save(path, doc)


def generated_protos(run: dict, sc: str) -> dict:
    """The generated networks an adaptation timed, from today's plan for its seed
    (:func:`plan_networks`), keyed ``gen:label``, with the latency the adaptation measured: a
    record must match a planned network's kernels (a network an earlier generator drew is
    left out, as is a ``--models`` file)."""
    from archpass.costmodel.calibrate import DATASET, Dataset

    plan = plan_networks(sc, run.get("seed", 0), run.get("windows", 3))
    out = {}
    for r in Dataset(Path(run["dir"]) / DATASET).records.values():
        n = plan.get(_kernels_key(r["all_kernels"])) if "all_kernels" in r else None
        if n is not None and n.label == (r.get("payload") or {}).get("label"):
            out[f"gen:{n.label}"] = (n.proto, float(r["plain_ms"]))
    return out


def phase_ort_split(args) -> None:
    """The held-out models and the generated networks the adaptations ``--adapt-tags`` of
    ``--scenario`` timed, measured together in interleaved windows with the truth protocol
    (its own quiet section; recorded in ort_runs.json under ``splits``).  The report splits
    each adaptation's error on the held-out models into the host's level (its own networks
    timed again now, against what it timed then) and the model's (held-out models against
    its own networks, measured in the same minutes)."""
    need_scenario(args)
    sc = args.scenario
    path = work_dir() / "ort_runs.json"
    doc = _json(path, {})
    tags = [t for t in args.adapt_tags.split(",") if sc in doc.get("adaptations", {}).get(t, {})]
    if not tags:
        raise SystemExit(f"--phase ort-split: no adaptation {args.adapt_tags} of {sc} in the cache: run --phase ort-adapt first")
    gen: dict = {}
    for t in tags:
        gen.update({k: v[0] for k, v in generated_protos(doc["adaptations"][t][sc], sc).items()})
    protos = {**canonical_protos(ORT_MODELS), **gen}
    print(f"split {sc}: {len(ORT_MODELS)} held-out models and {len(gen)} generated networks of {', '.join(tags)}",
          file=sys.stderr, flush=True)
    settle()
    t0 = time.time()
    res = ort_truths(protos, only=sc)[sc]
    doc = _json(path, {})  # re-read: another phase may have written meanwhile
    doc.setdefault("splits", {}).setdefault(args.tag, {})[sc] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
        "protocol": TRUTH_PROTOCOL, "adaptations": tags, "models": res}
    _save(path, doc)


def split_level_and_model(doc: dict, sc: str, tags: list[str], models: dict) -> dict:
    """Per split measurement (``--phase ort-split``) and adaptation: its error on the
    held-out models, on its own generated networks (timed again, in the same minutes), how
    much slower those networks ran now than when the adaptation timed them (the host's level
    then against now, the truth protocol now against the adaptation's then), and the
    held-out models' error relative to its own networks' (the model's share, which the
    host's level in the adaptation's minute does not touch)."""
    import numpy as np

    from archpass.analysis import analyze
    from archpass.costmodel import estimate
    from archpass.costmodel.adapt import refit

    out: dict = {}
    for stag, split in doc.get("splits", {}).items():
        if sc not in split:
            continue
        ms = {n: d["ms"] for n, d in split[sc]["models"].items()}
        for atag in split[sc]["adaptations"]:
            if atag not in tags:
                continue
            t = refit(doc["adaptations"][atag][sc]["dir"])
            pred = predict(t, models)
            real = np.array([(pred[n] / ms[n] - 1) * 100 for n in ORT_MODELS if n in ms])
            own = generated_protos(doc["adaptations"][atag][sc], sc)
            own = {k: v for k, v in own.items() if k in ms}
            gen = np.array([(estimate(analyze(p), t, best_order=False).latency_ms / ms[k] - 1) * 100
                            for k, (p, _) in own.items()])
            now_then = np.array([ms[k] / then for k, (_, then) in own.items()])
            res = {"split_when": split[sc]["when"], "adaptation_when": doc["adaptations"][atag][sc]["when"],
                   "held_out_models": len(real), "held_out_mean_error_pct": float(real.mean()),
                   "held_out_within_10pct": float(np.mean(np.abs(real) <= 10) * 100),
                   "own_networks": len(gen), "own_networks_mean_error_pct": float(gen.mean()),
                   "own_networks_within_10pct": float(np.mean(np.abs(gen) <= 10) * 100),
                   "own_networks_now_over_then_median": float(np.median(now_then)),
                   "held_out_relative_to_own_networks_pct": float(
                       (np.exp(np.mean(np.log1p(real / 100))) / np.exp(np.mean(np.log1p(gen / 100))) - 1) * 100)}
            out[f"{stag}/{atag}"] = res
            print(f"ort {sc} split {stag}, adapted_{atag}: held-out mean {res['held_out_mean_error_pct']:+.1f}% "
                  f"({res['held_out_within_10pct']:.0f}% within ±10%), its own {len(gen)} networks "
                  f"{res['own_networks_mean_error_pct']:+.1f}%, timed {res['own_networks_now_over_then_median']:.3f}x "
                  f"what the adaptation timed; held-out relative to own networks "
                  f"{res['held_out_relative_to_own_networks_pct']:+.1f}%", file=sys.stderr)
    return out


def phase_prepare(args) -> None:
    """Export and canonicalize the held-out models (CPU work, outside any quiet section)."""
    load_models(ORT_MODELS)


def combined_truths(doc: dict, keys=None) -> tuple[dict, dict]:
    """Per scenario and model: the median over every truth measurement of the current
    protocol (or those named by ``keys``) of each one's latency, as ``inspect --measure``
    takes it (:func:`~archpass.costmodel.measure.combine`: the mean of the faster half of
    the fast-state windows, against the best probe reading of all those measurements), and
    how much two truth measurements (taken at different times) differ."""
    import numpy as np

    from archpass.costmodel.adapt_measure import allowed_other_cores
    from archpass.costmodel.hoststate import slow_state
    from archpass.costmodel.measure import combine

    runs = [r for k, r in doc.get("truths", {}).items()
            if r.get("protocol") == TRUTH_PROTOCOL and (keys is None or k in keys)]
    out: dict = {}
    stability: dict = {}
    for sc, kw in {**BASE_SCENARIO, **SCENARIOS}.items():
        out[sc] = {}
        diffs = []
        allowed = allowed_other_cores(kw["threads"])
        probes = [p for r in runs for d in r["scenarios"].get(sc, {}).values() for p in d["probe_ms"] if p]
        best = min(probes) if probes else None
        for name in ORT_MODELS:
            per_run = [r["scenarios"][sc][name] for r in runs if name in r["scenarios"].get(sc, {})]
            if not per_run:
                continue
            # windows timed while another process kept a needed core busy are left out
            # (all of a measurement's kept when every one of them was disturbed)
            kept = []
            for r in per_run:
                rows = list(zip(r["windows"], r["other_cores"], r["probe_ms"]))
                kept.append([x for x in rows if (x[1] or 0.0) <= allowed] or rows)
            run_ms = [combine([x[0] for x in k], [x[2] for x in k], best) for k in kept]
            windows = [x[0] for k in kept for x in k]
            out[sc][name] = {"ms": float(np.median(run_ms)), "measurements_ms": run_ms,
                             "median_window_ms": float(np.median(windows)),
                             "min_window_ms": float(np.min(windows)), "windows": windows,
                             "windows_left_out": sum(len(r["windows"]) for r in per_run) - len(windows),
                             "slow_state_windows": int(sum(slow_state(x[2], best) for k in kept for x in k)),
                             "window_spread_pct": (max(windows) / min(windows) - 1) * 100}
            for i in range(len(run_ms)):  # every pair of truth measurements
                for j in range(i + 1, len(run_ms)):
                    diffs.append(abs(run_ms[j] / run_ms[i] - 1) * 100)
        if diffs:
            d = np.array(diffs)
            stability[sc] = {"median_abs_diff_pct": float(np.median(d)), "p90_abs_diff_pct": float(np.quantile(d, 0.9)),
                             "max_abs_diff_pct": float(d.max()),
                             "pairs_over_5pct": int((d > 5).sum()), "model_pairs": len(d),
                             # the host's own ceiling for the goal: how often two truth
                             # measurements of a model agree within ±10%
                             "pairs_within_10pct_pct": float(np.mean(d <= 10) * 100)}
    return out, stability


def _span(entry: dict, seconds_key: str) -> tuple[float, float]:
    """(start, end) in epoch seconds of a measurement recorded with its end time."""
    import calendar

    end = calendar.timegm(time.strptime(entry["when"], "%Y-%m-%dT%H:%M:%SZ"))
    return end - float(entry.get(seconds_key) or 0.0), float(end)


def nearby_truths(doc: dict, run: dict, within_s: float = NEARBY_S) -> dict[str, float]:
    """The truth measurements (current protocol) taken within ``within_s`` of an
    adaptation's measurement, with the gap in minutes (negative: before it)."""
    a0, a1 = _span(run, "wall_seconds")
    out = {}
    for k, r in doc.get("truths", {}).items():
        if r.get("protocol") != TRUTH_PROTOCOL:
            continue
        t0, t1 = _span(r, "seconds")
        gap = a0 - t1 if t1 <= a0 else (t0 - a1 if t0 >= a1 else 0.0)
        if gap <= within_s:
            out[k] = round((-gap if t1 <= a0 else gap) / 60.0, 1)
    return out


#: a predeclared mark of a minute the host spent above its fast state (not a rule of the
#: product): fewer than this share of the kept windows' probe readings within 10% of the
#: adaptation's best reading (the seventh machine's 2-thread q3: 1%, its other rounds 37-71%)
PLATEAU_SHARE = 0.10


def probe_profile(run: dict) -> dict | None:
    """How the probe read during a multi-threaded adaptation's kept (fast-state) windows,
    against the adaptation's best reading: their median ratio and the share within 10%
    (None with one thread: no probe)."""
    import numpy as np

    best = (run.get("measurement") or {}).get("probe_best_ms")
    path = Path(run["dir"]) / "dataset.jsonl"
    if not best or not path.is_file():
        return None
    kept = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        probe = rec.get("probe_ms") or []
        fast = rec.get("fast_windows") or range(len(probe))
        kept += [probe[i] / best for i in fast if i < len(probe) and probe[i]]
    if not kept:
        return None
    share = float(np.mean(np.array(kept) <= 1.1))
    return {"probe_best_ms": best, "kept_windows": len(kept), "kept_probe_median_over_best": round(float(np.median(kept)), 3),
            "kept_probe_share_within_10pct_of_best": round(share, 3), "plateau": share < PLATEAU_SHARE}


def pooled(near: dict) -> dict:
    """Adaptations scored against their nearby truths, together: each one's share within
    ±10% and the share over all their models."""
    import numpy as np

    each = [v["within_10pct"] for v in near.values()]
    errs = np.array([r["error_pct"] for v in near.values() for r in v["rows"]])
    return {"adaptations": len(near), "seeds": sorted({v["seed"] for v in near.values()}),
            "within_10pct_each": each, "within_10pct_min": min(each), "within_10pct_median": float(np.median(each)),
            "within_10pct_pooled": float(np.mean(np.abs(errs) <= 10) * 100), "mape_pct_pooled": float(np.mean(np.abs(errs))),
            "adaptations_meeting_90pct": int(sum(w >= 90 for w in each)),
            "probe_plateau": [k for k, v in near.items() if (v.get("probe") or {}).get("plateau")]}


#: (scenario, seed, windows) -> today's plan: its networks' labels by their kernels (not the
#: networks: their protos hold weights, and a report over many seeds ran out of memory)
_PLANS: dict[tuple, dict[str, str]] = {}


def _kernels_key(kernels: list[dict]) -> str:
    return json.dumps(kernels, sort_keys=True)


def plan_networks(sc: str, seed: int = 0, windows: int = 3) -> dict:
    """The networks today's plan (:func:`archpass.costmodel.adapt_plan.select_networks`) draws
    for scenario ``sc`` with ``seed``, as ``adapt_run`` plans them (calibrate --adapt's
    default runs), keyed by their kernels (a generator style may since have been renamed)."""
    from dataclasses import replace

    from archpass.costmodel import load_target
    from archpass.costmodel.adapt_measure import RUNS
    from archpass.costmodel.adapt_plan import select_networks
    from archpass.costmodel.host import host_fusion

    prior = load_target("cpu")
    fusion = host_fusion(prior.fusion, "CPUExecutionProvider", SCENARIOS[sc]["graph_opt"])
    nets = select_networks(replace(prior, fusion=fusion), BUDGET_S, windows, RUNS, SCENARIOS[sc]["threads"], seed)
    return {_kernels_key([{"id": k.id, "spec": k.spec()} for k in n.kernels]): n for n in nets}


def current_plan(sc: str, seed: int = 0, windows: int = 3) -> dict[str, str]:
    """:func:`plan_networks`' labels by kernels, made once per report."""
    key = (sc, seed, windows)
    if key not in _PLANS:
        _PLANS[key] = {k: n.label for k, n in plan_networks(sc, seed, windows).items()}
    return _PLANS[key]


def plan_is_current(run: dict, sc: str) -> bool:
    """Whether every network an adaptation timed is one that today's plan
    (:func:`current_plan`, same seed and scenario) draws: the adaptation measured what
    ``calibrate --adapt`` measures now."""
    from archpass.costmodel.calibrate import DATASET, Dataset

    plan = current_plan(sc, run.get("seed", 0), run.get("windows", 3))
    records = Dataset(Path(run["dir"]) / DATASET).records.values()
    return all(_kernels_key(r["all_kernels"]) in plan for r in records if "all_kernels" in r)


def drift(entry: dict, first: str, second: str) -> dict:
    """How far adaptation ``second``'s predictions of the held-out models moved from ``first``'s."""
    import numpy as np

    a = np.array([r["predicted_ms"] for r in entry["targets"][f"adapted_{first}"]["rows"]])
    b = np.array([r["predicted_ms"] for r in entry["targets"][f"adapted_{second}"]["rows"]])
    moves = np.abs(b / a - 1) * 100
    return {"median_abs_move_pct": float(np.median(moves)), "max_abs_move_pct": float(moves.max())}


def this_host() -> dict:
    """The machine the onnxruntime figures were measured on (the fingerprint a target
    records, :mod:`archpass.costmodel.host`, and onnxruntime's NCHWc block here)."""
    from archpass.costmodel.host import cpu_signature, machine, nchwc_block

    return {**machine(), "cpu_signature": cpu_signature(), "nchwc_block": nchwc_block()}


def same_plan_pairs(doc: dict, entry: dict, sc: str, tags: list[str]) -> list[dict]:
    """The drift (:func:`drift`) of every pair of ``tags`` that ran the same plan (same
    seed) in scenario ``sc``, in order, with how many hours apart their measurements began."""
    out = []
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            ra, rb = doc["adaptations"][a][sc], doc["adaptations"][b][sc]
            if ra.get("seed", 0) != rb.get("seed", 0):
                continue
            hours = abs(_span(rb, "wall_seconds")[0] - _span(ra, "wall_seconds")[0]) / 3600.0
            out.append({"tags": [a, b], "seed": ra.get("seed", 0), "hours_apart": round(hours, 2), **drift(entry, a, b),
                        **({"networks_timed_again": rep} if (rep := network_repeat(ra, rb)) else {})})
    return out


def network_repeat(ra: dict, rb: dict) -> dict:
    """The same plan's networks as two adaptations timed them: each network's latency in
    the second over the first, divided by the median of those ratios (the host's level
    taken out).  What is left is how far one network's measurement moves on its own, which
    the fit reads as the shape of the host's costs."""
    import numpy as np

    from archpass.costmodel import load_target
    from archpass.costmodel.adapt import dataset_points, target_probe_bests
    from archpass.costmodel.adapt_fit import ROUND_PREFIX
    from archpass.costmodel.calibrate import DATASET, Dataset

    ms = []
    for r in (ra, rb):
        d = Path(r["dir"])
        if not (d / DATASET).exists():
            return {}
        t = load_target(d)  # the levels the fit reads (as refit)
        got = dataset_points(Dataset(d / DATASET), t.prior, probe_bests=target_probe_bests(t)).network_ms
        ms.append({ROUND_PREFIX.sub("", k): v for k, v in got.items()})  # a round's prefix (--add)
    common = sorted(set(ms[0]) & set(ms[1]))
    if len(common) < 3:
        return {}
    ratio = np.array([ms[1][k] / ms[0][k] for k in common])
    rel = ratio / np.median(ratio)
    return {"networks": len(common), "median_ratio": float(np.median(ratio)),
            "p10_over_median": float(np.quantile(rel, 0.1)), "p90_over_median": float(np.quantile(rel, 0.9)),
            "within_10pct_of_median_pct": float(np.mean(np.abs(rel - 1) <= 0.1) * 100)}


#: what is carried of another host's onnxruntime figures (per scenario; rows left out)
CARRIED_KEYS = ("nearby_truths_current_plans", "nearby_truths_all_adaptations", "drift_current_plans",
                "drift_same_plan_pairs", "drift",
                "full_calibration_against_nearby_truths")


def _no_rows(v):
    if isinstance(v, dict):
        return {k: _no_rows(x) for k, x in v.items() if k != "rows"}
    return v


def other_hosts(earlier: dict, truths: dict) -> list[dict]:
    """The results file's onnxruntime figures from other caches, in brief: each machine's
    cache stays on it, so a report on a new machine measures only its own adaptations; the
    summaries of earlier machines (and those they carried) stay in the results file, with
    the host when it was recorded (the full figures are in the repository's history).  The
    earlier figures count as another cache's when one of their truth measurements is not
    among ``truths`` (this report's: tag -> its time), whatever the host's fingerprint:
    two virtual machines of one kind share it."""
    ort = earlier.get("onnxruntime") or {}
    out = list(ort.get("other_hosts", []))
    theirs = {k: v.get("when") for k, v in (ort.get("truth_measurements") or {}).items()}
    if "scenarios" in ort and any(truths.get(k) != w for k, w in theirs.items()):
        out.insert(0, {
            "host": ort.get("host", "not recorded (a host before the results file recorded one)"),
            "results_file_of": earlier.get("when"), "truth_measurements": len(ort.get("truth_measurements", {})),
            "truth_stability_between_measurements": ort.get("truth_stability_between_measurements"),
            "base_cpu_on_that_host_1thread": _no_rows(ort.get("base_cpu_on_this_host_1thread")),
            "scenarios": {sc: _no_rows({k: e[k] for k in CARRIED_KEYS if k in e}) for sc, e in ort["scenarios"].items()}})
    return out


# ------------------------------------------------------------------ report
def two_rounds(doc: dict, sc: str, tags: list[str], models, variants: dict) -> dict:
    """What ``calibrate --adapt ... --add`` does with two rounds: each pair of consecutive
    adaptations (in ``tags`` order) fitted together (the second's networks as round 2),
    against the truths timed within NEARBY_S of either, beside each one alone against the
    same truths."""
    import numpy as np

    from archpass.costmodel.adapt import dataset_points, round_probe_bests
    from archpass.costmodel.adapt_fit import fit_target, round_key
    from archpass.costmodel.calibrate import DATASET, Dataset
    from archpass.costmodel.target import load_target

    pairs, rows = [], {"two_rounds": [], "first_alone": [], "second_alone": []}
    for a, b in zip(tags, tags[1:]):
        ra, rb = doc["adaptations"][a][sc], doc["adaptations"][b][sc]
        # --add draws the next seed: a pair of one plan (the same networks timed twice) is
        # reported, apart, but is not what it does
        same_plan = ra.get("seed", 0) == rb.get("seed", 0)
        close = {**nearby_truths(doc, ra), **nearby_truths(doc, rb)}
        if not close:
            continue
        shell = load_target(ra["dir"])
        data = Dataset(Path(ra["dir"]) / DATASET)
        for k, rec in Dataset(Path(rb["dir"]) / DATASET).records.items():
            data.records[round_key(k, 2)] = {**rec, "key": round_key(k, 2)}
        # each round judged against its own best probe reading, as --add records it
        bests = round_probe_bests([(r.get("measurement") or {}) for r in (ra, rb)])
        both = fit_target(shell, dataset_points(data, shell.prior, probe_bests=bests))
        method, both = both.accuracy["method"], predict(both, models)
        del shell, data
        local = combined_truths(doc, set(close))[0][sc]
        got = {"two_rounds": rows_for(both, models, local), "first_alone": rows_for(variants[f"adapted_{a}"], models, local),
               "second_alone": rows_for(variants[f"adapted_{b}"], models, local)}
        entry = {"tags": [a, b], "truths": sorted(close), "method": method, "same_plan": same_plan}
        for k, r in got.items():
            if not same_plan:
                rows[k] += r
            entry[k] = score(r)
        pairs.append(entry)
        print(f"ort {sc} two rounds {a}+{b}{' (one plan)' if same_plan else ''} against {', '.join(sorted(close))}: within ±10% "
              f"{entry['two_rounds']['within_10pct']:.0f}% (mean {entry['two_rounds']['mean_error_pct']:+.1f}%); "
              f"alone {entry['first_alone']['within_10pct']:.0f}% and {entry['second_alone']['within_10pct']:.0f}%")
    if not pairs:
        return {}
    return {"pairs": pairs, "pooled_over": "the pairs of two plans (--add's next seed)",
            "pooled_within_10pct": {k: float(np.mean([abs(r["error_pct"]) <= 10 for r in v]) * 100) if v else None
                                    for k, v in rows.items()}}


def phase_report(args) -> None:
    import gc

    import numpy as np

    from archpass.costmodel import load_target
    from archpass.costmodel.adapt import refit
    from archpass.costmodel.adapt_fit import OWN_METHODS

    sys.path.insert(0, str(ROOT))
    from _common import write_results

    if (work_dir() / "zigzag_truths.json").exists() and (work_dir() / "ascend_full").exists():
        figures: dict = {"zigzag": phase_zigzag(args)}
    else:  # this cache has no ZigZag runs (--phase truths, zigzag-measure): keep the results file's, saying when
        earlier = _json(RESULTS, {})
        if "targets" not in earlier.get("zigzag", {}):
            raise SystemExit("no ZigZag runs in the cache and none in the results file: run --phase truths and "
                             "--phase zigzag-measure first")
        first = earlier["zigzag"].get("carried_from_results_file_of", earlier.get("when"))
        figures = {"zigzag": {**earlier["zigzag"], "carried_from_results_file_of": first,
                              "carried": "not measured again in this report: the cache had no ZigZag runs; these are "
                                         "the figures of the results file written then (measured before it)"}}
        print(f"zigzag: carried from the results file of {first}", file=sys.stderr)
    doc = _json(work_dir() / "ort_runs.json", {})
    if doc.get("truths"):
        models = load_models(ORT_MODELS)
        truths_all, stability = combined_truths(doc)
        for sc, st in stability.items():
            print(f"ort {sc} truth measurements against each other: median {st['median_abs_diff_pct']:.1f}% apart, "
                  f"{st['pairs_within_10pct_pct']:.0f}% of {st['model_pairs']} model pairs within ±10%", file=sys.stderr)
        current = {k: v for k, v in doc["truths"].items() if v.get("protocol") == TRUTH_PROTOCOL}
        ort: dict = {"host": this_host(), "held_out_models": ORT_MODELS,
                     "truth": "whole-model latency: the median over truth measurements of each one's latency, the mean of "
                     "the faster half of its window latencies (as inspect --measure takes it) "
                     f"({len(current)} measurements at different times, {TRUTH_WINDOWS} interleaved windows each, "
                     f">= {TRUTH_RUNS} runs >= {TRUTH_MIN_S} s per window, their median, each window started in a quiet "
                     "moment); with several threads a window is the 25th percentile of its runs and only the "
                     "fast-state windows count (a probe read around every window, archpass.costmodel.hoststate), "
                     "via benchmarks/quiet.sh",
                     "truth_measurements": {k: {"when": v["when"], "seconds": v["seconds"]} for k, v in current.items()},
                     "truth_stability_between_measurements": stability,
                     "fit": "each adaptation's stored measurement fitted by the current code (costmodel.adapt.refit)",
                     "scenarios": {}}
        base = predict(load_target("cpu"), models)
        if "1thread" in truths_all:
            ort["base_cpu_on_this_host_1thread"] = score_variants("ort 1thread", {"cpu_as_is": base}, models,
                                                                  truths_all["1thread"])["cpu_as_is"]
        for sc in SCENARIOS:
            truths = truths_all[sc]
            entry = {"truth_window_spread_pct_median": float(np.median([t["window_spread_pct"] for t in truths.values()])),
                     "truth_slow_state_windows": int(sum(t["slow_state_windows"] for t in truths.values())),
                     "truth_windows": int(sum(len(t["windows"]) for t in truths.values())), "targets": {}}
            variants = {"cpu_as_is": base}
            chosen = dict(x.split("=", 1) for x in args.scenario_tags).get(sc, args.adapt_tags)
            tags = [t for t in chosen.split(",") if sc in doc.get("adaptations", {}).get(t, {})]
            for tag in tags:
                run = doc["adaptations"][tag][sc]
                # the adaptation's stored measurement, fitted by the current code (what
                # `calibrate --adapt` would write from the same measurement today)
                t = refit(run["dir"])
                variants[f"adapted_{tag}"] = predict(t, models)
                entry[f"adaptation_{tag}"] = {**{k: v for k, v in run.items() if k not in ("cross_validation", "method",
                                                                                          "network_fit")},
                                              "method": t.accuracy["method"], "network_fit": t.accuracy["network_fit"],
                                              "layout_block": t.accuracy.get("layout_block"),
                                              # networks timed only in the host's slow state (adapt.slow_only_levels)
                                              "slow_state_scaling": t.accuracy.get("slow_state_scaling"),
                                              # how the correction was chosen, and what the kernels said of each
                                              "selection": t.accuracy.get("selection"),
                                              "held_out_kernel_lw_mape_pct": {
                                                  m: v["kernels"]["latency_weighted_mape_pct"]
                                                  for m, v in t.accuracy.get("cross_validation", {}).items()
                                                  if isinstance(v, dict) and "kernels" in v}}
                del t
                gc.collect()
                print(f"ort {sc} adapted_{tag} refitted (peak memory {rss_gib():.1f} GiB)", file=sys.stderr, flush=True)
            if tags:
                for m in OWN_METHODS:  # the transfer_* ones equal them (same hardware description)
                    variants[f"adapted_{tags[0]}[{m}]"] = predict(refit(doc["adaptations"][tags[0]][sc]["dir"], m), models)
                    gc.collect()
            entry["targets"] = score_variants(f"ort {sc}", variants, models, truths)
            # the same against the median of every window, slow states included
            every = {n: {"ms": t["median_window_ms"]} for n, t in truths.items()}
            adapted = {f"adapted_{t}": variants[f"adapted_{t}"] for t in tags}
            entry["targets_against_every_window"] = {
                k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                for k, v in score_variants(f"ort {sc} (every window)", adapted, models, every).items()}
            # the same against each truth measurement alone: how much of the error is the
            # host's speed at the time of a measurement (every model moves together)
            each: dict = {}
            alone = {tt: combined_truths(doc, {tt})[0][sc] for tt in current}
            for k, t in adapted.items():
                for tt, one in alone.items():
                    each.setdefault(k, {})[tt] = score(rows_for(t, models, one))
            entry["targets_against_each_truth_measurement"] = each
            # the same against the truth measurements taken right before and after each
            # adaptation (within NEARBY_S), combined: the host in the same period
            near: dict = {}
            for tag in tags:
                close = nearby_truths(doc, doc["adaptations"][tag][sc])
                if not close:
                    continue
                local, _ = combined_truths(doc, set(close))
                rows = rows_for(variants[f"adapted_{tag}"], models, local[sc])
                res = score(rows)
                seed = doc["adaptations"][tag][sc].get("seed", 0)
                profile = probe_profile(doc["adaptations"][tag][sc])
                near[f"adapted_{tag}"] = {"truths_minutes_from_adaptation": close, "seed": seed, **res,
                                          **({"probe": profile} if profile else {}), "rows": rows}
                print(f"ort {sc} adapted_{tag} (seed {seed}) against the truths within {NEARBY_S / 60:.0f} min ({', '.join(close)}): "
                      f"within ±10%: {res['within_10pct']:.1f}% of {res['models']}  MAPE {res['mape_pct']:.1f}%  "
                      f"max {res['max_abs_error_pct']:.1f}%  mean {res['mean_error_pct']:+.1f}%  "
                      f"(level taken out: {res['within_10pct_level_taken_out']:.0f}% within ±10%)"
                      + (f"; probe {profile['kept_probe_median_over_best']:.3f}x best, "
                         f"{100 * profile['kept_probe_share_within_10pct_of_best']:.0f}% within 10%"
                         f"{' (plateau)' if profile['plateau'] else ''}" if profile else ""))
            entry["targets_against_nearby_truths"] = near
            two = two_rounds(doc, sc, tags, models, variants)
            if two:
                entry["two_rounds_pooled"] = two
            split = split_level_and_model(doc, sc, tags, models)
            if split:
                entry["split_level_and_model"] = split
            # full calibrations in this scenario's setting (--phase ort-full), against
            # their own nearby truths
            full: dict = {}
            for ftag, runs in doc.get("full", {}).items():
                if sc not in runs:
                    continue
                close = nearby_truths(doc, runs[sc])
                if not close:
                    continue
                local, _ = combined_truths(doc, set(close))
                rows = rows_for(load_target(runs[sc]["dir"]), models, local[sc])
                res = score(rows)
                full[f"full_{ftag}"] = {"truths_minutes_from_calibration": close, "when": runs[sc]["when"],
                                        "calibration_seconds": runs[sc]["wall_seconds"],
                                        "networks": runs[sc]["samples"], **res, "rows": rows}
                print(f"ort {sc} full calibration {ftag} ({runs[sc]['samples']} networks, {runs[sc]['wall_seconds']:.0f} s) "
                      f"against the truths within {NEARBY_S / 60:.0f} min ({', '.join(close)}): within ±10%: "
                      f"{res['within_10pct']:.1f}% of {res['models']}  MAPE {res['mape_pct']:.1f}%  mean {res['mean_error_pct']:+.1f}%")
            if full:
                entry["full_calibration_against_nearby_truths"] = full
            if near:  # every adaptation of the scenario together: how much a result depends on the plan's draw and the hour
                entry["nearby_truths_all_adaptations"] = pooled(near)
                print(f"ort {sc}: {len(near)} adaptations, within ±10% of their nearby truths: "
                      f"{', '.join(f'{w:.0f}%' for w in entry['nearby_truths_all_adaptations']['within_10pct_each'])} "
                      f"(pooled {entry['nearby_truths_all_adaptations']['within_10pct_pooled']:.1f}%)")
                # the adaptations that timed what calibrate --adapt plans today (older ones
                # timed networks of an earlier plan generator; the fit is today's for all)
                today = {k: v for k, v in near.items() if plan_is_current(doc["adaptations"][k[len("adapted_"):]][sc], sc)}
                if today:
                    entry["nearby_truths_current_plans"] = {"tags": [k[len("adapted_"):] for k in today], **pooled(today)}
                    print(f"ort {sc}: {len(today)} adaptations with today's plans ({', '.join(today)}): "
                          f"{', '.join(f'{w:.0f}%' for w in entry['nearby_truths_current_plans']['within_10pct_each'])} "
                          f"(pooled {entry['nearby_truths_current_plans']['within_10pct_pooled']:.1f}%)")
            cur = entry.get("nearby_truths_current_plans", {}).get("tags", [])
            # every pair of runs of the same plan (same seed, today's plan), however far apart
            # in time: the same adaptation at two times; the first pair is `drift_current_plans`
            pairs = same_plan_pairs(doc, entry, sc, cur)
            for p in pairs:
                rep = p.get("networks_timed_again")
                print(f"ort {sc} drift {p['tags'][0]} -> {p['tags'][1]} (today's plan, seed {p['seed']}, "
                      f"{p['hours_apart']:.1f} h apart): median {p['median_abs_move_pct']:.1f}%, "
                      f"max {p['max_abs_move_pct']:.1f}%"
                      + (f"; its {rep['networks']} networks timed again: {rep['median_ratio']:.3f}x (level), each "
                         f"{rep['p10_over_median']:.2f}-{rep['p90_over_median']:.2f}x of that (p10-p90), "
                         f"{rep['within_10pct_of_median_pct']:.0f}% within ±10%" if rep else ""))
            if pairs:
                entry["drift_same_plan_pairs"] = pairs
                first = pairs[0]
                entry["drift_current_plans"] = {"tags": first["tags"], "median_abs_move_pct": first["median_abs_move_pct"],
                                                "max_abs_move_pct": first["max_abs_move_pct"],
                                                "first": doc["adaptations"][first["tags"][0]][sc]["when"],
                                                "second": doc["adaptations"][first["tags"][1]][sc]["when"]}
            if len(tags) >= 2:
                d = drift(entry, tags[0], tags[1])
                seeds = [doc["adaptations"][t][sc].get("seed", 0) for t in tags[:2]]
                entry["drift"] = {**d, "first": entry[f"adaptation_{tags[0]}"]["when"],
                                  "second": entry[f"adaptation_{tags[1]}"]["when"], "seeds": seeds,
                                  "same_plan": seeds[0] == seeds[1]}
                print(f"ort {sc} drift between the two adaptations (seeds {seeds[0]}, {seeds[1]}"
                      f"{'' if seeds[0] == seeds[1] else ': two plans, not the same adaptation'}): "
                      f"median {d['median_abs_move_pct']:.1f}%, max {d['max_abs_move_pct']:.1f}%")
            ort["scenarios"][sc] = entry
        ort["other_hosts"] = other_hosts(_json(RESULTS, {}), {k: v["when"] for k, v in ort["truth_measurements"].items()})
        figures["onnxruntime"] = ort
    elif "onnxruntime" in _json(RESULTS, {}):  # this cache has no truths: keep the results file's, saying so
        figures["onnxruntime"] = {**_json(RESULTS, {})["onnxruntime"], "carried": "not measured again in this report: "
                                  "the cache had no truth measurement (--phase ort-truth)"}
    else:
        figures["onnxruntime"] = {"not_measured": "no truth measurement (benchmarks/adapt.py --phase ort-truth via "
                                  "benchmarks/quiet.sh) was taken"}
    path = write_results("adapt", figures)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", required=True,
                    choices=["truths", "zigzag-measure", "zigzag", "prepare", "ort-truth", "ort-adapt", "ort-full", "ort-split",
                             "report"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="first",
                    help="ort-truth / ort-adapt / ort-full / ort-split: which measurement (first, second, ...)")
    ap.add_argument("--scenario", choices=list(SCENARIOS),
                    help="ort-adapt / ort-full / ort-split: which scenario's setting; ort-truth: that scenario alone")
    ap.add_argument("--seed", type=int, default=0, help="ort-adapt: the seed the plan's networks are drawn from")
    ap.add_argument("--spread-s", type=float, default=None,
                    help="ort-adapt: seconds between the starts of window rounds (the adaptation's default when omitted)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="ort-adapt: least seconds of untimed runs before each one-thread timed block (default: the code's "
                         "WARMUP_MIN_S_1T; 0 = the run count alone, the protocol before it)")
    ap.add_argument("--windows", type=int, default=3,
                    help="ort-adapt: timing windows per network (calibrate --adapt's default: 3)")
    ap.add_argument("--adapt-tags", default="first,second",
                    help="report: the adaptations scored (the first two give the drift; the first the per-method refits); "
                         "ort-split: the adaptations whose networks are timed with the held-out models")
    ap.add_argument("--scenario-tags", action="append", default=[], metavar="SCENARIO=T1,T2",
                    help="report: the adaptations scored for one scenario, instead of --adapt-tags (repeatable)")
    args = ap.parse_args(argv)
    {"truths": phase_truths, "zigzag-measure": phase_zigzag_measure, "zigzag": phase_zigzag, "prepare": phase_prepare,
     "ort-truth": phase_ort_truth, "ort-adapt": phase_ort_adapt, "ort-full": phase_ort_full, "ort-split": phase_ort_split,
     "report": phase_report}[args.phase](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
