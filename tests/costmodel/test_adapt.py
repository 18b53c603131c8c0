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


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_adaptation_on_this_host(tmp_path, threads, monkeypatch):
    """A real (small) adaptation of the cpu target: timed in windows, host recorded, no host note here."""
    import archpass.costmodel.adapt as ad

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


def _networks(cpu, factors, overhead_ms, profiled=1.0):
    """Twelve networks of 3-14 sampled layers on a fake runtime: each kernel runs
    ``factors[kind]`` x the prior, the profiler shows ``profiled`` x that, and the whole
    network pays ``overhead_ms`` per kernel on top."""
    from archpass.costmodel.adapt import Points
    from archpass.costmodel.sampling import sample_layers

    specs = sample_layers(120, seed=11)
    kernels, prior, ms, groups, net, whole = [], [], [], [], {}, {}
    at = 0
    for g in range(12):
        n = 3 + g
        ks = [Kernel.from_spec(s, id=f"k{i}") for i, s in enumerate(specs[at:at + n])]
        at += n
        p, _ = predict_kernels(ks, cpu)
        true = p * np.array([factors[k.kind] for k in ks])
        kernels += ks
        prior.append(p)
        ms.append(true * profiled)
        groups += [f"net{g}"] * n
        net[f"net{g}"] = float(true.sum() + overhead_ms * n)
        whole[f"net{g}"] = (tuple(ks), p)
    return Points(tuple(kernels), np.concatenate(prior), np.concatenate(ms), tuple(groups), net, whole)


def test_runtime_corrections_scale_kernels_to_the_measured_network():
    """Profiled kernels of a network sum to less than its latency without the profiler (here
    0.8x, uniformly 1.5x the prior): the correction recovers 1.5 per kernel and the network
    factor 1.25, and the held-out networks are then exact."""
    from archpass.costmodel.adapt import fit_corrections

    cpu = load_target("cpu")
    pts = _networks(cpu, {"conv": 1.5, "dwconv": 1.5, "gemm": 1.5}, 0.0, profiled=0.8)
    shell = replace(cpu, prior=cpu, predictors={})
    corr, summary = fit_corrections(pts, shell)
    assert summary["chains"]["n"] == 12 and summary["chains"]["mape_pct"] < 1e-3
    adapted = replace(shell, corrections=corr)
    ks, prior = pts.networks["net5"]
    got, _ = predict_kernels(list(ks), adapted)
    np.testing.assert_allclose(got, prior * 1.5, rtol=1e-6)


def test_network_fit_recovers_a_per_kernel_overhead_and_class_factors():
    """Networks pay a fixed 0.05 ms per kernel the profiled kernels do not show, and their
    depthwise convolutions take 2x the prior while dense ones take 1.3x: the whole-network
    fit finds the overhead, and held-out networks are predicted within 1%, where one
    common factor on the kernel sum misses by more."""
    from archpass.costmodel.adapt import fit_corrections

    cpu = load_target("cpu")
    pts = _networks(cpu, {"conv": 1.3, "dwconv": 2.0, "gemm": 1.3}, 0.05)
    shell = replace(cpu, prior=cpu, predictors={})
    corr, summary = fit_corrections(pts, shell)
    fit = summary["network_fit"]
    assert fit["overhead_ms_per_kernel"]["layer"] == pytest.approx(0.05, rel=0.05)
    assert fit["chosen"] != "common_factor" and summary["chains"]["mape_pct"] < 1.0
    assert fit["cross_validation"]["common_factor"][summary["method"]]["mape_pct"] > 3 * summary["chains"]["mape_pct"]
    adapted = replace(shell, corrections=corr)
    for g, (ks, _) in list(pts.networks.items())[:3]:
        got = float(predict_kernels(list(ks), adapted)[0].sum())
        assert got == pytest.approx(pts.network_ms[g], rel=0.01)
    back = {k: type(c).from_json(c.to_json()) for k, c in corr.items()}
    assert back == corr  # the overhead survives the JSON round trip


