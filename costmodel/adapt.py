"""Adapting a target to a new device from a few measurements (``archpass calibrate --adapt``).

A full calibration costs hundreds of measurements.  A new device is usually close to one
archpass already knows (another accelerator array, the same CPU with more threads or
another onnxruntime setting, another host), so adaptation keeps a known target as the
*prior* and learns only how the new device differs:

1. **Choose the measurements that tell the most** (:mod:`~archpass.costmodel.adapt_plan`:
   :func:`select_layers`, :func:`select_networks`): the kernels that dominate the models
   the user cares about (``--models``), then a spread over the shapes the passes produce,
   within ``--samples`` (ZigZag) or ``--budget-s`` seconds of measurement (onnxruntime).
2. **Measure robustly** (onnxruntime, :mod:`~archpass.costmodel.adapt_measure`:
   :func:`measure_networks`): interleaved windows, the mean of the faster half of them,
   measurements taken again when other processes or the host's slow state
   (:mod:`~archpass.costmodel.hoststate`) disturbed them.  What was seen is recorded in the
   target (``accuracy.measurement``).
3. **Fit a correction on top of the prior** (:mod:`~archpass.costmodel.adapt_fit`:
   :func:`fit_corrections`): the candidate corrections cross-validated by held-out network
   or layer, the best kept; runtime targets also get a whole-network fit so that the
   kernels of a network sum to its latency measured without the profiler.

This module runs the three steps (:func:`adapt_zigzag`, :func:`adapt_onnxruntime`), turns
stored records into the fit's points (:func:`dataset_points`, which takes the slow state
out of networks timed only in it, :func:`slow_only_levels`), refits a stored adaptation
(:func:`refit`) and pools rounds (``--add``, :func:`earlier_rounds`).  The names of the
three steps' modules that callers use are re-exported here.

The result is a normal target directory: ``target.json`` with the corrections and
``prior/`` (the base target), plus the adaptation's ``dataset.jsonl``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from archpass.costmodel.adapt_fit import (METHODS, PER_KIND, ROUND_PREFIX, Points, fit_corrections, fit_target,
                                          layout_blocks, round_key)
from archpass.costmodel.adapt_measure import (MIN_NETWORK_S, RUNS, SPREAD_FACTOR, SPREAD_S, measure_networks,
                                              measurement_notes, network_ms, network_points)
from archpass.costmodel.adapt_plan import select_layers, select_networks
from archpass.costmodel.calibrate import DATASET, Dataset, Job, Progress, point_key, run_jobs
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.hoststate import slow_state
from archpass.costmodel.kernels import Kernel
from archpass.costmodel.measure import window_level
from archpass.costmodel.target import Target, load_target, save_target
from archpass.errors import TargetError


def load_base(base: str | Path | Target, backend: str) -> Target:
    """The prior of an adaptation: a target of the same measurement backend."""
    t = load_target(base)
    if t.backend != backend:
        raise TargetError(f"base target '{t.name}' was measured with {t.backend}, not {backend}",
                          f"adapt a target measured with {backend} (see 'archpass targets') or pass --backend {t.backend}")
    return t


# ====================================================================== ZigZag
def adapt_zigzag(*, base: str | Path | Target, name: str, out_dir: str | Path, hardware: str | Path,
                 mapping: str | Path, clock_hz: float | None = None, samples: int = 50, workers: int = 2, seed: int = 0,
                 lpf_limit: int | None = None, models=(), description: str = "", method: str | None = None,
                 progress: Progress | None = None) -> Target:
    """Adapt a ZigZag target to another hardware/mapping from ``samples`` layer evaluations."""
    import shutil

    from archpass.costmodel.backends import zigzag as zz
    from archpass.costmodel.calibrate import zigzag_work
    from archpass.costmodel.host import package_version

    prior = load_base(base, "zigzag")
    if samples < 5:
        raise TargetError(f"--samples {samples} is too few to adapt a target", "use at least 5 (50 is the default)")
    clock = float(clock_hz or prior.clock_hz or 0)
    if clock <= 0:
        raise TargetError(f"clock {clock} Hz is not positive", "pass --clock-hz with the accelerator clock")
    lpf = int(lpf_limit or prior.source.get("lpf_limit", 4))
    zz.check_inputs(hardware, mapping)
    facts = zz.hardware_facts(hardware, mapping)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw_name, map_name = Path(hardware).name, Path(mapping).name
    for src, dst in ((hardware, out / hw_name), (mapping, out / map_name)):
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    shell = Target(
        name=name, description=description or f"ZigZag model of {facts.get('name') or hw_name}, adapted from {prior.name}",
        parallelism=int(facts["parallelism"]), dtype=prior.dtype, bytes_per_element=prior.bytes_per_element,
        clock_hz=clock, unroll=facts["unroll"], mem_bits_per_step=facts["mem_bits_per_step"], fusion=prior.fusion,
        source={"backend": "zigzag", "hardware": hw_name, "mapping": map_name, "lpf_limit": lpf,
                "zigzag_version": package_version("zigzag-dse"), "adapted_from": prior.name},
        prior=prior,
    )
    return adapt_layers(shell, out, zigzag_work, samples, workers, seed, models, method, progress,
                        {"hardware": str(hardware), "mapping": str(mapping), "clock_hz": clock, "lpf_limit": lpf})


def adapt_layers(shell: Target, out: Path, work: Callable[[dict], dict], samples: int, workers: int = 1, seed: int = 0,
                 models=(), method: str | None = None, progress: Progress | None = None, payload: dict | None = None) -> Target:
    """Measure ``samples`` chosen layers with ``work`` (a calibration job function: payload
    with ``spec`` -> record with ``points``), fit the corrections of ``shell.prior`` and
    write the adapted target to ``out``."""
    t0 = time.time()
    prior = shell.prior
    specs = select_layers(shell, prior, samples, seed, models)
    dataset = Dataset(Path(out) / DATASET)
    payload = payload or {}
    lpf = payload.get("lpf_limit")
    jobs = [Job(point_key({"spec": s, "lpf": lpf, "adapt": True}), {"spec": s, **payload}) for s in specs]
    run_jobs(jobs, work, dataset, workers, progress)
    keys = {j.key for j in jobs}
    points = dataset_points(dataset, prior, keys)
    if len(points) < 5:
        raise TargetError(f"only {len(points)} of {len(jobs)} layers could be measured ({len(dataset.failed)} failed)",
                          "check the hardware/mapping YAMLs or raise --samples")
    failed = [r for r in dataset.failed if r["key"] in keys]
    measurement = {"layers_measured": len(jobs), "failed": len(failed),
                   "failure_examples": sorted({r["error"] for r in failed})[:3], "seconds": round(time.time() - t0, 1),
                   "models": [Path(p).name for p in models]}
    return _write(shell, points, Path(out), measurement, method)


# ====================================================================== stored records -> the fit's points
#: a round's networks timed in both host states needed to take the slow state out of the
#: networks timed only in it (:func:`slow_only_levels`)
MIN_BOTH_STATES = 3


def round_probe_bests(rounds: list[dict], latest_ms: float | None = None) -> dict[str, float]:
    """Each round's best probe reading by its records' key prefix (``""`` for round 1,
    ``"r2/"`` ...), from the rounds' records (``accuracy.measurement.rounds``); the last
    round, when it does not say, takes ``latest_ms`` (a target's ``measurement.probe_best_ms``
    is its latest round's).  Rounds recorded before they carried theirs are left out."""
    out = {round_key("", i + 1): float(r["probe_best_ms"]) for i, r in enumerate(rounds) if r.get("probe_best_ms")}
    last = round_key("", max(len(rounds), 1))
    if latest_ms and last not in out:
        out[last] = float(latest_ms)
    return out


def slow_only_levels(records: dict, net: dict[str, float], probe_bests: dict[str, float]) -> tuple[dict, dict]:
    """``net`` (record key -> network latency) with the slow state taken out of the
    networks that no window of caught in the host's fast state (multi-threaded rounds):
    their latency, the faster half of slow-state windows, is divided by how much slower the
    slow state ran that round's networks timed in both states (the median over them of
    the faster half of their slow windows over the faster half of their fast ones, at
    least 1; only with :data:`MIN_BOTH_STATES` such networks in the round).  A record's
    windows are judged against its round's best probe reading (``probe_bests``, by key
    prefix: :func:`round_probe_bests`; a round without one is left as it is).  Returns the
    levels and, per round, the ratio and how many networks gave and took it.

    On a host that ran 2-thread work slowly most of the time (the tenth machine,
    docs/architecture.md) 7-24 of a round's 27-29 networks had no fast window and held
    the level up: refits of its four stored 2-thread adaptations put 43.8% of the held-out
    models within ±10% of its three truths (means +5.9 to +32.2%) as measured, 70.0%
    (means -1.1 to +9.9%) with this; two rounds measured after it was chosen, 80 and 30%
    as measured, 80 and 50% with it.  A round whose every network had a fast window is
    unchanged."""
    rounds: dict[str, list[str]] = {}
    for key in net:
        m = ROUND_PREFIX.match(key)
        rounds.setdefault(m.group(0) if m else "", []).append(key)
    out, seen = dict(net), {}
    for prefix, keys in rounds.items():
        best = probe_bests.get(prefix)
        if not best:
            continue  # one thread (no probe), or a round recorded before it kept its best reading
        ratios, slow_only = [], []
        for key in keys:
            rec = records[key]
            wins, probe = rec.get("window_plain_ms") or [], rec.get("probe_ms") or []
            if not wins or len(probe) != len(wins) or not all(probe):
                continue  # windows not all read
            slow = [slow_state(p, best) for p in probe]
            if any(slow) and not all(slow):
                ratios.append(window_level([w for w, s in zip(wins, slow) if s])
                              / window_level([w for w, s in zip(wins, slow) if not s]))
            elif all(slow):
                slow_only.append(key)
        if slow_only and len(ratios) >= MIN_BOTH_STATES:
            r = max(float(np.median(ratios)), 1.0)
            for key in slow_only:
                out[key] = net[key] / r
            seen[prefix.rstrip("/") or "r1"] = {"slow_over_fast": round(r, 4), "networks_in_both_states": len(ratios),
                                                "networks_scaled": len(slow_only)}
    return out, seen


def dataset_points(dataset: Dataset, prior: Target, keys=None, probe_bests: dict[str, float] | None = None) -> Points:
    """The adaptation points of a dataset's records (all, or ``keys``): each record's
    kernels predicted by the prior together (runtime predictors read the whole network:
    every kernel of it when the record lists them), grouped by record, with the record's
    latency without the profiler when it has one (networks timed only in the host's slow
    state: :func:`slow_only_levels`, with each round's best probe reading ``probe_bests``)."""
    kernels, ms, groups, prior_ms, net, whole = [], [], [], [], {}, {}
    for key, rec in dataset.records.items():
        pts = [p for p in rec.get("points") or [] if p.get("ms") and math.isfinite(p["ms"]) and p["ms"] > 0]
        if (keys is not None and key not in keys) or not pts:
            continue
        ks = [Kernel.from_spec(p["spec"], id=str(p.get("id", "k"))) for p in pts]
        if rec.get("all_kernels"):
            every = [Kernel.from_spec(e["spec"], id=str(e["id"])) for e in rec["all_kernels"]]
            every_ms = predict_kernels(every, prior)[0]
            at = {k.id: i for i, k in enumerate(every)}
            if all(k.id in at for k in ks):
                prior_ms.append(every_ms[[at[k.id] for k in ks]])
                whole[key] = (tuple(every), every_ms)
            else:
                prior_ms.append(predict_kernels(ks, prior)[0])
        else:
            prior_ms.append(predict_kernels(ks, prior)[0])
        kernels += ks
        ms += [float(p["ms"]) for p in pts]
        groups += [key] * len(ks)
        if rec.get("plain_ms"):
            # from the stored windows when there are (a refit follows the current statistic)
            wins = rec.get("window_plain_ms") or []
            fast = [wins[i] for i in (rec.get("fast_windows") or range(len(wins))) if i < len(wins)]
            net[key] = window_level(fast) if fast else float(rec["plain_ms"])
            whole.setdefault(key, (tuple(ks), prior_ms[-1]))
    net, scaling = slow_only_levels(dataset.records, net, probe_bests or {})
    return Points(tuple(kernels), np.concatenate(prior_ms) if prior_ms else np.zeros(0), np.array(ms), tuple(groups),
                  net, whole, scaling)


def target_probe_bests(t: Target) -> dict[str, float]:
    """An adapted target's :func:`round_probe_bests` (from its measurement record)."""
    m = t.accuracy.get("measurement") or {}
    return round_probe_bests(list(m.get("rounds") or []), m.get("probe_best_ms"))


def refit(directory: str | Path, method: str | None = None) -> Target:
    """An adapted target's corrections fitted again from its stored measurements (no new
    measurement), by ``method`` or the best cross-validated one.  Not written."""
    t = load_target(directory)
    if t.prior is None:
        raise TargetError(f"target {directory} is not an adapted target", "pass the directory 'calibrate --adapt' wrote")
    points = dataset_points(Dataset(Path(t.path) / DATASET), t.prior, probe_bests=target_probe_bests(t))
    fitted = fit_target(t, points, method)
    return replace(fitted, accuracy={**t.accuracy, **fitted.accuracy})


def _write(shell: Target, points: Points, out: Path, measurement: dict, method: str | None) -> Target:
    fitted = fit_target(shell, points, method)
    summary = dict(fitted.accuracy)
    summary["measurement"] = measurement
    summary["note"] = ("held-out figures: each fold's points predicted by corrections fitted on the other folds; "
                       "the stored corrections are fitted on all points")
    target = replace(fitted, accuracy=summary, path=out)
    save_target(target, out)
    return target


# ====================================================================== onnxruntime
#: what each round of an onnxruntime adaptation records (``accuracy.measurement.rounds``)
ROUND_KEYS = ("when", "seed", "seconds", "networks", "notes", "other_cores_median", "spread_waited_s", "models",
              "probe_best_ms")


def earlier_rounds(out: Path, prior: Target, provider: str, threads: int, graph_opt: str) -> list[dict]:
    """The measurement rounds of the adapted target in ``out`` that another round
    (``calibrate --adapt ... --add``) joins: it must have been adapted from the same base
    with the same provider, threads and graph optimization level, on this machine."""
    from archpass.costmodel.host import same_machine

    fix = "run it once without --add (the same -o), or pass the settings it was adapted with"
    if not (out / "target.json").is_file():
        raise TargetError(f"--add: {out} holds no adapted target", fix)
    try:
        before = load_target(out)
    except TargetError as e:
        raise TargetError(f"--add: {out} holds no readable target ({e.problem})", fix) from None
    src = before.source or {}
    want = {"backend": "onnxruntime", "adapted_from": prior.name, "provider": provider, "threads": threads,
            "graph_optimization": graph_opt}
    other = [f"{k} {src.get(k)!r}, not {v!r}" for k, v in want.items() if src.get(k) != v]
    if before.prior is None or other:
        raise TargetError(f"--add: {out} was adapted otherwise ({'; '.join(other) or 'not an adaptation'})", fix)
    if not same_machine(src.get("host")):
        raise TargetError(f"--add: {out} was measured on another machine",
                          "adapt into a new -o here (rounds of different machines do not pool)")
    m = before.accuracy.get("measurement") or {}
    rounds = list(m.get("rounds") or [])
    if not rounds:  # a target adapted before rounds were recorded: its networks are the unprefixed records
        keys = [k for k in Dataset(out / DATASET).records if not ROUND_PREFIX.match(k)]
        rounds = [{k: m[k] for k in ROUND_KEYS if k in m} | {"keys": keys}]
    return rounds


def adapt_onnxruntime(*, base: str | Path | Target, name: str, out_dir: str | Path,
                      provider: str = "CPUExecutionProvider", threads: int = 1, graph_opt: str = "all",
                      budget_s: float = 60.0, seed: int = 0, models=(), windows: int = 3, runs: int = RUNS,
                      spread_s: float | None = None,
                      description: str = "", method: str | None = None, pool: int = 96, add: bool = False,
                      progress: Callable[[str], None] | None = None) -> Target:
    """Adapt an onnxruntime target to this host / provider / threads / graph optimization
    level from at most ``budget_s`` seconds of measurement, its window rounds ``spread_s``
    apart (by default :data:`~archpass.costmodel.adapt_measure.SPREAD_S`, at most
    :data:`~archpass.costmodel.adapt_measure.SPREAD_FACTOR` x ``budget_s``).

    ``add``: ``out_dir`` holds a target this function adapted with the same base and
    settings on this host; measure another round (its own networks, drawn with the next
    seed) and fit on every round's networks (:func:`earlier_rounds`)."""
    import shutil

    from archpass.costmodel.backends.onnxruntime import check_graph_opt, check_provider
    from archpass.costmodel.host import fingerprint, host_fusion, package_version

    prior = load_base(base, "onnxruntime")
    check_provider(provider)
    check_graph_opt(graph_opt)
    if threads < 1:
        raise TargetError(f"--threads {threads} is not positive", "pass 1 or more")
    if budget_s < MIN_NETWORK_S:
        raise TargetError(f"--budget-s {budget_s:g} is too small to measure anything (one network takes at least "
                          f"{MIN_NETWORK_S:g} s: two sessions and {windows} timing windows)", "raise --budget-s (60 s is the default)")
    if spread_s is None:
        spread_s = min(SPREAD_S, SPREAD_FACTOR * budget_s)
    if spread_s < 0:
        raise TargetError(f"--spread-s {spread_s:g} is negative", "pass 0 (rounds back to back) or more")
    out = Path(out_dir)
    rounds = earlier_rounds(out, prior, provider, threads, graph_opt) if add else []
    seed += len(rounds)  # another round draws other networks
    this_round = len(rounds) + 1
    t_all = time.time()
    fusion = host_fusion(prior.fusion, provider, graph_opt)
    # the plan decomposes its networks with this host's layout (the prior's own predictions
    # do not read the layout flags)
    nets = select_networks(replace(prior, fusion=fusion), budget_s, windows, runs, threads, seed, models, pool,
                           progress=progress)
    got = measure_networks(nets, provider, threads, graph_opt, budget_s, windows, runs, spread_s=spread_s,
                           progress=progress)
    seen = got["seen"]
    overhead = float(prior.source.get("profiler_overhead_ms_per_node", 0.0))
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(out / DATASET)
    try:
        for n in nets:
            if n.key not in got["profiles"]:
                continue
            pts = network_points(n, *got["profiles"][n.key], overhead, threads)
            dataset.add({"key": round_key(n.key, this_round), "group": "network", "payload": {"label": n.label}, "points": pts,
                         "all_kernels": [{"id": k.id, "spec": k.spec()} for k in n.kernels],
                         "plain_ms": network_ms(n), "window_plain_ms": n.plain,
                         "other_cores": [w[2] for w in n.windows], "probe_ms": [w[3] for w in n.windows],
                         "fast_windows": n.fast})
    finally:
        shutil.rmtree(got["tmp"], ignore_errors=True)
    keys = [round_key(n.key, this_round) for n in nets if n.key in got["profiles"]]
    points = dataset_points(dataset, prior, set(keys).union(*(r["keys"] for r in rounds)),
                            round_probe_bests([*rounds, {}], seen.get("probe_best_ms")))
    if len(points) < 5 or len(keys) < 2:
        raise TargetError(f"--budget-s {budget_s:g} measured only {len(keys)} network(s)",
                          "raise --budget-s (60 s is the default)")
    notes = measurement_notes(seen, budget_s)
    oc = seen.pop("other_cores")
    measurement = {**seen, "notes": notes, "window_statistic": "mean of the faster half of the windows" if threads <= 1
                   else "mean of the faster half of the fast-state windows",
                   "kernel_window_statistic": "median" if threads <= 1 else "min of fast-state windows",
                   "networks": len(keys), "other_cores_median": float(np.median(oc)) if oc else None,
                   "other_cores_max": float(np.max(oc)) if oc else None, "total_seconds": round(time.time() - t_all, 1),
                   "models": [Path(p).name for p in models], "seed": seed,
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # every round's own record (the fit pools their networks); the target's measurement
    # figures are the latest round's, its notes every round's
    measurement["rounds"] = [*rounds, {k: measurement[k] for k in ROUND_KEYS if k in measurement} | {"keys": keys}]
    measurement["notes"] = [*(f"round {i + 1}: {n}" for i, r in enumerate(rounds) for n in r.get("notes") or []),
                            *((f"round {len(rounds) + 1}: {n}" for n in notes) if rounds else notes)]
    shell = Target(
        name=name,
        description=description or f"onnxruntime {provider}, {threads} thread(s)"
        + (f", graph optimizations {graph_opt}" if graph_opt != "all" else "") + f", adapted from {prior.name}",
        parallelism=prior.parallelism, dtype=prior.dtype, bytes_per_element=prior.bytes_per_element, clock_hz=None,
        unroll=prior.unroll, mem_bits_per_step=prior.mem_bits_per_step, fusion=fusion,
        source={"backend": "onnxruntime", "provider": provider, "threads": threads, "graph_optimization": graph_opt,
                "onnxruntime_version": package_version("onnxruntime"), "host": fingerprint(provider, threads, graph_opt),
                "profiler_overhead_ms_per_node": overhead, "adapted_from": prior.name, "budget_s": budget_s},
        prior=prior,
    )
    return _write(shell, points, out, measurement, method)


__all__ = ["adapt_zigzag", "adapt_onnxruntime", "adapt_layers", "dataset_points", "slow_only_levels", "round_probe_bests",
           "target_probe_bests", "refit",
           "fit_corrections", "fit_target", "layout_blocks", "Points", "select_layers", "select_networks",
           "measure_networks", "measurement_notes", "load_base", "earlier_rounds", "round_key", "METHODS", "PER_KIND"]

