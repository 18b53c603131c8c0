"""Measurement backends on a few tiny layers (ZigZag takes about a second per layer).

Only the ZigZag tests need zigzag-dse (``needs_zigzag``); the onnxruntime and dataset
tests run without it.
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import NetBuilder

from archpass.costmodel.backends import onnxruntime as ortb
from archpass.costmodel.backends import zigzag as zz
from archpass.costmodel.build_targets import HARDWARE
from archpass.costmodel.calibrate import Dataset, _ort_work, corrected_points, profiler_overhead_ms, zigzag_work
from archpass.costmodel.kernels import FusionRules, Kernel
from archpass.errors import TargetError

needs_zigzag = pytest.mark.skipif(not zz.available(), reason="zigzag-dse not installed (pip install 'archpass[zigzag]')")

HW, MAP = HARDWARE / "edge_tpu_like.hardware.yaml", HARDWARE / "edge_tpu_like.mapping.yaml"
CONV = dict(kind="conv", op="Conv", cin=16, cout=16, kernel=[3, 3], stride=[1, 1], groups=1, in_hw=[8, 8], out_hw=[8, 8])
PW = dict(kind="conv", op="Conv", cin=16, cout=24, kernel=[1, 1], stride=[1, 1], groups=1, in_hw=[8, 8], out_hw=[8, 8])


@pytest.mark.slow
@needs_zigzag
def test_zigzag_layers_sum_to_the_whole_model():
    a = zz.measure_layer(CONV, str(HW), str(MAP), clock_hz=1e9, lpf_limit=2)
    b = zz.measure_layer(PW, str(HW), str(MAP), clock_hz=1e9, lpf_limit=2)
    # 16x16 3x3 over 8x8 on an 8x8 (K x C) x 4x4 (OX x OY) array: at least 2*2*2*2*9 steps
    assert a["cycles"] >= 2 * 2 * 2 * 2 * 9 and a["ms"] == pytest.approx(a["cycles"] / 1e9 * 1e3)
    model = NetBuilder((1, 16, 8, 8)).conv(16, 3, act="relu", name="a").conv(24, 1, act=None, name="b").build()
    whole = zz.evaluate_cycles(model, HW, MAP, 2)
    assert whole == pytest.approx(a["cycles"] + b["cycles"], rel=1e-9)


def test_zigzag_failure_is_recorded_not_raised(monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(zz, "evaluate_cycles", boom)
    rec = zigzag_work({"spec": CONV, "hardware": str(HW), "mapping": str(MAP), "clock_hz": 1e9, "lpf_limit": 4})
    assert rec["error"].startswith("ZeroDivisionError") and rec["points"] == []


@needs_zigzag
def test_zigzag_rejects_bad_hardware_yaml(tmp_path):
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: broken\nmemories: {}\noperational_array: {sizes: [8]}\n")
    with pytest.raises(TargetError, match="ZigZag rejects hardware"):
        zz.check_inputs(bad, MAP)
    with pytest.raises(TargetError, match="not found"):
        zz.check_inputs(tmp_path / "missing.yaml", MAP)


def test_hardware_facts_read_from_yaml():
    facts = zz.hardware_facts(HW, MAP)
    assert facts["unroll"] == {"K": 8, "C": 8, "OX": 4, "OY": 4} and facts["parallelism"] == 8
    facts = zz.hardware_facts(HARDWARE / "tpu_like.hardware.yaml", HARDWARE / "tpu_like.mapping.yaml")
    assert facts["unroll"] == {"K": 32, "C": 32} and facts["parallelism"] == 32


def test_onnxruntime_unknown_provider():
    with pytest.raises(TargetError, match="not installed here"):
        ortb.check_provider("NoSuchExecutionProvider")


@pytest.mark.slow
def test_onnxruntime_kernels_in_context_cover_every_node():
    rec = _ort_work({"seed": 7, "provider": "CPUExecutionProvider", "threads": 1, "warmup": 2, "repeats": 5,
                     "fusion": FusionRules(residual_add=True).to_json()})
    assert "error" not in rec and rec["unmatched_nodes"] == []
    assert rec["points"] and all(p["ms"] > 0 for p in rec["points"])
    kinds = {Kernel.from_spec(p["spec"]).kind for p in rec["points"]}
    assert kinds & {"conv", "dwconv"}
    # how much of a profiled run the per-node times account for is a timing figure:
    # benchmarks/profiler_coverage.py measures it
    assert rec["run_ms"] > 0 and rec["plain_ms"] > 0 and all(p["nodes"] >= 1 for p in rec["points"])


def test_profiler_overhead_is_taken_out_per_node(tmp_path):
    ds = Dataset(tmp_path / "d.jsonl")
    # two chains whose profiled node sums exceed the plain run by 2 us per node
    ds.add({"key": "a", "plain_ms": 1.0, "points": [{"spec": CONV, "ms": 0.508, "nodes": 4},
                                                     {"spec": PW, "ms": 0.512, "nodes": 6}]})
    ds.add({"key": "b", "plain_ms": 2.0, "points": [{"spec": CONV, "ms": 2.01, "nodes": 5}]})
    overhead = profiler_overhead_ms(ds, ["a", "b"])
    assert overhead == pytest.approx(0.002)
    pts = {(k, p["cin"] * 100 + p["cout"]): ms for k, p, ms in corrected_points(ds, ["a", "b"], overhead)}
    assert pts[("a", 1616)] == pytest.approx(0.5) and pts[("a", 1624)] == pytest.approx(0.5)
    assert pts[("b", 1616)] == pytest.approx(2.0)


def test_onnxruntime_whole_model_median():
    model = NetBuilder((1, 8, 16, 16)).conv(8, 3).build()
    r = ortb.measure_model(model, warmup=1, repeats=5)
    assert r["runs"] == 5 and 0 < r["p10"] <= r["ms"] <= r["p90"]


def test_dataset_resumes_and_skips_cut_lines(tmp_path):
    ds = Dataset(tmp_path / "d.jsonl")
    ds.add({"key": "a", "points": [{"spec": CONV, "ms": 1.0}]})
    ds.add({"key": "b", "points": [], "error": "ZeroDivisionError"})
    with (tmp_path / "d.jsonl").open("a") as f:
        f.write('{"key": "c", "poi')  # an interrupted write
    again = Dataset(tmp_path / "d.jsonl")
    assert set(again.records) == {"a", "b"} and len(again.points()) == 1 and len(again.failed) == 1
    assert np.isclose(again.points()[0][2], 1.0)