def test_network_fit_finds_separate_per_kernel_terms_for_layers_and_ops():
    """Generated networks with standalone ops (squeeze-excitation gates, activations,
    splits and concats) pay 0.02 ms per layer kernel and 0.006 ms per op kernel that the
    profiled kernels do not show: the fit finds both terms (the class factors, pulled
    towards the common factor, take a little of them), predicts held-out networks within
    2.5%, and on the same rows one term for every kernel fits more than twice as badly."""
    from archpass.costmodel import adapt as A
    from archpass.costmodel.chains import BUILDERS
    from archpass.costmodel.kernels import LAYER_KINDS

    cpu = load_target("cpu")
    kernels, prior, groups, net, whole = [], [], [], {}, {}
    add = {"layer": 0.02, "op": 0.006}
    for g in range(14):
        ks = decompose(analyze(BUILDERS["template" if g % 2 else "shuffle"](g)), cpu.fusion)
        p, _ = predict_kernels(ks, cpu)
        kernels += ks
        prior.append(p)
        groups += [f"net{g}"] * len(ks)
        n_layer = sum(k.kind in LAYER_KINDS for k in ks)
        net[f"net{g}"] = float(p.sum() + add["layer"] * n_layer + add["op"] * (len(ks) - n_layer))
        whole[f"net{g}"] = (tuple(ks), p)
    prior = np.concatenate(prior)
    pts = A.Points(tuple(kernels), prior, prior.copy(), tuple(groups), net, whole)
    shell = replace(cpu, prior=cpu, predictors={})
    _, summary = A.fit_corrections(pts, shell, method="scale")
    fit = summary["network_fit"]
    assert set(fit["overhead_ms_per_kernel"]) == set(A.KERNEL_TERMS)
    assert fit["overhead_ms_per_kernel"]["layer"] == pytest.approx(add["layer"], rel=0.1)
    assert fit["overhead_ms_per_kernel"]["op"] == pytest.approx(add["op"], rel=0.25)
    assert summary["chains"]["mape_pct"] < 2.5
    # the same rows with one per-kernel column
    nets = A._nets(pts, shell)
    keys = sorted(nets)
    t = np.array([nets[g].ms for g in keys])
    x = A._net_design([nets[g] for g in keys], {})
    nc = len(A.CLASSES)
    lam = float(fit["chosen"].split("ridge")[1])
    one = np.c_[x[:, :nc], x[:, nc:].sum(axis=1)]
    one_err = np.mean(np.abs(one @ A._net_fit(one, t, lam) / t - 1))
    assert one_err > 2 * np.mean(np.abs(x @ A._net_fit(x, t, lam) / t - 1))


def test_network_fit_is_stacked_on_out_of_fold_rows():
    """The whole-network fit reads each network's kernel sums from the correction fitted
    without that network's fold: its coefficients are the fit on those rows, not on the
    full correction's (in-sample) rows, which here differ (each network's kernels run at
    their own speed, so a fold's scale depends on which networks it saw)."""
    from archpass.costmodel import adapt as A

    cpu = load_target("cpu")
    pts = _networks(cpu, {"conv": 1.4, "dwconv": 1.4, "gemm": 1.4}, 0.01)
    speed = {g: 0.7 + 0.05 * i for i, g in enumerate(sorted(pts.networks))}
    pts = replace(pts, ms=pts.ms * np.array([speed[g] for g in pts.groups]))
    shell = replace(cpu, prior=cpu, predictors={})
    corr, summary = A.fit_corrections(pts, shell, method="scale")
    fit = summary["network_fit"]
    assert fit["rows"] == "out of fold"
    kernels = list(pts.kernels)
    z, bt = A._terms(kernels, pts.prior_ms, shell)
    lp = np.log(pts.prior_ms)
    folds = np.array([A._fold(g) for g in pts.groups])
    fold_corr = {f: A._fit_method("scale", [k for k, x in zip(kernels, folds != f) if x], z[folds != f],
                                  np.log(pts.ms[folds != f]) - lp[folds != f], bt[folds != f], lp[folds != f])
                 for f in set(folds)}
    nets = A._nets(pts, shell)
    keys = sorted(nets)
    oof = A._oof_design([nets[g] for g in keys], np.array([A._fold(g) for g in keys]), fold_corr)
    assert A._net_ok(oof).all()
    lam = None if fit["chosen"] == "common_factor" else float(fit["chosen"].split("ridge")[1])
    t = np.array([nets[g].ms for g in keys])
    want = A._net_fit(oof, t, lam)
    nc = len(A.CLASSES)
    assert [fit["class_factors"][c] for c in A.CLASSES] == pytest.approx(list(want[:nc]), rel=1e-9)
    assert [fit["overhead_ms_per_kernel"][k] for k in A.KERNEL_TERMS] == pytest.approx(list(want[nc:]), rel=1e-9,
                                                                                        abs=1e-12)
    # the full correction's (in-sample) rows would give another fit
    whole = A._fit_method("scale", kernels, z, np.log(pts.ms) - lp, bt, lp)
    in_sample = A._net_fit(A._net_design([nets[g] for g in keys], whole), t, lam)
    assert not np.allclose(in_sample, want, rtol=1e-3)


