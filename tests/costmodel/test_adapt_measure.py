"""Timing networks for an onnxruntime adaptation (costmodel/adapt_measure.py): a busy host is
waited for, notes flag an unstable host, later windows keep to the budget."""

from __future__ import annotations

import onnx
import pytest
from builders import NetBuilder

from archpass.costmodel import load_target
from archpass.model import load_model


def test_a_busy_host_is_waited_for_and_one_core_is_kept_spare(monkeypatch):
    from archpass.costmodel import adapt_measure
    from archpass.costmodel.backends import onnxruntime as backend

    monkeypatch.setattr(adapt_measure.os, "cpu_count", lambda: 2)
    assert adapt_measure.allowed_other_cores(1) == pytest.approx(0.3)
    assert adapt_measure.allowed_other_cores(2) == pytest.approx(0.3)
    monkeypatch.setattr(adapt_measure.os, "cpu_count", lambda: 8)
    assert adapt_measure.allowed_other_cores(1) == pytest.approx(6.3)
    readings = iter([1.9, 1.8, 0.1, 5.0])
    monkeypatch.setattr(backend, "busy_cores", lambda window=0.2: next(readings))
    monkeypatch.setattr(adapt_measure.os, "cpu_count", lambda: 2)
    assert adapt_measure.wait_quiet(1, max_wait=30.0) < 5.0  # quiet at the third reading
    assert next(readings) == 5.0  # and no reading after it
    monkeypatch.setattr(backend, "busy_cores", lambda window=0.2: 2.0)
    waited = adapt_measure.wait_quiet(1, max_wait=0.05, window=0.0)
    assert 0.05 <= waited < 1.0  # a host that stays busy is waited for max_wait only


def test_measurement_notes_flag_an_unstable_or_busy_host():
    """A measurement with many slow-state windows or busy cores gets a note; a calm one none."""
    from archpass.costmodel.adapt_measure import UNSTABLE_SHARE, WAIT_FACTOR, measurement_notes

    calm = {"windows_kept": 150, "slow_state_windows": 15, "waited_s": 50.0, "kept_busy": 0, "other_cores": [0.0] * 160}
    assert measurement_notes(calm, 60.0) == []
    assert measurement_notes({}, 60.0) == []  # nothing seen (a single-thread measurement without a probe)
    slow = {**calm, "windows_kept": 116, "slow_state_windows": 58, "waited_s": WAIT_FACTOR * 60.0}
    (note,) = measurement_notes(slow, 60.0)
    assert "58 of 116 windows" in note and "used up" in note and "adapt again" in note
    edge = int(UNSTABLE_SHARE * 116)
    assert measurement_notes({**slow, "slow_state_windows": edge}, 60.0) == []  # at the share: no note
    assert "used up" not in measurement_notes({**slow, "waited_s": 10.0}, 60.0)[0]
    # the pauses that spread the window rounds are not waits for the fast state
    spread = {**slow, "waited_s": 10.0, "spread_waited_s": WAIT_FACTOR * 60.0}
    assert "used up" not in measurement_notes(spread, 60.0)[0]
    busy = {"kept_busy": 40, "other_cores": [1.0] * 100}
    (note,) = measurement_notes(busy, 60.0)
    assert "40 of 100 measurements" in note and "busy" in note
    assert len(measurement_notes({**slow, **busy}, 60.0)) == 2
    # every window slow: no network was timed in the fast state, the level is the slow one's
    (note,) = measurement_notes({**slow, "slow_state_windows": 116}, 60.0)
    assert "all 116 windows" in note and "tens of percent" in note and "used up" in note
    assert "up to about 20%" in measurement_notes({**slow, "slow_state_windows": 115}, 60.0)[0]


def test_later_windows_start_only_when_they_still_end_within_the_budget(tmp_path):
    """A window (or a retry) starts only when one as long as the network's last try still
    ends within the budget: long tries (0.4-0.8 s on the machines here) do not run past it."""
    from archpass.costmodel.adapt_measure import measure_networks, planned_network

    cpu = load_target("cpu")
    b = NetBuilder((1, 64, 56, 56))
    b.conv(64, 3)
    onnx.save(b.build(), str(tmp_path / "conv.onnx"))
    # 40 runs: a window of 0.25-0.5 s on the machines here (MobileNetV2's cores differ
    # twofold between them), so a few windows fit in the budget on each
    net = planned_network("k0", "conv", load_model(tmp_path / "conv.onnx").proto, cpu, 80, 40, 1)
    got = measure_networks([net], "CPUExecutionProvider", 1, "all", 3.0, windows=80, runs=40)
    seen = got["seen"]
    assert 2 <= len(net.windows) < 80  # the budget, not the windows, ended it
    assert seen["seconds"] <= 3.0 + 0.1, seen["seconds"]
