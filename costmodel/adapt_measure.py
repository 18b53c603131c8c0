"""Timing networks robustly on a noisy, shared host, for an onnxruntime adaptation
(step 2 of :mod:`archpass.costmodel.adapt`).

Every network is timed in several interleaved windows (all networks once, then again...),
each window with and without onnxruntime's profiler; the mean of the faster half of a
network's windows counts (:func:`~archpass.costmodel.measure.window_level`).  The load
other processes put on the machine is sampled around every measurement from
``/proc/stat`` (:class:`OtherLoad`) and a measurement taken while the cores the timing
needs were busy is repeated after waiting for a quiet moment (:func:`wait_quiet`); with
several threads a probe detects the host's slow state (a virtual core kept busy by the
host, invisible to the guest's load accounting, :mod:`~archpass.costmodel.hoststate`):
such windows are repeated after waiting for the fast state and left out.  What was seen
is returned, recorded in the target and turned into notes (:func:`measurement_notes`);
:func:`network_points` turns a network's profile into kernel points for the fit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from archpass.costmodel.estimate import MIN_KERNEL_SHARE, predict_kernels
from archpass.costmodel.hoststate import SETTLE_S as PROBE_SETTLE_S
from archpass.costmodel.hoststate import slow_state
from archpass.costmodel.kernels import Kernel, decompose
from archpass.costmodel.measure import window_level
from archpass.costmodel.target import Target

MIN_NETWORK_S = 0.5  # building two sessions and timing the smallest network in three windows
MAX_WAIT_S = 5.0  # longest wait for a quiet host before one measurement is taken again
#: longest wait, before the first window, for the host to run the probe's threads in
#: parallel (:meth:`~archpass.costmodel.hoststate.ParallelProbe.anchor`)
ANCHOR_WAIT_S = 60.0
#: waits for a quiet host (or the fast state) in all: at most this many times the budget
#: (on a virtual machine whose host ran multi-threaded work slowly half of the time, a
#: 60 s budget waited 64 s with one budget of waits allowed, and then had to keep
#: slow-state windows)
WAIT_FACTOR = 3.0
#: window rounds start at least this many seconds apart (the pause is a wait, not
#: measurement), and at most SPREAD_FACTOR x the budget: the host has slow phases of a
#: minute or more in which everything runs 10-20% slow, and three rounds back to back (a
#: 60 s budget's) can all fall into one (one-thread adaptations of the same plan came out
#: +11.4, -0.9 and -2.8% on average; basic -0.1, +6.4 and +2.2%).  Spread 75 s apart,
#: eight adaptations of three scenarios in one hour came out -3.1..+0.9% (-1.2% on
#: average), each with at least 90% of the held-out models within ±10%; two 2-thread ones
#: later, next to truth measurements of a slow period, 80 and 55%; three 2-thread ones an
#: hour after those 85, 80 and 75%, two more later 90 and 75% (their misses per-model:
#: small models high).
SPREAD_S = 75.0
SPREAD_FACTOR = 1.25
#: a measurement with more than this share of its windows in the host's slow state, or
#: kept while other processes kept a needed core busy, makes a note in the adapted target:
#: its level is less sure (a 2-thread adaptation here with half of its windows in the slow
#: state, its allowance for waiting used up, predicted the held-out models 8.5% high on
#: average; ten with 3-14% of their windows slow, -2% to +4%)
UNSTABLE_SHARE = 0.25
#: with several threads, onnxruntime's idle workers spin for some milliseconds after a run:
#: a session timed right after another one shares the cores with the other's spinning
#: workers (2-thread window medians of one network then differed up to 5x).  Each timed
#: block is preceded by this pause and :data:`WARMUP_RUNS_MT` untimed runs (counted as
#: measurement time).
SPIN_SETTLE_S = 0.03
#: with several threads each timed block runs ``runs`` times and at least this long: a
#: window's latency is a low percentile of its runs (``hoststate.run_statistic``), and a
#: small network's five runs (2 ms) often fall entirely into a short slow state
MIN_BLOCK_S = 0.03
#: timed runs per block and window (each block with the profiler and again without)
RUNS = 5
#: with one thread each timed block is preceded by this many untimed runs of its session:
#: a network timed right after others starts slower (in three interleaved comparisons
#: here five runs, their median, came out a median 7.5% and up to 17% slower than long
#: windows for small generated networks, 0.5% for real models; after three untimed runs,
#: 1% and at most 10%)
WARMUP_RUNS_1T = 2
#: with several threads, the untimed runs after the pause (:data:`SPIN_SETTLE_S`): three
#: 2-thread adaptations here with four got 75, 70 and 80% of the held-out models within
#: ±10% of the truths taken around them (8-channel features), where six with one got 60-75%
WARMUP_RUNS_MT = 4
#: with one thread the untimed runs before a block also last at least this long: a small
#: network timed right after other networks needs some tens of runs to reach its steady
#: speed.  On the eleventh machine (docs/architecture.md), in six interleaved rounds, the
#: 5-run median after two untimed runs was 2.1-4.9% above a steady 0.15 s window for real
#: models of 0.6-1.3 ms (runs 3-7 of a window up to 11% above runs 60 and later), within 1%
#: with 10 ms of untimed runs; models of 3.6 ms and more within 1% either way.  Four
#: 1-thread adaptations with it got 85, 95, 85 and 95% of the held-out models within
#: ±10%, two measured between them without it 50 and 90%.  Not with several threads, whose blocks follow a pause and
#: :data:`WARMUP_RUNS_MT` runs and last :data:`MIN_BLOCK_S` (two 2-thread adaptations with
#: the floor 75 and 80%, two without 90 and 85%)
WARMUP_MIN_S_1T = 0.01


class OtherLoad:
    """Cores other processes kept busy while a measurement ran: the machine's busy time
    from ``/proc/stat`` minus this process's own CPU time, over the wall time."""

    def __enter__(self):
        from archpass.costmodel.backends.onnxruntime import cpu_times

        self._stat = cpu_times
        self.s0, self.c0, self.t0 = cpu_times(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        s1, c1, t1 = self._stat(), time.process_time(), time.perf_counter()
        self.cores = None
        if self.s0 is not None and s1 is not None and s1[0] > self.s0[0] and t1 > self.t0:
            ncpu = os.cpu_count() or 1
            busy_share = 1.0 - (s1[1] - self.s0[1]) / (s1[0] - self.s0[0])
            self.cores = max(0.0, busy_share * ncpu - (c1 - self.c0) / (t1 - self.t0))
        return False


def allowed_other_cores(threads: int) -> float:
    """How many cores other processes may keep busy while a ``threads``-thread timing runs:
    one core is kept spare besides the timing's own (two logical cores often share one
    physical core and its caches: on 2 cores, a one-thread timing ran up to 15% slower
    while another process kept the other core busy)."""
    return max((os.cpu_count() or 1) - threads - 1, 0) + 0.3


def wait_quiet(threads: int, max_wait: float, window: float = 0.2) -> float:
    """Wait (up to ``max_wait`` s) for a moment when other processes leave the cores a
    ``threads``-thread timing needs free (nothing of ours runs meanwhile, so every busy
    core is another process's).  Returns the seconds waited."""
    from archpass.costmodel.backends.onnxruntime import busy_cores

    t0 = time.perf_counter()
    allowed = allowed_other_cores(threads)
    while time.perf_counter() - t0 < max_wait:
        busy = busy_cores(window)
        if busy is None or busy <= allowed:
            break
    return time.perf_counter() - t0


@dataclass
class Network:
    """One network timed during an adaptation (a generated network or a ``--models`` file)."""

    key: str
    label: str
    proto: object
    kernels: list[Kernel]
    owner: dict
    tensor_owner: dict
    cost_s: float  # planned seconds of measurement
    windows: list = field(default_factory=list)  # per window: (first run, runs, other cores, probe ms or None)
    plain: list = field(default_factory=list)  # per window: ms without the profiler (hoststate.run_statistic)
    runs: int = 0
    sessions: tuple = ()
    fast: list = field(default_factory=list)  # indices of the fast-state windows (all with one thread)

    def fast_plain(self) -> list[float]:
        return [self.plain[i] for i in (self.fast or range(len(self.plain)))]


def warm_up(session, feeds: dict, runs: int, min_s: float) -> int:
    """Untimed runs of ``session`` before a timed block: at least ``runs`` of them, for at
    least ``min_s`` seconds in all; returns how many ran (the profiled session's profile
    holds them too)."""
    t0 = time.perf_counter()
    done = 0
    while done < runs or time.perf_counter() - t0 < min_s:
        session.run(None, feeds)
        done += 1
    return done


def planned_network(key: str, label: str, proto, base: Target, windows: int, runs: int, threads: int) -> Network:
    """A network to time: decomposed into ``base``'s kernels, with the seconds its
    measurement is planned to take (``windows`` windows of ``runs`` runs at ``threads``
    threads, from ``base``'s prediction; pessimistic on purpose)."""
    from archpass.analysis import analyze

    structure = analyze(proto)
    kernels = decompose(structure, base.fusion)
    nodes = {n.name: n for n in structure.nodes}
    owner = {n: k.id for k in kernels for n in k.nodes}
    tensor_owner = {o: k.id for k in kernels for n in k.nodes if n in nodes for o in nodes[n].outputs}
    pred_ms = float(predict_kernels(kernels, base)[0].sum())
    # each window runs the network 2 x runs times (with and without the profiler), plus
    # two sessions to build (about 0.1 s + 2 ms a node here)
    cost = windows * 2 * (runs + 1) * pred_ms / 1e3 / max(1.0, 0.7 * threads) + 2 * (0.1 + 0.002 * len(structure.nodes))
    if threads > 1:  # the pauses and untimed runs of measure_networks, two probe readings a window, blocks
        # of at least MIN_BLOCK_S
        cost += windows * 2 * (SPIN_SETTLE_S + WARMUP_RUNS_MT * pred_ms / 1e3 / (0.7 * threads))
        cost += windows * 2 * (PROBE_SETTLE_S + 0.003)
        cost += windows * 2 * max(MIN_BLOCK_S - runs * pred_ms / 1e3 / (0.7 * threads), 0.0)
    else:  # the untimed runs before each block
        cost += windows * 2 * max(WARMUP_RUNS_1T * pred_ms / 1e3, WARMUP_MIN_S_1T)
    return Network(key, label, proto, kernels, owner, tensor_owner, cost)


def measure_networks(nets: list[Network], provider: str, threads: int, graph_opt: str, budget_s: float,
                     windows: int = 3, runs: int = RUNS, retries: int = 2, spread_s: float = 0.0,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Time ``nets`` in ``windows`` interleaved windows (each window: every network
    ``runs`` times with onnxruntime's profiler and ``runs`` times without, each block after
    untimed runs: with one thread :data:`WARMUP_RUNS_1T` and for at least
    :data:`WARMUP_MIN_S_1T` (:func:`warm_up`), with several a pause,
    :data:`SPIN_SETTLE_S`, and :data:`WARMUP_RUNS_MT`), within
    ``budget_s`` seconds of measurement (wall time, sessions included, waits for a quiet
    host excluded).  The first window admits networks in order while the time they took,
    repeated for the later windows, still fits the budget; the others are dropped.  A later
    window, or another try of one, starts only when a try as long as that network's last
    one still ends within the budget (a 2-thread adaptation here that only checked the
    elapsed time before each window measured 60.3 s of a 60 s budget).  A
    measurement during which other processes kept busy a core the timing needs (more than
    :func:`allowed_other_cores` busy) is taken again after waiting (up to :data:`MAX_WAIT_S`,
    at most :data:`WAIT_FACTOR` x ``budget_s`` in all) for a quiet moment, up to ``retries`` times; the least
    disturbed try is kept.  With several threads a probe (:mod:`~archpass.costmodel.hoststate`)
    is read before and after each window: a window in the host's slow state is taken again
    the same way after waiting for the fast state, and each network's statistics use its
    fast-state windows (:attr:`Network.fast`).  Window rounds start at least ``spread_s``
    seconds of wall time apart (the pause in between is a wait, not measurement), so that
    one slow phase of the host is less likely to cover every window.  Returns what was seen."""
    import shutil
    import tempfile

    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import random_feeds, session_options, timed_runs
    from archpass.costmodel.hoststate import FAST_RATIO, ParallelProbe, fast_windows, run_statistic

    allowed = allowed_other_cores(threads)
    settle = SPIN_SETTLE_S if threads > 1 else 0.0
    min_block = MIN_BLOCK_S if threads > 1 else 0.0
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="archpass-adapt-")
    seen = {"windows": windows, "runs_per_window": runs, "min_block_s": min_block, "allowed_other_cores": allowed,
            "spread_s": spread_s, "spread_waited_s": 0.0, "remeasured": 0,
            "kept_busy": 0, "other_cores": [], "networks_dropped_by_budget": 0, "waited_s": 0.0}
    probe = ParallelProbe(threads, provider) if threads > 1 else None
    if probe is not None:
        seen.update(slow_state_remeasured=0, slow_state_kept=0, probe_fast_ratio=FAST_RATIO)
        # the best reading must be a fast-state one before windows are judged against it
        seen["waited_s"] += probe.anchor(min(ANCHOR_WAIT_S, WAIT_FACTOR * budget_s))

    def elapsed() -> float:
        """Seconds of measurement so far: wall time less the waits for a quiet host and the
        pauses that spread the window rounds."""
        return time.perf_counter() - t0 - seen["waited_s"] - seen["spread_waited_s"]

    def wait_allowance() -> float:
        return min(MAX_WAIT_S, max(WAIT_FACTOR * budget_s - seen["waited_s"], 0.0))

    try_s: dict[str, float] = {}  # per network: how long its last try took (measurement time)

    def window(n: Network) -> float:
        prof, plain, feeds, _ = n.sessions
        best = None
        start = elapsed()
        for attempt in range(retries + 1):
            before = None
            if probe is not None:  # wait for the host's fast state (not counted as measurement)
                waited, before = probe.wait_fast(wait_allowance())
                seen["waited_s"] += waited
            t_try = elapsed()
            with OtherLoad() as load:
                if settle:  # let the last session's spinning workers stop, then wake this one's
                    time.sleep(settle)
                # untimed runs before the block
                warm, warm_s = (WARMUP_RUNS_MT, 0.0) if settle else (WARMUP_RUNS_1T, WARMUP_MIN_S_1T)
                n.runs += warm_up(prof, feeds, warm, warm_s)
                first = n.runs
                done = len(timed_runs(prof, feeds, runs, min_block))
                if settle:
                    time.sleep(settle)
                warm_up(plain, feeds, warm, warm_s)
                times = timed_runs(plain, feeds, runs, min_block)
            n.runs += done
            other = load.cores if load.cores is not None else 0.0
            seen["other_cores"].append(other)
            state = None if probe is None else max(before, probe.read())
            slow = state is not None and not probe.fast(state)
            # the least disturbed try: quiet before busy, then fast state before slow
            rank = (other > allowed, slow, other)
            if best is None or rank < best[0]:
                best = (rank, (first, done, other, state), run_statistic(times, threads))
            try_s[n.key] = elapsed() - t_try
            # another try as long as this one must still end within the budget
            if (other <= allowed and not slow) or elapsed() + try_s[n.key] > budget_s or attempt == retries:
                break
            if slow:
                seen["slow_state_remeasured"] += 1
            else:  # the host is busy: wait for a quiet moment (not counted as measurement)
                seen["remeasured"] += 1
                seen["waited_s"] += wait_quiet(threads, wait_allowance())
        if best[0][0]:
            seen["kept_busy"] += 1
        if best[0][1]:
            seen["slow_state_kept"] += 1
        n.windows.append(best[1])
        n.plain.append(best[2])
        return elapsed() - start  # measurement time, waits excluded

    try:
        admitted: list[Network] = []
        per_window = 0.0  # seconds one later window of the admitted networks takes
        round_start = time.perf_counter()
        for n in nets:
            if admitted and elapsed() + (windows - 1) * per_window + n.cost_s > budget_s:
                seen["networks_dropped_by_budget"] += 1
                continue
            data = n.proto.SerializeToString()
            opt_path = os.path.join(tmp, f"{n.key}.onnx")
            so = session_options(threads, os.path.join(tmp, n.key), opt_path, graph_opt)
            prof = ort.InferenceSession(data, so, providers=[provider])
            plain = ort.InferenceSession(data, session_options(threads, graph_opt=graph_opt), providers=[provider])
            feeds = random_feeds(n.proto)
            prof.run(None, feeds)  # warm-up
            plain.run(None, feeds)
            n.runs = 1
            n.sessions = (prof, plain, feeds, opt_path)
            per_window += window(n)
            admitted.append(n)
        if progress:
            progress(f"window 1/{windows}: {len(admitted)} networks after {elapsed():.1f} s")
        for w in range(1, windows):
            if not admitted or elapsed() + try_s[admitted[0].key] > budget_s:
                break  # no window of this round would fit the budget: no pause for it either
            pause = round_start + spread_s - time.perf_counter()
            if pause > 0:  # spread the rounds over the host's phases (a wait, not measurement)
                time.sleep(pause)
                seen["spread_waited_s"] += pause
            round_start = time.perf_counter()
            for n in admitted:
                if elapsed() + try_s[n.key] > budget_s:  # a window of this network would end past the budget
                    break
                window(n)
            if progress:
                progress(f"window {w + 1}/{windows} after {elapsed():.1f} s")
        seen["seconds"] = round(elapsed(), 1)
        seen["waited_s"] = round(seen["waited_s"], 1)
        seen["spread_waited_s"] = round(seen["spread_waited_s"], 1)
        if probe is not None:  # fast-state windows against the best probe reading of the whole measurement
            for n in admitted:
                n.fast = fast_windows([w[3] for w in n.windows], probe.best)
            states = [w[3] for n in admitted for w in n.windows]
            seen.update(probe_best_ms=round(probe.best, 4), probe_median_ms=round(float(np.median(probe.readings)), 4),
                        probe_one_thread_ms=round(probe.serial_ms, 4), parallel_state_seen=probe.parallel_seen,
                        slow_state_windows=int(sum(slow_state(s, probe.best) for s in states)), windows_kept=len(states),
                        networks_without_fast_window=int(sum(all(slow_state(w[3], probe.best) for w in n.windows)
                                                             for n in admitted)))
        profiles = {n.key: (n.sessions[0].end_profiling(), n.sessions[3]) for n in admitted}
        for n in admitted:
            n.sessions = ()
        return {"seen": seen, "profiles": profiles, "tmp": tmp}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def measurement_notes(m: dict, budget_s: float) -> list[str]:
    """One line per reason to trust a measurement's level less: the host was in its slow
    state for more than :data:`UNSTABLE_SHARE` of the windows, or other processes kept a
    needed core busy for that share of the measurements (``m``: what
    :func:`measure_networks` saw)."""
    notes = []
    if m.get("parallel_state_seen") is False:
        notes.append(f"the host never ran the probe's threads in parallel (its best reading, {m['probe_best_ms']:g} ms, "
                     f"against {m['probe_one_thread_ms']:g} ms on one thread): the whole measurement was in a slow state "
                     "and predictions are likely high, small models' most; adapt again when the host is quiet")
    windows = int(m.get("windows_kept") or 0)
    slow = int(m.get("slow_state_windows") or 0)
    used_up = float(m.get("waited_s") or 0.0) >= WAIT_FACTOR * budget_s - MAX_WAIT_S
    waits = f" (waits for its fast state used up their {WAIT_FACTOR * budget_s:g} s)" if used_up else ""
    if windows and slow >= windows:
        # no network timed in the fast state: the level is the slow state's (two 2-thread
        # adaptations on a host whose median probe reading at 2 threads was 0.91 and 1.07
        # of its one-thread time came out +17 and +29% on average against the fast
        # state's truths)
        notes.append(f"the host ran multi-threaded work slowly during all {windows} windows{waits}: no network was "
                     "timed in its fast state, so predictions are likely high by tens of percent; adapt again when "
                     "the host is quiet")
    elif windows and slow > UNSTABLE_SHARE * windows:
        # two such 2-thread adaptations (50 of 63 and 34 of 111 windows slow) came out +14.8
        # and +18.7% on average, where the host's other adaptations of those hours were
        # within 5% (docs/architecture.md, fifth and seventh machines)
        notes.append(f"the host ran multi-threaded work slowly during {slow} of {windows} windows{waits}"
                     ": predictions may be high by up to about 20%; adapt again when the host is quiet, "
                     "or add a round later with --add")
    taken = windows or len(m.get("other_cores") or ())
    busy = int(m.get("kept_busy") or 0)
    if taken and busy > UNSTABLE_SHARE * taken:
        notes.append(f"{busy} of {taken} measurements were kept while other processes kept a needed core busy: "
                     "predictions may be high; adapt again when the machine is idle")
    return notes


def network_ms(n: Network) -> float:
    """A timed network's latency without the profiler: :func:`~archpass.costmodel.measure.window_level` of its
    windows (with several threads, of its fast-state windows, :attr:`Network.fast`)."""
    return window_level(n.fast_plain())


def kernel_window_statistic(threads: int):
    """How a profiled kernel's windows combine: the median with one thread; with several
    the minimum over the fast-state windows.  Short slow states slip between the probe's
    readings (a small network's three probed-fast windows read 0.66, 0.41 and 0.65 ms
    here) and only ever slow a window down, most for the smallest kernels; the kernels
    shape the correction, the networks' medians set its level.  (Kernel medians, tried in
    four 2-thread adaptations, predicted MobileNetV3-Small 16-39% high; four with the
    minimum, from the same plans, 8-12%.)"""
    return np.median if threads <= 1 else np.min


def network_points(n: Network, profile_path: str, optimized_path: str, overhead_ms: float,
                   threads: int = 1) -> list[dict]:
    """Kernel points of one timed network: per window the 30th percentile of each kernel's
    per-run times, combined over windows (:func:`kernel_window_statistic`), less the profiler's
    per-node overhead."""
    import json as _json

    import onnx

    from archpass.costmodel.backends.onnxruntime import attribute
    from archpass.costmodel.calibrate import robust_ms

    with open(profile_path) as f:
        events = _json.load(f)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
    optimized = onnx.load(optimized_path, load_external_data=False) if os.path.exists(optimized_path) else None
    times, _, counts = attribute(per_node, optimized, n.owner, n.tensor_owner)
    out = []
    for k in n.kernels:
        ts = times.get(k.id)
        if not ts:
            continue
        kept = [n.windows[i] for i in (n.fast or range(len(n.windows)))]
        per_window = [robust_ms(ts[w[0]: w[0] + w[1]]) for w in kept if len(ts) >= w[0] + w[1]]
        if not per_window:
            continue
        ms = float(kernel_window_statistic(threads)(per_window))
        out.append({"spec": k.spec(), "id": k.id, "nodes": counts.get(k.id, 0),
                    "ms": max(ms - overhead_ms * counts.get(k.id, 0), MIN_KERNEL_SHARE * ms)})
    return out


__all__ = ["measure_networks", "measurement_notes", "network_ms", "network_points", "kernel_window_statistic",
           "Network", "planned_network", "OtherLoad", "allowed_other_cores", "wait_quiet", "RUNS", "MIN_NETWORK_S",
           "SPREAD_S", "SPREAD_FACTOR", "WAIT_FACTOR", "MAX_WAIT_S", "UNSTABLE_SHARE", "WARMUP_MIN_S_1T", "warm_up"]