def test_graph_optimization_level_is_applied():
    from archpass.costmodel.backends.onnxruntime import GRAPH_OPT, measure_model, session_options

    import onnxruntime as ort

    for level, name in GRAPH_OPT.items():
        assert session_options(1, graph_opt=level).graph_optimization_level == getattr(ort.GraphOptimizationLevel, name)
    with pytest.raises(TargetError, match="unknown graph optimization level 'fast'"):
        session_options(1, graph_opt="fast")
    model = NetBuilder((1, 3, 16, 16)).conv(8, 3, act="relu").build()
    assert measure_model(model, graph_opt="basic", warmup=1, repeats=3)["ms"] > 0


def test_a_busy_host_is_waited_for_and_one_core_is_kept_spare(monkeypatch):
    from archpass.costmodel import adapt
    from archpass.costmodel.backends import onnxruntime as backend

    monkeypatch.setattr(adapt.os, "cpu_count", lambda: 2)
    assert adapt.allowed_other_cores(1) == pytest.approx(0.3) and adapt.allowed_other_cores(2) == pytest.approx(0.3)
    monkeypatch.setattr(adapt.os, "cpu_count", lambda: 8)
    assert adapt.allowed_other_cores(1) == pytest.approx(6.3)
    readings = iter([1.9, 1.8, 0.1, 5.0])
    monkeypatch.setattr(backend, "busy_cores", lambda window=0.2: next(readings))
    monkeypatch.setattr(adapt.os, "cpu_count", lambda: 2)
    assert adapt.wait_quiet(1, max_wait=30.0) < 5.0  # quiet at the third reading
    assert next(readings) == 5.0  # and no reading after it
    monkeypatch.setattr(backend, "busy_cores", lambda window=0.2: 2.0)
    waited = adapt.wait_quiet(1, max_wait=0.05, window=0.0)
    assert 0.05 <= waited < 1.0  # a host that stays busy is waited for max_wait only


def test_residual_trees_learn_a_structural_difference(tmp_path):
    """A device whose convolutions run 3x the prior when their input channels are not a
    multiple of 8 and 0.7x otherwise (a layout the prior knows nothing about): no scale or
    log-linear correction can express it, the residual trees do."""
    from archpass.costmodel.adapt import Points, fit_corrections
    from archpass.costmodel.sampling import sample_layers

    cpu = load_target("cpu")
    ks = [Kernel.from_spec(s, id=f"k{i}") for i, s in enumerate(sample_layers(320, seed=5))]
    prior = np.concatenate([predict_kernels([k], cpu)[0] for k in ks])
    ms = prior * np.array([3.0 if k.cin % 8 else 0.7 for k in ks])
    pts = Points(tuple(ks), prior, ms, tuple(f"g{i}" for i in range(len(ks))))
    corr, summary = fit_corrections(pts, replace(cpu, prior=cpu, predictors={}))
    cv = summary["cross_validation"]
    assert summary["method"] in ("residual_trees", "per_kind")
    assert cv["residual_trees"]["kernels"]["latency_weighted_mape_pct"] < 10
    assert cv["loglinear"]["kernels"]["latency_weighted_mape_pct"] > 30
    assert any(c.trees for c in corr.values())
    adapted = replace(cpu, prior=cpu, predictors={}, corrections=corr)
    got = np.concatenate([predict_kernels([k], adapted)[0] for k in ks[:40]])
    assert np.median(np.abs(got / ms[:40] - 1)) < 0.1
    from archpass.costmodel.target import save_target

    save_target(replace(adapted, name="trees", builtin=False, origin="path"), tmp_path / "t")
    doc = json.loads((tmp_path / "t" / "target.json").read_text())
    assert len(doc["correction_trees"]) == sum(1 for c in {c.trees for c in corr.values()} if c)  # each text once
    back = load_target(tmp_path / "t")
    assert back.corrections == corr
    np.testing.assert_allclose(np.concatenate([predict_kernels([k], back)[0] for k in ks[:40]]), got, rtol=1e-9)


