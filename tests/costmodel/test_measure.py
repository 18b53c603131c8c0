"""Timing a whole model as an onnxruntime target runs it (costmodel/measure.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from archpass.costmodel import load_target
from archpass.costmodel.measure import check_note, combine, measure_latency, runtime_settings, slow_host_note
from archpass.errors import TargetError
from builders import NetBuilder


def _convs(n: int):
    b = NetBuilder((1, 32, 28, 28), seed=n)
    for _ in range(n):
        b.conv(32, 3)
    return b.build()


def test_more_work_measures_longer_and_what_was_seen_is_recorded():
    cpu = load_target("cpu")
    small = measure_latency(_convs(2), cpu, windows=3, runs=5, min_s=0.02)
    big = measure_latency(_convs(8), cpu, windows=3, runs=5, min_s=0.02)
    assert 0 < small["ms"] and big["ms"] > 2.0 * small["ms"]  # four times the convs
    assert len(big["windows_ms"]) == 3 and min(big["windows_ms"]) <= big["ms"] <= max(big["windows_ms"])
    assert (big["threads"], big["provider"], big["graph_optimization"]) == (1, "CPUExecutionProvider", "all")
    assert big["slow_state_windows"] == 0 and big["retaken"] >= 0 and big["waited_s"] >= 0


def test_several_threads_read_the_probe():
    two = replace(load_target("cpu"), source={**load_target("cpu").source, "threads": 2, "graph_optimization": "basic"})
    m = measure_latency(_convs(2), two, windows=2, runs=3, min_s=0.01)
    assert m["threads"] == 2 and m["graph_optimization"] == "basic"
    assert "fast-state" in m["statistic"] and 0 <= m["slow_state_windows"] <= 2 and m["ms"] > 0
    assert m["parallel_state_seen"] in (True, False)


def test_a_measurement_in_a_slow_state_throughout_gets_a_note():
    seen = {"ms": 1.5, "threads": 2, "parallel_state_seen": False}
    assert "never ran 2 threads in parallel" in slow_host_note(seen) and "1.500 ms" in slow_host_note(seen)
    assert slow_host_note({**seen, "parallel_state_seen": True}) is None
    assert slow_host_note({"ms": 1.5, "threads": 1, "parallel_state_seen": None}) is None


def test_fast_state_windows_make_the_latency():
    # the probe read 2x its best around the second window: that window is left out, and of
    # the two fast-state windows the faster one is the latency
    assert combine([1.0, 5.0, 1.2], [0.3, 0.6, 0.31], best=0.3) == pytest.approx(1.0)
    # without a probe every window counts: the mean of the faster half (two of three)
    assert combine([1.0, 5.0, 1.2], [None, None, None], best=None) == pytest.approx(1.1)


def test_a_slow_stretch_over_half_of_the_windows_does_not_set_the_latency():
    # three of five windows ran 15% slow (a slow stretch of the host): the median follows
    # them, the faster half (three of five) is pulled by only one of them
    windows = [1.15, 1.0, 1.15, 1.01, 1.15]
    assert combine(windows, [None] * 5, best=None) == pytest.approx((1.0 + 1.01 + 1.15) / 3)
    assert combine(windows, [None] * 5, best=None) < 1.06


def test_only_an_onnxruntime_target_can_be_timed_here():
    with pytest.raises(TargetError, match="edgetpu is measured with zigzag"):
        runtime_settings(load_target("edgetpu"))
    assert runtime_settings(load_target("cpu")) == ("CPUExecutionProvider", 1, "all")


def test_a_prediction_far_from_the_measurement_gets_a_note():
    from archpass.costmodel.host import fingerprint

    cpu = load_target("cpu")
    assert check_note(cpu, 1.09, {"ms": 1.0}) is None
    note = check_note(cpu, 1.25, {"ms": 1.0})
    assert "+25% off the 1.000 ms" in note
    assert note.endswith("adapt the target to this host: archpass calibrate --adapt cpu --backend onnxruntime "
                         "--threads 1 --name cpu-here --install")
    assert "-20% off" in check_note(cpu, 0.8, {"ms": 1.0})
    # adapted on this host: nothing to adapt again, the error is what to expect for models like this one
    here = replace(cpu, name="cpu-here", origin="user",
                   source={**cpu.source, "adapted_from": "cpu", "host": fingerprint("CPUExecutionProvider", 1, "all")})
    assert check_note(here, 1.3, {"ms": 1.0}).endswith("+30% off the 1.000 ms it took on this host; expect its estimates "
                                                        "for models like this one to be off the same way")
    # adapted on another host: its base is adapted here
    there = replace(here, source={**here.source, "host": {**here.source["host"], "cpu_model": "another CPU"}})
    assert "archpass calibrate --adapt cpu --backend onnxruntime --threads 1 --name cpu-here-here" in check_note(
        there, 1.3, {"ms": 1.0})
