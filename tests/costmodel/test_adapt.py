"""Adapting a target from a few measurements (costmodel/adapt.py): known corrections are
recovered end to end, held-out summaries are written, onnxruntime adaptation on this host,
network levels from stored records (the slow state taken out), bad input.  The three steps
have their own tests: test_adapt_plan.py, test_adapt_measure.py, test_adapt_fit.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from builders import NetBuilder

from archpass.analysis import analyze
from archpass.costmodel import Kernel, load_target
from archpass.costmodel.adapt import adapt_layers, adapt_onnxruntime, load_base
from archpass.costmodel.calibrate import DATASET, Dataset
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.host import fingerprint, host_notes
from archpass.costmodel.kernels import decompose
from archpass.errors import TargetError
from archpass.model import load_model

BASE = load_target("edgetpu")


def _tiny(path, width=16):
    net = NetBuilder((1, 3, 32, 32)).conv(width, 3, stride=2, act="relu6").ibn(width, expand=4).ibn(24, stride=2, expand=6)
    onnx.save(net.head(10).build(), path)
    return path


def fake_work(payload: dict) -> dict:
    """A device that runs convolutions 1.7x slower than the base predicts and everything else as predicted."""
    k = Kernel.from_spec(payload["spec"])
    ms = float(predict_kernels([k], BASE)[0][0]) * (1.7 if k.kind == "conv" else 1.0)
    return {"group": "layer", "points": [{"spec": payload["spec"], "ms": ms}]}


def test_fake_device_correction_is_recovered(tmp_path):
    model = _tiny(tmp_path / "tiny.onnx")
    shell = replace(BASE, name="slow-convs", predictors={}, prior=BASE, path=None, origin="path")
    t = adapt_layers(shell, tmp_path / "adapted", fake_work, samples=24, models=[model])
    back = load_target(tmp_path / "adapted")
    assert back.prior is not None and back.prior.name == "edgetpu" and back.corrections
    kernels = decompose(analyze(load_model(model)), back.fusion)
    base_ms, _ = predict_kernels(kernels, BASE)
    got, _ = predict_kernels(kernels, back)
    ratio = got / base_ms
    for k, r in zip(kernels, ratio):
        assert r == pytest.approx(1.7 if k.kind == "conv" else 1.0, rel=0.02), k.kind
    np.testing.assert_allclose(got, predict_kernels(kernels, t)[0], rtol=1e-12)  # saved == in memory
    acc = back.accuracy
    assert acc["method"] in acc["cross_validation"] and acc["all_kernels"]["mape_pct"] < 2
    assert acc["prior_on_these_points"]["mape_pct"] > 20  # the base alone was far off
    assert acc["measurement"]["layers_measured"] == 24 and acc["measurement"]["models"] == ["tiny.onnx"]
    assert (tmp_path / "adapted" / "prior" / "target.json").is_file()
    assert (tmp_path / "adapted" / "dataset.jsonl").is_file()


def test_new_hardware_is_corrected_through_the_base_predictors_on_it(tmp_path):
    """A device with another array (16x16 K x C, 2x2 OX x OY) that behaves as the base's
    predictors say such an array does, 1.3x slower: the transferred reference is chosen and
    the device is recovered, where the base's own predictions are far off."""
    from archpass.costmodel.estimate import transferred_prior

    model = _tiny(tmp_path / "tiny.onnx")
    shell = replace(BASE, name="wide", parallelism=16, unroll={"K": 16, "C": 16, "OX": 2, "OY": 2}, predictors={},
                    prior=BASE, path=None, origin="path")
    device = transferred_prior(shell)

    def work(payload: dict) -> dict:
        k = Kernel.from_spec(payload["spec"])
        return {"group": "layer", "points": [{"spec": payload["spec"], "ms": float(predict_kernels([k], device)[0][0]) * 1.3}]}

    adapt_layers(shell, tmp_path / "adapted", work, samples=20, models=[model])
    back = load_target(tmp_path / "adapted")
    assert back.accuracy["method"].startswith("transfer_") and all(c.transfer for c in back.corrections.values())
    kernels = decompose(analyze(load_model(model)), back.fusion)
    truth = predict_kernels(kernels, device)[0] * 1.3
    np.testing.assert_allclose(predict_kernels(kernels, back)[0], truth, rtol=0.02)
    cv = back.accuracy["cross_validation"]
    assert cv["transfer_scale"]["kernels"]["mape_pct"] < 1 < cv["scale"]["kernels"]["mape_pct"]


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_adaptation_on_this_host(tmp_path, threads, monkeypatch):
    """A real (small) adaptation of the cpu target: timed in windows, host recorded, no host note here."""
    import archpass.costmodel.adapt_measure as ad

    # waits for a quiet host / the fast state capped at the budget (3x by default): on a
    # host in its slow state they made this the suite's slowest test (23.7 s)
    monkeypatch.setattr(ad, "WAIT_FACTOR", 1.0)
    # 6 s: at 2 threads, with its probe around every window, a slower core of the machines
    # here timed too few networks in 4 s for a held-out network fold
    t = adapt_onnxruntime(base="cpu", name="cpu-here", out_dir=tmp_path / "a", threads=threads, budget_s=6, pool=4,
                          windows=2, runs=3, spread_s=0)
    back = load_target(tmp_path / "a")
    assert back.source["host"] == fingerprint("CPUExecutionProvider", threads, "all")
    assert host_notes(back) == [] and host_notes(load_target("cpu"))  # the built-in's host is unrecorded
    assert back.fusion.nchwc_block == back.source["host"]["nchwc_block"] > 0  # the plan's and later models' layout
    m = back.accuracy["measurement"]
    assert m["networks"] >= 2 and m["seconds"] <= 6 + 4  # the budget is kept (the last network may overrun it)
    assert m["waited_s"] <= 6 + ad.MAX_WAIT_S  # and so are the waits (one wait may start just under the cap)
    for key in ("remeasured", "kept_busy", "other_cores_median", "allowed_other_cores", "windows"):
        assert key in m
    assert m["window_statistic"] == ("mean of the faster half of the windows" if threads == 1
                                     else "mean of the faster half of the fast-state windows")
    assert m["kernel_window_statistic"] == ("median" if threads == 1 else "min of fast-state windows")
    if threads > 1:  # the host's state was probed around every window and recorded
        assert m["probe_best_ms"] > 0 and 0 <= m["slow_state_windows"] <= m["windows_kept"]
        assert m["rounds"][-1]["probe_best_ms"] == m["probe_best_ms"]  # the round keeps it (--add, refit)
        recs = Dataset(tmp_path / "a" / DATASET).records.values()
        assert all(len(r["probe_ms"]) == len(r["window_plain_ms"]) and r["fast_windows"] for r in recs)
    assert back.accuracy["chains"]["n"] >= 1
    s = analyze(load_model(_tiny(tmp_path / "tiny.onnx")))
    lat, _ = predict_kernels(decompose(s, back.fusion), back)
    assert np.all(lat > 0) and np.isfinite(lat).all()
    assert t.corrections.keys() == back.corrections.keys()