def test_candidates_rotate_styles_and_the_plan_covers_many_group_convs():
    """One candidate in six is a RegNet/ResNeXt-like grouped network and one a
    ShuffleNetV2-like one, and the coverage cells tell a conv's grouping apart, so the plan
    takes grouped convs with many groups."""
    from archpass.costmodel.adapt import STYLES, group_bucket, select_networks

    assert STYLES.count("grouped") == 1 and STYLES.count("shuffle") == 1 and len(STYLES) == 6
    conv = dict(id="c", kind="conv", op="Conv", nodes=("c",), cin=64, cout=64, kernel=(3, 3))
    assert [group_bucket(Kernel(**conv, groups=g)) for g in (1, 2, 4, 8, 16, 64)] == [0, 1, 2, 2, 3, 4]
    assert group_bucket(Kernel(**{**conv, "kind": "dwconv"}, groups=64)) == 0
    nets = select_networks(load_target("cpu"), 12.0, 3, 5, 1, pool=10)
    labels = [n.label.split("-")[0] for n in nets]
    assert {"grouped", "template2", "network", "shuffle"} <= set(labels)
    # the ShuffleNet-like network brings data-movement kernels the others barely have
    assert sum(k.op in ("Transpose", "Split") for n in nets for k in n.kernels) >= 8
    many = [k for n in nets for k in n.kernels if k.kind == "conv" and 8 <= k.groups <= 80]
    assert len(many) >= 10


def test_coverage_cells_tell_alignment_and_resolution_apart_and_the_plan_chooses():
    """Two convs alike but for aligned channels, their output resolution, or a layout
    reorder of their output, fall in different coverage cells (ops keep the short cell); the plan picks at most
    PICKS_PER_BATCH networks per generated batch, so it chooses among more candidates than
    it takes, and covers more cells per planned second than the candidates in order."""
    from archpass.costmodel import adapt as A

    conv = dict(id="c", kind="conv", op="Conv", nodes=("c",), cin=64, cout=64, kernel=(3, 3), in_hw=(28, 28),
                out_hw=(28, 28))
    a = A.coverage_cell(Kernel(**conv), 8)
    assert A.coverage_cell(Kernel(**{**conv, "cout": 60}), 8) != a  # unaligned
    assert A.coverage_cell(Kernel(**{**conv, "cout": 64}), 16) == a  # aligned on both
    assert A.coverage_cell(Kernel(**{**conv, "out_hw": (112, 112), "in_hw": (112, 112)}), 8)[-2] == 4
    assert A.coverage_cell(Kernel(**{**conv, "out_hw": (7, 7), "in_hw": (7, 7)}), 8)[-2] == 0
    assert [A.coverage_cell(Kernel(**{**conv, "out_hw": (h, h)}), 8)[-2] for h in (8, 14, 27, 28, 55, 56, 111)] == [
        1, 1, 1, 2, 2, 3, 3]
    # a conv whose output the blocked layout converts (it feeds an op) is another cell
    assert A.coverage_cell(Kernel(**{**conv, "blocked": True, "out_reorder": True}), 8) != A.coverage_cell(
        Kernel(**{**conv, "blocked": True}), 8)
    op = Kernel(id="o", kind="op", op="Add", nodes=("a",), cin=64, cout=64, out_elems=4096)
    assert len(A.coverage_cell(op, 8)) == 5
    cpu = load_target("cpu")
    nets = A.select_networks(cpu, 12.0, 3, 5, 1, pool=24)
    made = {int(n.label.split("-")[1]) - 700001 for n in nets}
    assert len(nets) >= 4 and made != set(range(len(nets)))  # not simply the first candidates
    assert max(made) >= len(nets)


