"""Adapting a target from a few measurements (costmodel/adapt.py): known corrections are
recovered, held-out summaries are written, onnxruntime adaptation on this host, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from builders import NetBuilder

from archpass.analysis import analyze
from archpass.costmodel import Kernel, load_target
from archpass.costmodel.adapt import adapt_layers, adapt_onnxruntime, load_base, representatives, select_layers
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


def test_selection_takes_the_models_dominant_layers_then_a_spread(tmp_path):
    model = _tiny(tmp_path / "tiny.onnx", width=24)
    specs = select_layers(BASE, BASE, 20, models=[model])
    assert len(specs) == 20 and len({json.dumps(s, sort_keys=True) for s in specs}) == 20
    model_shapes = {(k.cin, k.cout, k.kernel, k.in_hw) for k in decompose(analyze(load_model(model)), BASE.fusion)}
    picked = [(s["cin"], s["cout"], tuple(s["kernel"]), tuple(s["in_hw"])) for s in specs]
    assert any(p in model_shapes for p in picked[:3])
    assert {s["kind"] for s in specs} >= {"conv", "dwconv"}


def test_representatives_keep_fixed_rows_and_spread():
    x = np.r_[np.zeros((50, 2)), np.ones((50, 2)) * 10, [[5, 5]]]
    idx = representatives(x, 3, fixed=1)
    assert idx[0] == 0 and len(idx) == 3
    assert {tuple(x[i]) for i in idx[1:]} == {(10.0, 10.0), (5.0, 5.0)}  # the far cluster and the lone point


def test_onnxruntime_adaptation_on_this_host(tmp_path):
    """A real (small) adaptation of the cpu target: timed in windows, host recorded, no host note here."""
    t = adapt_onnxruntime(base="cpu", name="cpu-here", out_dir=tmp_path / "a", threads=1, budget_s=4, pool=4, windows=2,
                          runs=3)
    back = load_target(tmp_path / "a")
    assert back.source["host"] == fingerprint("CPUExecutionProvider", 1, "all")
    assert host_notes(back) == [] and host_notes(load_target("cpu"))  # the built-in's host is unrecorded
    m = back.accuracy["measurement"]
    assert m["networks"] >= 2 and m["seconds"] <= 4 + 4  # the budget is kept (the last network may overrun it)
    for key in ("remeasured", "kept_busy", "other_cores_median", "allowed_other_cores", "windows"):
        assert key in m
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


def test_runtime_corrections_scale_kernels_to_the_measured_network():
    """Profiled kernels of a network sum to less than its latency without the profiler (here
    0.8x, uniformly 1.5x the prior): the correction recovers 1.5 per kernel and the network
    factor 1.25, and the held-out networks are then exact."""
    from archpass.costmodel.adapt import Points, fit_corrections
    from archpass.costmodel.sampling import sample_layers

    cpu = load_target("cpu")
    kernels, prior, groups, net = [], [], [], {}
    specs = sample_layers(60, seed=11)
    for g in range(10):
        ks = [Kernel.from_spec(s) for s in specs[g * 6:(g + 1) * 6]]
        p, _ = predict_kernels(ks, cpu)
        kernels += ks
        prior.append(p)
        groups += [f"net{g}"] * len(ks)
        net[f"net{g}"] = float(p.sum() * 1.5 / 0.8)
    prior = np.concatenate(prior)
    shell = replace(cpu, prior=cpu, predictors={})
    pts = Points(tuple(kernels), prior, prior * 1.5, tuple(groups), net)
    corr, summary = fit_corrections(pts, shell)
    assert summary["network_scale"] == pytest.approx(1.25, rel=1e-6)
    assert summary["chains"]["n"] == 10 and summary["chains"]["mape_pct"] < 1e-6
    adapted = replace(shell, corrections=corr)
    got, _ = predict_kernels(kernels[:6], adapted)
    np.testing.assert_allclose(got, prior[:6] * 1.5 * 1.25, rtol=1e-6)


def test_graph_optimization_level_is_applied():
    from archpass.costmodel.backends.onnxruntime import GRAPH_OPT, measure_model, session_options

    import onnxruntime as ort

    for level, name in GRAPH_OPT.items():
        assert session_options(1, graph_opt=level).graph_optimization_level == getattr(ort.GraphOptimizationLevel, name)
    with pytest.raises(TargetError, match="unknown graph optimization level 'fast'"):
        session_options(1, graph_opt="fast")
    model = NetBuilder((1, 3, 16, 16)).conv(8, 3, act="relu").build()
    assert measure_model(model, graph_opt="basic", warmup=1, repeats=3)["ms"] > 0