@pytest.mark.parametrize("base, backend, expect", [
    ("nosuch", "onnxruntime", "unknown target 'nosuch'"),
    ("edgetpu", "onnxruntime", "measured with zigzag, not onnxruntime"),
    ("cpu", "zigzag", "measured with onnxruntime, not zigzag"),
])
def test_bad_base(base, backend, expect):
    with pytest.raises(TargetError, match=expect):
        load_base(base, backend)


def test_budget_too_small(tmp_path):
    with pytest.raises(TargetError, match="too small to measure anything"):
        adapt_onnxruntime(base="cpu", name="x", out_dir=tmp_path / "x", budget_s=0.1)
    assert not (tmp_path / "x").exists()


def test_graph_optimization_level_is_applied():
    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import GRAPH_OPT, measure_model, session_options

    for level, name in GRAPH_OPT.items():
        assert session_options(1, graph_opt=level).graph_optimization_level == getattr(ort.GraphOptimizationLevel, name)
    with pytest.raises(TargetError, match="unknown graph optimization level 'fast'"):
        session_options(1, graph_opt="fast")
    model = NetBuilder((1, 3, 16, 16)).conv(8, 3, act="relu").build()
    assert measure_model(model, graph_opt="basic", warmup=1, repeats=3)["ms"] > 0


def test_an_adaptation_plans_and_records_the_hosts_layout():
    """``host_fusion``: where onnxruntime runs its blocked layout the fusion rules of a
    calibration or adaptation carry this host's NCHWc block (what the plan's networks and
    later models decompose with); elsewhere the rules stay as they are."""
    from archpass.costmodel.host import host_fusion, nchwc_block

    cpu = load_target("cpu")
    stale = replace(cpu.fusion, nchwc_block=4)
    assert host_fusion(stale, "CPUExecutionProvider", "all").nchwc_block == nchwc_block() > 0
    assert host_fusion(stale, "CPUExecutionProvider", "all") == replace(cpu.fusion, nchwc_block=nchwc_block())
    assert host_fusion(stale, "CUDAExecutionProvider", "all") == stale
    assert host_fusion(stale, "CUDAExecutionProvider", "basic") == stale


