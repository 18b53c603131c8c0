"""The host-state probe: a valid probe model, the fast-state test, waiting for the fast
state, and multi-threaded adaptation measurement that repeats and leaves out slow-state
windows."""

from __future__ import annotations

import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
from builders import NetBuilder

from archpass.costmodel import adapt_measure, hoststate, load_target
from archpass.costmodel.hoststate import FAST_RATIO, SERIAL_SHARE, ParallelProbe, fast_windows, probe_model, slow_state
from archpass.model import load_model


def test_probe_model_is_valid_and_runs():
    m = probe_model(channels=16, size=8, blocks=2)
    onnx.checker.check_model(m, full_check=True)
    x = np.ones((1, 16, 8, 8), np.float32)
    (y,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.shape == (1, 16, 8, 8) and np.all(y >= 0)  # ends in a ReLU
    assert [n.op_type for n in m.graph.node] == ["Conv", "Conv", "Relu"] * 2


def test_real_probe_reads_and_keeps_its_best():
    p = ParallelProbe(2)
    a, b = p.read(), p.read()
    assert 0 < p.best == min(a, b) and p.readings == [a, b]
    assert p.fast(p.best) and not p.fast(p.best * FAST_RATIO * 1.01)
    # its one-thread time is the reference of parallel readings
    assert p.serial_ms > 0 and p.parallel(SERIAL_SHARE * p.serial_ms) and not p.parallel(p.serial_ms)


def _scripted(monkeypatch, readings, serial_ms=10.0):
    """A probe whose readings follow ``readings`` (the best reading so far kept as the real
    one does), taking ``serial_ms`` on one thread."""
    seq = iter(readings)

    class Fake:
        def __init__(self, *a, **k):
            self.best, self.readings, self.serial_ms = float("inf"), [], serial_ms

        def read(self):
            ms = next(seq)
            self.best = min(self.best, ms)
            self.readings.append(ms)
            return ms

        fast = ParallelProbe.fast
        wait_fast = ParallelProbe.wait_fast
        parallel = ParallelProbe.parallel
        parallel_seen = ParallelProbe.parallel_seen
        anchor = ParallelProbe.anchor
        _read_until = ParallelProbe._read_until

    monkeypatch.setattr(hoststate, "ParallelProbe", Fake)
    monkeypatch.setattr(hoststate.time, "sleep", lambda s: None)
    return Fake


def test_wait_fast_waits_for_the_fast_state_and_gives_up_at_max_wait(monkeypatch):
    fake = _scripted(monkeypatch, [1.0, 2.0, 1.9, 1.1, 2.0, 2.0])()
    assert fake.read() == 1.0
    waited, ms = fake.wait_fast(max_wait=60.0)
    assert ms == 1.1 and fake.readings == [1.0, 2.0, 1.9, 1.1]  # two slow readings, then a fast one
    waited, ms = fake.wait_fast(max_wait=0.0)  # no time to wait: the slow reading is returned
    assert ms == 2.0 and len(fake.readings) == 5


def test_anchor_waits_until_the_threads_run_in_parallel(monkeypatch):
    """A host that starts in a slow state (readings no faster than one thread's 1.0 ms):
    the anchor reads until a parallel reading, which becomes the best that later readings
    are judged against; a host that never runs the threads in parallel is seen as such."""
    fake = _scripted(monkeypatch, [1.0, 0.95, 0.9, 0.6, 0.9], serial_ms=1.0)()
    assert fake.anchor(max_wait=60.0) >= 0 and fake.readings == [1.0, 0.95, 0.9, 0.6]
    assert fake.best == 0.6 and fake.parallel_seen and not fake.fast(fake.read())  # 0.9 is slow against 0.6
    never = _scripted(monkeypatch, [1.0, 0.95], serial_ms=1.0)()
    never.anchor(max_wait=0.0)  # no time to wait: one reading
    assert never.readings == [1.0] and not never.parallel_seen
    assert never.fast(1.0)  # against its own slow best every reading looks fast: hence the anchor


def test_a_measurement_never_in_parallel_gets_a_note():
    seen = {"parallel_state_seen": False, "probe_best_ms": 0.62, "probe_one_thread_ms": 0.6, "windows_kept": 10,
            "slow_state_windows": 0}
    notes = adapt_measure.measurement_notes(seen, 60.0)
    assert len(notes) == 1 and "never ran the probe's threads in parallel" in notes[0] and "0.62 ms" in notes[0]
    assert adapt_measure.measurement_notes({**seen, "parallel_state_seen": True}, 60.0) == []
    assert adapt_measure.measurement_notes({"windows_kept": 10}, 60.0) == []  # one thread: no probe, no note


def test_fast_windows():
    assert fast_windows([1.0, 2.0, 1.2], best=1.0) == [0, 2]
    assert fast_windows([2.0, 2.5], best=1.0) == [0, 1]  # none fast: all kept
    assert fast_windows([None, 2.0], best=1.0) == [0]  # no reading (one thread): kept
    assert slow_state(FAST_RATIO * 1.01, 1.0) and not slow_state(FAST_RATIO, 1.0)
    assert not slow_state(None, 1.0) and not slow_state(5.0, None)  # no probe: never slow


def _loaded(tmp_path, proto):
    """The canonical model archpass loads (shapes inferred), as adaptation networks are."""
    path = tmp_path / f"{proto.graph.name}-{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(proto, path)
    return load_model(path).proto


def _nets(tmp_path, base, n=2):
    nets = []
    for i in range(n):
        proto = NetBuilder((1, 3, 32, 32)).conv(16 + 8 * i, 3, stride=2, act="relu").ibn(16 + 8 * i, expand=4).head(10).build()
        nets.append(adapt_measure.planned_network(f"net{i}", f"net{i}", _loaded(tmp_path, proto), base, 3, 3, 2))
    return nets


class _Quiet:
    """OtherLoad that always reports a quiet machine (the script must not depend on other processes)."""

    cores = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_slow_state_windows_are_measured_again_and_left_out(tmp_path, monkeypatch):
    """Scripted probe (two readings a try: before and after the window): every window's
    first try reads slow after it, so it is taken again; the last network's last window
    stays slow through all three tries, so it is kept but left out of the statistics."""
    base = load_target("cpu")
    nets = _nets(tmp_path, base)
    fast, slow = 1.0, 2.0
    script = [fast] + [fast, slow, fast, fast] * 5 + [fast, slow] * 3  # the anchor's reading, then the windows'
    _scripted(monkeypatch, script)
    monkeypatch.setattr(adapt_measure, "MAX_WAIT_S", 0.0)  # wait_fast reads once
    monkeypatch.setattr(adapt_measure, "OtherLoad", _Quiet)
    got = adapt_measure.measure_networks(nets, "CPUExecutionProvider", 2, "all", budget_s=60.0, windows=3, runs=2,
                                         retries=2)
    seen = got["seen"]
    assert seen["slow_state_remeasured"] == 5 + 2 and seen["slow_state_kept"] == 1 and seen["remeasured"] == 0
    assert seen["slow_state_windows"] == 1 and seen["windows_kept"] == 6 and seen["probe_best_ms"] == fast
    assert seen["parallel_state_seen"] and seen["probe_one_thread_ms"] == 10.0
    assert nets[0].fast == [0, 1, 2] and nets[1].fast == [0, 1]
    assert [w[3] for w in nets[1].windows] == [fast, fast, slow]
    assert nets[1].fast_plain() == nets[1].plain[:2]


def test_single_thread_measurement_reads_no_probe(tmp_path, monkeypatch):
    base = load_target("cpu")
    proto = NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").head(10).build()
    n = adapt_measure.planned_network("one", "one", _loaded(tmp_path, proto), base, 2, 2, 1)

    def no_probe(*a, **k):
        raise AssertionError("a one-thread measurement must not probe")

    monkeypatch.setattr(hoststate, "ParallelProbe", no_probe)
    got = adapt_measure.measure_networks([n], "CPUExecutionProvider", 1, "all", budget_s=30.0, windows=2, runs=2)
    assert "slow_state_windows" not in got["seen"] and n.fast == [] and len(n.fast_plain()) == 2


def test_single_thread_blocks_start_after_untimed_runs(tmp_path, monkeypatch):
    """With one thread each timed block follows WARMUP_RUNS_1T untimed runs of its session:
    the profiled windows' first runs skip them (the profile holds every run)."""
    base = load_target("cpu")
    proto = NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").head(10).build()
    n = adapt_measure.planned_network("one", "one", _loaded(tmp_path, proto), base, 2, 2, 1)
    monkeypatch.setattr(adapt_measure, "WARMUP_RUNS_1T", 3)
    monkeypatch.setattr(adapt_measure, "WARMUP_MIN_S_1T", 0.0)  # the count alone (the time floor: below)
    # no window is taken again because of other load on the machine (that adds runs)
    monkeypatch.setattr(adapt_measure, "allowed_other_cores", lambda threads: float("inf"))
    adapt_measure.measure_networks([n], "CPUExecutionProvider", 1, "all", budget_s=30.0, windows=2, runs=2)
    # one run when the session is built, then per window 3 untimed and 2 timed profiled runs
    assert [(w[0], w[1]) for w in n.windows] == [(1 + 3, 2), (1 + 3 + 2 + 3, 2)]
    assert n.runs == 1 + 2 * (3 + 2)


class _Sleeper:
    """A session whose run takes ``ms`` milliseconds."""

    def __init__(self, ms):
        self.ms, self.runs = ms, 0

    def run(self, outputs, feeds):
        time.sleep(self.ms / 1e3)
        self.runs += 1


def test_warm_up_runs_the_count_and_for_the_least_time():
    fast = _Sleeper(1.0)
    assert adapt_measure.warm_up(fast, {}, 2, 0.0) == 2 == fast.runs
    n = adapt_measure.warm_up(fast, {}, 2, 0.03)  # a small network: the time floor decides
    assert n == fast.runs - 2 and 5 <= n <= 31  # 30 ms of 1 ms runs (fewer when sleeps overshoot)
    slow = _Sleeper(20.0)
    assert adapt_measure.warm_up(slow, {}, 2, 0.01) == 2  # a large one: the count does


def test_untimed_runs_before_a_block_last_the_floor_and_the_profiled_windows_skip_them(tmp_path, monkeypatch):
    """With the warm-up floor a small network runs more untimed than WARMUP_RUNS_1T before
    each block; the profiled windows still point at their own timed runs: the profile holds
    every run, and the last window ends at the last run."""
    import json

    base = load_target("cpu")
    proto = NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").head(10).build()
    n = adapt_measure.planned_network("one", "one", _loaded(tmp_path, proto), base, 2, 2, 1)
    monkeypatch.setattr(adapt_measure, "WARMUP_RUNS_1T", 2)
    monkeypatch.setattr(adapt_measure, "WARMUP_MIN_S_1T", 0.02)
    monkeypatch.setattr(adapt_measure, "allowed_other_cores", lambda threads: float("inf"))
    got = adapt_measure.measure_networks([n], "CPUExecutionProvider", 1, "all", budget_s=30.0, windows=2, runs=2)
    (f1, d1), (f2, d2) = [(w[0], w[1]) for w in n.windows]
    assert d1 == d2 == 2 and f1 > 1 + 2 and f2 > f1 + d1 + 2  # more untimed runs than the count
    assert n.runs == f2 + d2
    path, _ = got["profiles"]["one"]
    with open(path) as f:
        events = json.load(f)
    per_node: dict = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node[e["name"]] = per_node.get(e["name"], 0) + 1
    assert per_node and set(per_node.values()) == {n.runs}
    shutil.rmtree(got["tmp"], ignore_errors=True)


def test_run_statistic_is_the_median_with_one_thread_and_a_low_percentile_with_several():
    runs = [1.0, 1.0, 1.1, 1.2, 3.0]  # the state changed during the window: two slow runs
    assert hoststate.run_statistic(runs, 1) == 1.1
    assert hoststate.run_statistic(runs, 2) == 1.0


def test_window_rounds_are_spread_and_the_pause_is_not_measurement(tmp_path, monkeypatch):
    """With ``spread_s`` each window round starts at least that long after the one before;
    the pause is a wait (recorded), not measurement."""
    base = load_target("cpu")
    proto = NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").head(10).build()
    nets = [adapt_measure.planned_network(f"n{i}", "n", _loaded(tmp_path, proto), base, 3, 2, 1) for i in range(2)]
    starts = []
    real = adapt_measure.OtherLoad.__enter__

    def enter(self):  # the start of every window
        starts.append(time.perf_counter())
        return real(self)

    monkeypatch.setattr(adapt_measure.OtherLoad, "__enter__", enter)
    # no window is taken again because of other load on the machine (a retaken round can outlast the spread)
    monkeypatch.setattr(adapt_measure, "allowed_other_cores", lambda threads: float("inf"))
    got = adapt_measure.measure_networks(nets, "CPUExecutionProvider", 1, "all", budget_s=30.0, windows=3, runs=2,
                                         spread_s=0.6)
    seen = got["seen"]
    span = starts[-1] - starts[0]  # the last round started at least two spreads after the first
    assert all(len(n.plain) == 3 for n in nets) and span >= 2 * 0.6 - 0.02, starts
    assert seen["spread_waited_s"] >= 0.6
    assert seen["seconds"] < span - 0.6  # the pauses are not counted as measurement


def test_no_spread_pause_when_no_later_round_fits_the_budget(tmp_path):
    """The first network is always timed; when its first window already used the budget no
    later round runs, and none is paused for."""
    base = load_target("cpu")
    proto = NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").head(10).build()
    n = adapt_measure.planned_network("n", "n", _loaded(tmp_path, proto), base, 3, 2, 1)
    t0 = time.perf_counter()
    got = adapt_measure.measure_networks([n], "CPUExecutionProvider", 1, "all", budget_s=1e-3, windows=3, runs=2,
                                         spread_s=30.0)
    assert len(n.plain) == 1 and got["seen"]["spread_waited_s"] == 0.0
    assert time.perf_counter() - t0 < 20.0