def test_residual_trees_learn_grouped_convs_from_grouped_networks():
    """A device that runs grouped convs with 8+ groups at 0.5x what the prior says (as
    onnxruntime's group-by-group conv runs many small groups) and everything else at 1.2x:
    with the grouped networks among the adaptation's networks, the residual trees learn it
    for the grouped convs of a network they never saw."""
    from archpass.costmodel.adapt import Points, fit_corrections
    from archpass.costmodel.chains import build_grouped, build_template

    cpu = load_target("cpu")

    def truth(k):
        return 0.5 if k.kind == "conv" and k.groups >= 8 else 1.2

    kernels, prior, ms, groups = [], [], [], []
    for i, proto in enumerate([build_grouped(s) for s in range(5)] + [build_template(s) for s in range(5)]):
        ks = decompose(analyze(proto), cpu.fusion)
        p, _ = predict_kernels(ks, cpu)
        kernels += ks
        prior.append(p)
        ms.append(p * np.array([truth(k) for k in ks]))
        groups += [f"net{i}"] * len(ks)
    pts = Points(tuple(kernels), np.concatenate(prior), np.concatenate(ms), tuple(groups))
    assert sum(1 for k in kernels if k.kind == "conv" and k.groups >= 8) >= 40
    shell = replace(cpu, prior=cpu, predictors={})
    corr, summary = fit_corrections(pts, shell, method="residual_trees")
    adapted = replace(shell, corrections=corr)
    unseen = decompose(analyze(build_grouped(41)), cpu.fusion)
    ratio = predict_kernels(unseen, adapted)[0] / predict_kernels(unseen, cpu)[0]
    many = np.array([k.kind == "conv" and k.groups >= 8 for k in unseen])
    dense = np.array([k.kind == "conv" and k.groups == 1 for k in unseen])
    assert many.sum() >= 5
    assert np.median(ratio[many]) == pytest.approx(0.5, rel=0.15)
    assert np.median(ratio[dense]) == pytest.approx(1.2, rel=0.1)


def test_residual_rows_carry_the_work_per_group_and_older_trees_read_their_own_columns():
    """Layer kernels' residual rows end with their work per group (log MACs per group, log
    input x output channels per group); trees trained on the narrower rows of an older
    archpass predict from their own columns, unchanged."""
    import lightgbm as lgb

    from archpass.costmodel.estimate import corrected
    from archpass.costmodel.features import LAYER_FEATURES, OP_FEATURES, group_work, residual_rows
    from archpass.costmodel.predictor import LAYER_TERMS, Correction

    cpu = load_target("cpu")
    conv = dict(kind="conv", op="Conv", nodes=("c",), kernel=(3, 3), in_hw=(14, 14), out_hw=(14, 14))
    grouped = Kernel(id="g", cin=160, cout=160, groups=10, **conv)
    dw = Kernel(id="d", cin=96, cout=96, groups=96, **{**conv, "kind": "dwconv"})
    assert group_work(grouped) == pytest.approx((np.log(grouped.macs / 10), np.log(16 * 16)))
    assert group_work(dw) == pytest.approx((np.log(14 * 14 * 9), 0.0))
    rows = residual_rows([grouped, dw], cpu, np.array([0.1, 0.05]))
    assert rows.shape == (2, len(LAYER_FEATURES) + 4 + 2 + 3)
    np.testing.assert_allclose(rows[:, -5:-3], [group_work(grouped), group_work(dw)])
    op = Kernel(id="o", kind="op", op="Add", nodes=("a",), cin=96, cout=96, in_hw=(14, 14), out_hw=(14, 14))
    assert residual_rows([op], cpu, np.array([0.01])).shape == (1, len(OP_FEATURES) + 4 + 3)
    # the blocked-layout flags: read on an onnxruntime target with every graph
    # optimization, zeros with basic ones (no NCHWc layout there)
    flagged = replace(dw, blocked=True, out_reorder=True)
    np.testing.assert_allclose(residual_rows([flagged], cpu, np.array([0.05]))[:, -3:], [[1.0, 0.0, 1.0]])
    basic = replace(cpu, source={**cpu.source, "graph_optimization": "basic"})
    np.testing.assert_allclose(residual_rows([flagged], basic, np.array([0.05]))[:, -3:], [[0.0, 0.0, 0.0]])

    rng = np.random.default_rng(0)
    old = rng.normal(size=(300, rows.shape[1] - 5))
    text = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                     lgb.Dataset(old, label=0.3 * np.tanh(old[:, 0])), num_boost_round=20).model_to_string()
    c = Correction(kind="layer", method="residual_trees", terms=LAYER_TERMS, center=(0.0,) * 4, coef=(0.0,) * 4,
                   trees=text)
    adapted = replace(cpu, prior=cpu, predictors={}, corrections={"layer": c})
    prior = np.array([0.1, 0.05])
    want = prior * np.exp(lgb.Booster(model_str=text).predict(rows[:, :-5]))
    np.testing.assert_allclose(corrected([grouped, dw], adapted, prior), want, rtol=1e-9)