def test_a_network_latency_is_the_mean_of_its_faster_half_of_windows(tmp_path):
    """One slow window of three (other load only slows a window down) does not move a
    network's latency; of two the faster counts; a refit reads the stored windows."""
    from archpass.costmodel.adapt import dataset_points
    from archpass.costmodel.measure import window_level

    assert window_level([1.0, 1.3, 1.1]) == pytest.approx(1.05)
    assert window_level([1.0, 1.0, 5.0]) == pytest.approx(1.0)
    assert window_level([2.0, 1.5]) == pytest.approx(1.5) and window_level([0.7]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        window_level([])
    cpu = load_target("cpu")
    k = decompose(analyze(load_model(_tiny(tmp_path / "tiny.onnx"))), cpu.fusion)[0]
    ds = Dataset(tmp_path / DATASET)
    rec = {"key": "n1", "group": "network", "payload": {}, "points": [{"spec": k.spec(), "id": "k", "ms": 0.2}],
           "plain_ms": 9.0, "window_plain_ms": [0.3, 0.9, 0.25, 0.8], "fast_windows": [0, 1, 2]}
    ds.records["n1"] = rec
    ds.records["n2"] = {**rec, "key": "n2", "window_plain_ms": [], "fast_windows": []}
    pts = dataset_points(ds, cpu)
    # fast windows 0.3, 0.9, 0.25: the faster two; a record without windows keeps its plain_ms
    assert pts.network_ms["n1"] == pytest.approx(0.275) and pts.network_ms["n2"] == pytest.approx(9.0)


def test_networks_timed_only_in_the_slow_state_lose_the_rounds_slow_over_fast_ratio(tmp_path):
    """A network no window of caught the host's fast state is divided by how much slower
    the slow state ran its round's networks timed in both states; rounds are judged
    apart, and one without enough such networks, or one-thread records, are left alone."""
    from archpass.costmodel.adapt import MIN_BOTH_STATES, dataset_points, round_probe_bests, slow_only_levels
    from archpass.costmodel.measure import window_level

    def rec(wins, probe):
        return {"window_plain_ms": wins, "probe_ms": probe}

    fast, slow = 1.1, 1.6  # probe readings against a best of 1.0: FAST_RATIO 1.3 between them
    records = {
        # in both states: slow over fast (faster half of each) 1.2, 1.25, 1.2
        "a": rec([1.0, 1.2, 1.3], [fast, slow, slow]), "b": rec([2.0, 2.5, 2.6], [fast, slow, 1.9]),
        "c": rec([0.5, 0.6, 0.7], [fast, slow, slow]),
        "d": rec([3.0, 3.3, 3.6], [slow, slow, 2.0]),  # only slow: its level over 1.2
        "e": rec([0.9, 0.8, 1.0], [fast, fast, 1.2]),  # only fast: as measured
        # a second round: one network in both states is too few to tell its slow state's cost
        "r2/a": rec([1.0, 2.0, 2.0], [fast, slow, slow]), "r2/d": rec([3.0, 3.3, 3.6], [slow, slow, slow]),
        # one thread: no probe
        "r3/a": rec([1.0, 1.2, 1.3], [None, None, None]), "r3/d": rec([3.0, 3.3, 3.6], [None] * 3),
    }
    assert MIN_BOTH_STATES > 1
    # each round's best probe reading, as the rounds' records keep it (round 3: one thread)
    rounds = [{"probe_best_ms": 1.0}, {"probe_best_ms": 1.0}, {"seed": 2}]
    bests = round_probe_bests(rounds)
    assert bests == {"": 1.0, "r2/": 1.0}
    net = {k: window_level(r["window_plain_ms"]) for k, r in records.items()}
    got, seen = slow_only_levels(records, net, bests)
    assert got["d"] == pytest.approx(3.15 / 1.2)
    assert {k: got[k] for k in records if k != "d"} == {k: net[k] for k in records if k != "d"}
    assert seen == {"r1": {"slow_over_fast": 1.2, "networks_in_both_states": 3, "networks_scaled": 1}}
    # a round that did not record its best reading is left as it is; a target's measurement
    # record gives its latest round's (rounds recorded before they kept theirs)
    assert slow_only_levels(records, net, {}) == (net, {})
    assert round_probe_bests([{"seed": 0}, {"seed": 1}], 0.9) == {"r2/": 0.9}
    assert round_probe_bests([], 0.9) == {"": 0.9} and round_probe_bests([], None) == {}
    # a slow state no slower than the fast one changes nothing
    faster = {**records, **{k: rec([1.0, 0.9, 0.95], [fast, slow, slow]) for k in "abc"}}
    got, seen = slow_only_levels(faster, {**net, **{k: 0.95 for k in "abc"}}, bests)
    assert got["d"] == net["d"] and seen["r1"]["slow_over_fast"] == 1.0

    # through a dataset: the network levels the fit reads, and what was done, by round
    cpu = load_target("cpu")
    k = decompose(analyze(load_model(_tiny(tmp_path / "tiny.onnx"))), cpu.fusion)[0]
    ds = Dataset(tmp_path / DATASET)
    for key, r in records.items():
        ds.records[key] = {"key": key, "group": "network", "payload": {}, "points": [{"spec": k.spec(), "id": "k", "ms": 0.2}],
                           "plain_ms": 9.0, **r}
    assert dataset_points(ds, cpu).slow_state_scaling == {}  # no best reading given: as measured
    pts = dataset_points(ds, cpu, probe_bests=bests)
    assert pts.network_ms["d"] == pytest.approx(3.15 / 1.2) and pts.network_ms["r2/d"] == pytest.approx(3.15)
    assert pts.slow_state_scaling["r1"]["networks_scaled"] == 1 and "r2" not in pts.slow_state_scaling
