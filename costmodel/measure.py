"""Timing a whole model on this host as an onnxruntime target runs it (its provider,
threads and graph optimization level), robustly against a noisy, shared machine: the
check of a runtime target's prediction (``archpass inspect MODEL --target T --measure``)
and the truth of ``benchmarks/adapt.py``.

The protocol is the adaptation's (:mod:`archpass.costmodel.adapt_measure`), with longer windows:
``windows`` windows, each started in a quiet moment (other processes leave the cores the
timing needs free) after a pause and an untimed run, at least ``runs`` runs and ``min_s``
seconds long, its latency the median of its runs (with several threads their 25th
percentile, :func:`~archpass.costmodel.hoststate.run_statistic`); with several threads a
probe read before and after each window detects the host's slow state
(:mod:`~archpass.costmodel.hoststate`).  A window taken while other processes kept a
needed core busy, or in the slow state, is taken again (up to ``retries`` times).  The
latency is the mean of the faster half of the fast-state windows (of every window with one
thread; :func:`window_level`, the adaptation's statistic too): the
host's undisturbed latency, which is what a target predicts.  Other load only ever slows a
window down, and on a noisy shared host whole stretches of windows run 5-20% slow; the
median follows them when they take half of the windows.  Twelve truth measurements of 20
models on such a host (``benchmarks/adapt.py``, 7 windows each) differed pairwise by a
median 4.1% and a 90th percentile 12.7% at 2 threads with the median, 2.7% and 7.9% with
the faster half (one thread 3.0/10.3 against 2.1/6.1%, basic optimizations 2.9/9.3
against 1.9/5.9%).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from archpass.errors import TargetError

WINDOWS = 5
RUNS, MIN_S = 10, 0.15
MAX_WAIT_S = 10.0  # longest wait for a quiet host (or its fast state) before a window
ANCHOR_WAIT_S = 30.0  # longest wait, before the first window, for the host's threads to run in parallel
#: a prediction further than this from the measured latency gets a note
NOTE_ERROR_PCT = 10.0


@dataclass(frozen=True)
class Window:
    """One timed window: its latency statistic (ms), the probe reading around it (None with
    one thread), the cores other processes kept busy meanwhile, how often it was taken
    again, and the seconds spent waiting for a quiet host or its fast state."""

    ms: float
    probe_ms: float | None
    other_cores: float | None
    retaken: int
    waited_s: float


def timed_window(session, feeds: dict, threads: int, probe=None, runs: int = RUNS, min_s: float = MIN_S,
                 retries: int = 2, max_wait: float = MAX_WAIT_S) -> Window:
    """One window of ``session`` (see the module's protocol)."""
    from archpass.costmodel.adapt_measure import SPIN_SETTLE_S, OtherLoad, allowed_other_cores, wait_quiet
    from archpass.costmodel.backends.onnxruntime import timed_runs
    from archpass.costmodel.hoststate import run_statistic

    allowed = allowed_other_cores(threads)
    waited = 0.0
    for attempt in range(retries + 1):
        waited += wait_quiet(threads, max_wait)
        before = None
        if probe is not None:
            dt, before = probe.wait_fast(max_wait)
            waited += dt
        with OtherLoad() as load:
            time.sleep(SPIN_SETTLE_S)  # other sessions' spinning workers stop meanwhile
            session.run(None, feeds)
            times = timed_runs(session, feeds, runs, min_s)
        state = max(before, probe.read()) if probe is not None else None
        if ((load.cores or 0.0) <= allowed and (probe is None or probe.fast(state))) or attempt == retries:
            return Window(run_statistic(times, threads), state, load.cores, attempt, waited)
    raise AssertionError("unreachable")


def window_level(ms) -> float:
    """A network's (or model's) latency from its timing windows: the mean of their faster half (of
    three windows the two fastest; of two, the faster; of one, itself).  Other load only
    ever slows a window down, and with three windows a slow spell can take two of them:
    on a shared 2-core host here, refits of 13 stored adaptations gave these
    shares of held-out models within ±10% (pooled; the same measurements):

    ============  ==========  ==========  ===========
    statistic     2 threads   1 thread    basic opt.
    ============  ==========  ==========  ===========
    median        76.4%       75.0%       85.0%
    faster half   79.3%       90.0%       90.0%
    minimum       80.0%       88.3%       91.7%
    ============  ==========  ==========  ===========

    (seven, three and three adaptations; MAPE 7.3, 7.1, 4.6% with the median, 6.6, 5.3,
    4.7% with the faster half, 6.9, 5.0, 5.9% with the minimum.  A 1-thread adaptation
    that ran through a slow spell: 35% with the median, 75% with the faster half).
    Timing the held-out models with the adaptation's protocol in a calm period put the
    faster half 1-2% below the truths' median of many windows, the minimum 2-4% below,
    the median within 1%.  (These figures are against truths taken as the median of their
    windows; the truths now take the faster half too, :func:`combine`.)"""
    w = sorted(float(x) for x in ms)
    if not w:
        raise ValueError("no timing window")
    return float(np.mean(w[: (len(w) + 1) // 2]))


def combine(windows_ms, probe_ms, best: float | None) -> float:
    """The latency of a model's windows: the mean of the faster half (:func:`window_level`)
    of the fast-state ones against the best probe reading ``best`` (of every window without
    a probe)."""
    from archpass.costmodel.hoststate import fast_windows

    idx = fast_windows(probe_ms, best) if best else range(len(windows_ms))
    return window_level([windows_ms[i] for i in idx])


def runtime_settings(target) -> tuple[str, int, str]:
    """(provider, threads, graph optimization) an onnxruntime target was measured with;
    a target of another backend is refused."""
    if target.backend != "onnxruntime":
        raise TargetError(f"target {target.name} is measured with {target.backend}, not onnxruntime, so this host "
                          "cannot time what it predicts",
                          "pass an onnxruntime target (cpu, or one `calibrate --adapt` wrote)")
    src = target.source
    return (str(src.get("provider", "CPUExecutionProvider")), int(src.get("threads", 1)),
            str(src.get("graph_optimization", "all")))


def measure_latency(proto, target, windows: int = WINDOWS, runs: int = RUNS, min_s: float = MIN_S,
                    progress: Callable[[str], None] | None = None) -> dict:
    """The latency of the model ``proto`` on this host as ``target`` runs it, with what was
    seen (see the module's protocol)."""
    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import check_provider, random_feeds, session_options
    from archpass.costmodel.hoststate import ParallelProbe, slow_state

    provider, threads, graph_opt = runtime_settings(target)
    check_provider(provider)
    if windows < 1:
        raise TargetError(f"{windows} measurement windows", "pass 1 or more")
    session = ort.InferenceSession(proto.SerializeToString(), session_options(threads, graph_opt=graph_opt),
                                   providers=[provider])
    feeds = random_feeds(proto)
    for _ in range(3):
        session.run(None, feeds)
    probe = ParallelProbe(threads, provider) if threads > 1 else None
    anchor_s = probe.anchor(ANCHOR_WAIT_S) if probe is not None else 0.0
    got: list[Window] = []
    for w in range(windows):
        got.append(timed_window(session, feeds, threads, probe, runs, min_s))
        if progress:
            progress(f"window {w + 1}/{windows}: {got[-1].ms:.3f} ms")
    best = probe.best if probe is not None else None
    states = [g.probe_ms for g in got]
    busy = [g.other_cores for g in got if g.other_cores is not None]
    return {
        "ms": combine([g.ms for g in got], states, best),
        "windows_ms": [round(g.ms, 4) for g in got],
        "statistic": "mean of the faster half of the windows, each its runs' median" if threads <= 1
        else "mean of the faster half of the fast-state windows, each its runs' 25th percentile",
        "slow_state_windows": int(sum(slow_state(s, best) for s in states)) if best else 0,
        "retaken": int(sum(g.retaken for g in got)),
        "waited_s": round(anchor_s + sum(g.waited_s for g in got), 1),
        # False: no probe reading beat the probe's one-thread time; the latency is a slow state's
        "parallel_state_seen": probe.parallel_seen if probe is not None else None,
        "other_cores_max": round(max(busy), 2) if busy else None,
        "provider": provider, "threads": threads, "graph_optimization": graph_opt,
    }


def slow_host_note(measured: dict) -> str | None:
    """A note when no probe reading of a multi-threaded measurement beat the probe's
    one-thread time: the host never ran the threads in parallel, so the latency measured
    is a slow state's, not the hardware's."""
    if measured.get("parallel_state_seen") is not False:
        return None
    return (f"the host never ran {measured['threads']} threads in parallel during the measurement: "
            f"{measured['ms']:.3f} ms is a slow state's latency; measure again when the host is quiet")


def check_note(target, predicted_ms: float, measured: dict) -> str | None:
    """A note when ``target``'s prediction is further than :data:`NOTE_ERROR_PCT` from the
    latency ``measured`` here: how far and, for a target not adapted here, the command
    that adapts it to this host.  An adapted target's error on one model tends to hold
    for models like it (the adaptation's held-out errors are per-model biases more than
    noise: the same models came out high in every adaptation of the benchmark)."""
    from archpass.costmodel.host import adapt_command, same_machine

    err = (predicted_ms / measured["ms"] - 1.0) * 100.0
    if abs(err) <= NOTE_ERROR_PCT:
        return None
    head = f"target {target.name} predicts this model {err:+.0f}% off the {measured['ms']:.3f} ms it took on this host"
    base = target.source.get("adapted_from")
    if base and same_machine(target.source.get("host")):
        return head + "; expect its estimates for models like this one to be off the same way"
    # a target adapted on another host: its base adapted here
    return head + f"; adapt the target to this host: {adapt_command(target, base=str(base) if base else None)}"


__all__ = ["measure_latency", "timed_window", "combine", "window_level", "runtime_settings", "check_note", "slow_host_note", "Window",
           "WINDOWS", "NOTE_ERROR_PCT"]