def test_network_fit_takes_out_profiler_bookkeeping_the_profiled_kernels_still_hold():
    """Each profiled kernel still holds 0.004 ms of bookkeeping that the networks without
    the profiler do not pay (the base's per-node profiler cost was measured elsewhere), and
    depthwise convolutions take 2x the prior: the whole-network fit finds the negative
    per-kernel term, held-out networks are predicted within 1%, and no kernel is
    predicted below its share (estimate.MIN_KERNEL_SHARE) of its corrected time."""
    from archpass.costmodel.adapt import fit_corrections
    from archpass.costmodel.estimate import MIN_KERNEL_SHARE

    cpu = load_target("cpu")
    pts = _networks(cpu, {"conv": 1.3, "dwconv": 2.0, "gemm": 1.3}, -0.004)
    shell = replace(cpu, prior=cpu, predictors={})
    corr, summary = fit_corrections(pts, shell)
    fit = summary["network_fit"]
    assert fit["overhead_ms_per_kernel"]["layer"] == pytest.approx(-0.004, rel=0.1)
    assert summary["chains"]["mape_pct"] < 1.0
    adapted = replace(shell, corrections=corr)
    for g, (ks, prior) in list(pts.networks.items())[:4]:
        got = predict_kernels(list(ks), adapted)[0]
        assert float(got.sum()) == pytest.approx(pts.network_ms[g], rel=0.01)
    tiny = Kernel(id="t", kind="conv", op="Conv", nodes=("c",), cin=8, cout=8, in_hw=(1, 1), out_hw=(1, 1))
    uncorrected = replace(adapted, corrections={k: replace(c, add_ms=0.0) for k, c in corr.items()})
    v = predict_kernels([tiny], uncorrected)[0][0]
    assert v < 0.004 and predict_kernels([tiny], adapted)[0][0] == pytest.approx(MIN_KERNEL_SHARE * v)


def test_measurement_notes_flag_an_unstable_or_busy_host():
    """A measurement with many slow-state windows or busy cores gets a note; a calm one none."""
    from archpass.costmodel.adapt import UNSTABLE_SHARE, WAIT_FACTOR, measurement_notes

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
    from archpass.costmodel.adapt import _network, measure_networks

    cpu = load_target("cpu")
    b = NetBuilder((1, 64, 56, 56))
    b.conv(64, 3)
    onnx.save(b.build(), str(tmp_path / "conv.onnx"))
    # 40 runs: a window of 0.25-0.5 s on the machines here (MobileNetV2's cores differ
    # twofold between them), so a few windows fit in the budget on each
    net = _network("k0", "conv", load_model(tmp_path / "conv.onnx").proto, cpu, 80, 40, 1)
    got = measure_networks([net], "CPUExecutionProvider", 1, "all", 3.0, windows=80, runs=40)
    seen = got["seen"]
    assert 2 <= len(net.windows) < 80  # the budget, not the windows, ended it
    assert seen["seconds"] <= 3.0 + 0.1, seen["seconds"]


def test_onnxruntime_layout_block_is_chosen_by_held_out_networks():
    """A runtime whose blocked layout pads channels to 16 (kernels with output channels 8
    mod 16 run 1.8x the prior, the others 1.2x): the adaptation keeps the 16-channel block
    for its features, whose held-out network error is lower; with basic optimizations (no
    blocked layout) only the base's block is tried; other backends keep their hardware."""
    from archpass.costmodel import adapt as A

    cpu = load_target("cpu")
    pts = _networks(cpu, {"conv": 1.2, "dwconv": 1.2, "gemm": 1.2}, 0.0)
    slow = np.array([1.5 if k.kind in ("conv", "dwconv") and k.cout % 16 == 8 else 1.0 for k in pts.kernels])
    assert 0.1 < np.mean(slow > 1) < 0.9  # both kinds of kernel are there
    g_slow = {g: float(np.sum((pts.prior_ms * 1.2 * slow)[np.array(pts.groups) == g])) for g in pts.network_ms}
    pts = replace(pts, ms=pts.ms * slow, network_ms=g_slow)
    src = {"backend": "onnxruntime", "graph_optimization": "all"}
    shell = replace(cpu, prior=cpu, predictors={}, source=src)
    assert [t.parallelism for t in A.layout_blocks(shell)] == [8, 16]
    assert not A._new_hardware(A.layout_blocks(shell)[1])
    t = A.fit_target(shell, pts, method="loglinear")
    block = t.accuracy["layout_block"]
    assert block["chosen"] == 16 == t.parallelism and t.unroll == {"K": 16, "C": 16, "G": 16}
    assert block["network_cv_mape_pct"]["16"] < block["network_cv_mape_pct"]["8"]
    # a runtime without that effect keeps the base's block
    even = A.fit_target(shell, _networks(cpu, {"conv": 1.2, "dwconv": 1.2, "gemm": 1.2}, 0.0), method="loglinear")
    assert even.accuracy["layout_block"]["chosen"] == 8 == even.parallelism and even.unroll == cpu.unroll
    basic = replace(shell, source={**src, "graph_optimization": "basic"}, parallelism=16)
    assert [b.parallelism for b in A.layout_blocks(basic)] == [8]
    zz = replace(cpu, prior=cpu, predictors={}, source={"backend": "zigzag"}, parallelism=32)
    assert A.layout_blocks(zz) == [zz]
    # the candidate block is the host's NCHWc block: none beyond the base's on an AVX2 host
    # (8 channels) or one without the layout, 32 with unroll scaled to it
    on = {b: replace(shell, fusion=replace(cpu.fusion, nchwc_block=b)) for b in (8, 0, 32, 12)}
    assert [t.parallelism for t in A.layout_blocks(on[8])] == [8]
    assert [t.parallelism for t in A.layout_blocks(on[0])] == [8]
    assert [t.parallelism for t in A.layout_blocks(on[12])] == [8]  # not a multiple of the base's
    wide = A.layout_blocks(on[32])
    assert [t.parallelism for t in wide] == [8, 32] and wide[1].unroll == {"K": 32, "C": 32, "G": 32}


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
    from archpass.costmodel.adapt import dataset_points, window_level

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
    from archpass.costmodel.adapt import MIN_BOTH_STATES, dataset_points, round_probe_bests, slow_only_levels, window_level

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


def test_runtime_choice_breaks_a_network_tie_by_the_kernels():
    """Network times that cannot tell two corrections apart (a paired difference within
    noise) leave the choice to the held-out kernel error; a clear network winner keeps it."""
    from archpass.costmodel.adapt import _choose_runtime

    rng = np.random.default_rng(0)
    base = np.abs(rng.normal(0, 12, 40))
    noise = rng.normal(0, 6, 40)
    noisy = base + noise - noise.mean()  # the same networks, errors that differ by noise
    choices = [(None, "scale"), (None, "residual_trees"), (1.0, "scale"), (1.0, "residual_trees")]
    ape = {(None, "scale"): base, (1.0, "scale"): base + 0.5, (None, "residual_trees"): noisy + 2.0,
           (1.0, "residual_trees"): noisy + 1.0}
    err = {c: float(np.mean(a)) for c, a in ape.items()}
    assert min(err, key=err.get) == (None, "scale")
    assert err[1.0, "residual_trees"] > err[None, "scale"] * 1.02 + 0.05  # beyond the old 2% band
    kernel_err = {"scale": 57.0, "residual_trees": 19.0}
    lam, method, how = _choose_runtime(choices, err, ape, kernel_err)
    assert (lam, method) == (1.0, "residual_trees")  # its own simplest fit within 2% of its best
    assert how["lowest_network_mape"]["method"] == "scale" and "residual_trees" in how["tied_methods"]
    # the networks tell them apart: every network 8 points worse with the trees
    clear = {**ape, (None, "residual_trees"): base + 8 + rng.normal(0, 0.5, 40),
             (1.0, "residual_trees"): base + 8 + rng.normal(0, 0.5, 40)}
    err = {c: float(np.mean(a)) for c, a in clear.items()}
    lam, method, how = _choose_runtime(choices, err, clear, kernel_err)
    assert (lam, method) == (None, "scale") and how["tied_methods"] == ["scale"]


def test_noisy_networks_leave_the_correction_to_the_kernels():
    """A device whose convs run 2.5x the prior with input channels not a multiple of 8 and
    0.6x otherwise, networks holding both kinds about half and half (as real models hold
    similar mixes), timed on a host where a third of the network timings came out 25-45%
    slow (another tenant): one scale has the lowest held-out network error, the networks
    cannot tell it from the residual trees, the profiled kernels can, and the adaptation
    keeps a correction that follows the kernels."""
    from archpass.costmodel.adapt import Points, fit_corrections
    from archpass.costmodel.sampling import sample_layers

    cpu = load_target("cpu")
    specs = [s for s in sample_layers(900, seed=3) if s.get("kind", "conv") == "conv"]
    pool = [Kernel.from_spec(s, id=f"s{i}") for i, s in enumerate(specs)]
    p_all, _ = predict_kernels(pool, cpu)
    aligned = [i for i, k in enumerate(pool) if k.cin % 8 == 0]
    odd = [i for i, k in enumerate(pool) if k.cin % 8]
    rng = np.random.default_rng(1)
    kernels, prior, ms, groups, net, whole = [], [], [], [], {}, {}
    for g in range(36):
        a = [aligned[(4 * g + i) % len(aligned)] for i in range(4)]
        o = [odd[(3 * g + i) % len(odd)] for i in range(3)]
        # a fourth odd kernel brings the odd share of the prior closest to a half
        want = p_all[a].sum() - p_all[o].sum()
        o.append(min((j for j in odd if j not in o), key=lambda j: abs(p_all[j] - want)))
        ks = [Kernel.from_spec(specs[j], id=f"k{i}") for i, j in enumerate(a + o)]
        p = p_all[a + o]
        true = p * np.array([2.5 if k.cin % 8 else 0.6 for k in ks])
        kernels += ks
        prior.append(p)
        ms.append(true)
        groups += [f"net{g}"] * len(ks)
        net[f"net{g}"] = float(true.sum() * (1 + rng.uniform(0.25, 0.45) if g % 3 == 0 else 1.0))
        whole[f"net{g}"] = (tuple(ks), p)
    pts = Points(tuple(kernels), np.concatenate(prior), np.concatenate(ms), tuple(groups), net, whole)
    corr, summary = fit_corrections(pts, replace(cpu, prior=cpu, predictors={}))
    cv = summary["cross_validation"]
    sel = summary["selection"]
    # the networks alone would keep a scale: it has the lowest held-out network error
    assert sel["lowest_network_mape"]["method"] in ("scale", "class_scale")
    assert summary["method"] in ("residual_trees", "per_kind") and summary["method"] in sel["tied_methods"]
    assert cv[summary["method"]]["kernels"]["latency_weighted_mape_pct"] < \
        0.5 * cv["class_scale"]["kernels"]["latency_weighted_mape_pct"]


def test_a_network_timed_in_two_rounds_stays_in_one_fold():
    """calibrate --adapt --add prefixes a later round's records (r2/...): the same network
    timed in two rounds must fall in one cross-validation fold, or its twin would train the
    correction that is scored on it."""
    from archpass.costmodel import adapt as A

    keys = [f"net-{i}" for i in range(40)]
    assert all(A._fold(f"r2/{k}") == A._fold(k) == A._fold(f"r13/{k}") for k in keys)
    assert len({A._fold(k) for k in keys}) == A.FOLDS  # the folds still spread
    # only a leading round prefix goes
    assert [A.ROUND_PREFIX.sub("", k) for k in ("rr/x", "net/r2/x", "r2x", "r2/x")] == ["rr/x", "net/r2/x", "r2x", "x"]
