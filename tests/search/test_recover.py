"""Weight recovery: least squares on known answers, and refits that must find the exact weights again."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from archpass.analysis import analyze
from archpass.model import model_from_proto
from archpass.passes.engine import apply_recipe
from archpass.recipe import Recipe
from archpass.search.calib import CalibData
from archpass.search.fidelity import compare, feeds_for
from archpass.search.recover import ReferenceRows, recover, refits, ridge_fit
from archpass.search.runner import Runner
from builders import NetBuilder


def test_ridge_fit_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 12)).astype(np.float32)
    w, b = rng.standard_normal((12, 5)), rng.standard_normal(5)
    y = (a @ w + b).astype(np.float32)
    w2, b2, info = ridge_fit(a, y)
    np.testing.assert_allclose(w2, w, atol=1e-3)
    np.testing.assert_allclose(b2, b, atol=1e-3)
    assert info["kept"] == "refit" and info["err_fit"] < 1e-6


def test_ridge_fit_with_relu6_in_mind_beats_plain_least_squares():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4000, 6)).astype(np.float32)
    z = (a @ rng.standard_normal((6, 3)) * 3 + np.sin(a[:, :3]) * 2).astype(np.float32)  # not exactly linear

    def post(v):
        return np.clip(v, 0, 6)

    w_plain, b_plain, _ = ridge_fit(a, z)
    w_act, b_act, info = ridge_fit(a, z, activation="relu6")
    e_plain = np.mean((post(a @ w_plain + b_plain) - post(z)) ** 2)
    e_act = np.mean((post(a @ w_act + b_act) - post(z)) ** 2)
    assert e_act <= e_plain


def test_ridge_fit_keeps_better_naive_weights():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 4)).astype(np.float32)
    w = rng.standard_normal((4, 2)).astype(np.float32)
    y = a @ w
    _, _, info = ridge_fit(a, y, intercept=False, naive=(w, None))
    assert info["kept"] == "naive"


def _set(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in proto.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def _get(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def _node_input(proto, node, i):
    return next(n.input[i] for n in proto.graph.node if n.name == node)


def _lossy(applied):
    """The same application with every rewrite treated as lossy (so recovery refits it)."""
    return replace(applied, rewrites=tuple(dict(r, exact=False) for r in applied.rewrites))


def _recovered_score(model, structure, applied, data):
    ref = ReferenceRows(model.proto, data.arrays)
    rec = recover(applied, ref, feeds_for(applied.proto, data.arrays), source=structure)
    out = Runner(rec.proto).run(data.arrays)
    return compare(Runner(model.proto).run(data.arrays), out).score, rec


def test_exact_rewrite_with_spoilt_weights_is_recovered_to_float_error():
    """Rounding a group up pads zero channels (exact); spoil the consumer's weights and
    recovery must find the exact ones again: the true weights fit with zero error."""
    b = NetBuilder((1, 3, 12, 12), seed=4).conv(8, 3, 2, act="relu").ibn(8, expand=3, act="relu")
    m = model_from_proto(b.head(5).build())
    s = analyze(m)
    grp = s.layer("ibn0_project").in_groups[0]
    applied = _lossy(apply_recipe(m, Recipe.of([{"pass": "channels", "site": grp, "channels": 32}]), structure=s))
    assert [r.layer for r in refits(applied)] == ["ibn0_project"]
    w = _node_input(applied.proto, "ibn0_project", 1)
    _set(applied.proto, w, _get(applied.proto, w) + np.random.default_rng(0).standard_normal(_get(applied.proto, w).shape))
    data = CalibData({"input": np.random.default_rng(1).standard_normal((64, 3, 12, 12)).astype(np.float32)}, True, "t")
    spoilt = compare(Runner(m.proto).run(data.arrays), Runner(applied.proto).run(data.arrays)).score
    score, rec = _recovered_score(m, s, applied, data)
    assert spoilt < 0.9
    assert score > 1 - 1e-7  # SNR above 70 dB
    assert [f.kept for f in rec.fits] == ["refit"]


def test_fused_conv_with_an_exact_solution_is_recovered():
    """An IBN whose expand output never leaves ReLU6's linear range and has no bias: the
    composed KxK conv is the exact answer; recovery from spoilt weights must find it."""
    b = NetBuilder((1, 4, 10, 10), seed=5).ibn(8, expand=2, act="relu6", residual=False)
    proto = b.head(3).build()
    _set(proto, "ibn0_expand_w", np.abs(_get(proto, "ibn0_expand_w")) * 0.2)
    _set(proto, "ibn0_expand_b", np.zeros_like(_get(proto, "ibn0_expand_b")))
    m = model_from_proto(proto)
    s = analyze(m)
    applied = apply_recipe(m, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}]), structure=s)
    assert [r.layer for r in refits(applied)] == ["ibn0_dw", "ibn0_project"]
    x = np.random.default_rng(2).random((48, 4, 10, 10)).astype(np.float32)  # inputs >= 0: ReLU6 stays linear
    data = CalibData({"input": x}, False, "t")
    naive = compare(Runner(m.proto).run(data.arrays), Runner(applied.proto).run(data.arrays)).score
    assert naive == pytest.approx(1.0, abs=1e-9)  # the composition is exact on this data
    fw = _node_input(applied.proto, "ibn0_dw", 1)
    good = _get(applied.proto, fw)
    _set(applied.proto, fw, good * 0.5 + 0.1)
    score, rec = _recovered_score(m, s, applied, data)
    assert score > 1 - 1e-8
    np.testing.assert_allclose(_get(rec.proto, _node_input(rec.proto, "ibn0_dw", 1)), good, atol=1e-3)


def test_recovery_only_touches_the_layers_the_recipe_changed():
    b = NetBuilder((1, 3, 16, 16), seed=6).conv(16, 3, 2, act="relu6")
    b.ibn(16, expand=4, act="relu6").ibn(24, expand=4, stride=2, act="relu6").ibn(24, expand=4, act="relu6")
    m = model_from_proto(b.head(10).build())
    s = analyze(m)
    applied = apply_recipe(m, Recipe.of([{"pass": "fuse_ibn", "site": "block1"}]), structure=s)
    data = CalibData({"input": np.random.default_rng(3).standard_normal((64, 3, 16, 16)).astype(np.float32)}, True, "t")
    score, rec = _recovered_score(m, s, applied, data)
    # the fused conv, the projection, and the layer reading the block output
    assert [f.layer for f in rec.fits] == ["ibn1_dw", "ibn1_project", "ibn2_expand"]
    changed = {t.name for t in rec.proto.graph.initializer} ^ {t.name for t in applied.proto.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in applied.proto.graph.initializer}
    edited = {t.name for t in rec.proto.graph.initializer
              if t.name in before and not np.array_equal(before[t.name], numpy_helper.to_array(t))}
    owners = {n.name for n in rec.proto.graph.node if set(n.input) & (edited | changed)}
    assert owners <= {"ibn1_dw", "ibn1_project", "ibn2_expand"}
    onnx.checker.check_model(rec.proto, full_check=True)


def _linear_over_positions_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> NHWC -> Linear(16) -> ReLU -> Linear(8) -> NCHW, plus the conv's output (a
    residual) -> pool -> classifier, the Linears as MatMul + Add over [N, H, W, C] (a
    ConvNeXt block's pointwise layers; canonical form flattens them to Gemms over
    [N*H*W, C] rows, shapes that spell the batch)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)

    def t(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [t("c1_w", (8, 4, 1, 1)), t("c1_b", (8,)), t("m1_w", (8, 16)), t("m1_b", (16,)), t("m2_w", (16, 8)),
             t("m2_b", (8,)), t("fc_w", (3, 8)), t("fc_b", (3,))]
    mk = helper.make_node
    nodes = [mk("Conv", ["input", "c1_w", "c1_b"], ["c1"], name="c1"),
             mk("Transpose", ["c1"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             mk("MatMul", ["nhwc", "m1_w"], ["m1"], name="m1"), mk("Add", ["m1", "m1_b"], ["m1a"], name="m1_add"),
             mk("Relu", ["m1a"], ["r1"], name="r1"),
             mk("MatMul", ["r1", "m2_w"], ["m2"], name="m2"), mk("Add", ["m2", "m2_b"], ["m2a"], name="m2_add"),
             mk("Transpose", ["m2a"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             mk("Add", ["nchw", "c1"], ["res"], name="residual"),
             mk("GlobalAveragePool", ["res"], ["gap"], name="gap"), mk("Flatten", ["gap"], ["flat"], name="flat"),
             mk("Gemm", ["flat", "fc_w", "fc_b"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "linear_over_positions", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_linear_over_positions_is_refitted_row_by_position():
    """A Linear over positions reads rows of channels (the last axis).  Zero-pad the group
    the residual ties together, spoil both of its consumers, and recovery must find their
    exact weights again: the Linear from 40 samples x 36 positions, the classifier from
    40 rows, its inputs computed from a flattened [N*H*W, C] tensor and an NCHW one at once."""
    m = model_from_proto(_linear_over_positions_net())
    s = analyze(m)
    m1 = next(l for l in s.layers if l.id == "m1")
    assert m1.op == "Gemm" and m1.cin == 8
    grp = m1.in_groups[0]
    assert s.layer("fc").in_groups == (grp,)
    applied = _lossy(apply_recipe(m, Recipe.of([{"pass": "channels", "site": grp, "channels": 16}]), structure=s))
    assert [r.layer for r in refits(applied)] == ["m1", "fc"]
    good = {}
    for k, layer in enumerate(("m1", "fc")):
        w = _node_input(applied.proto, layer, 1)
        good[layer] = _get(applied.proto, w)
        _set(applied.proto, w, good[layer] + 3 * np.random.default_rng(k).standard_normal(good[layer].shape))
    data = CalibData({"input": np.random.default_rng(1).standard_normal((40, 4, 6, 6)).astype(np.float32)}, True, "t")
    spoilt = compare(Runner(m.proto).run(data.arrays), Runner(applied.proto).run(data.arrays)).score
    score, rec = _recovered_score(m, s, applied, data)
    assert spoilt < 0.9
    assert score > 1 - 1e-6  # SNR above 60 dB
    assert [(f.layer, f.kept, f.rows) for f in rec.fits] == [("m1", "refit", 40 * 36), ("fc", "refit", 40)]
    onnx.checker.check_model(rec.proto, full_check=True)


@pytest.mark.slow
def test_recovery_raises_fidelity_on_mobilenet_v2(zoo_model):
    from archpass.model import load_model
    from archpass.search.fidelity import FidelityEvaluator, load_calibration

    m = load_model(zoo_model("mobilenet_v2"))
    s = analyze(m)
    ev = FidelityEvaluator(m, load_calibration(None, m, samples=4), structure=s)
    e = ev.evaluate(Recipe.of([{"pass": "fuse_ibn", "site": "block3"}]))
    assert e.after is not None and e.after.score > e.before.score


@pytest.mark.slow
def test_recovery_runs_through_convnext(zoo_model):
    """ConvNeXt's Linears run over flattened positions ([N*H*W, C] after canonicalization)
    next to NCHW residuals: recovery computed their inputs from both at once and crashed."""
    from archpass.model import load_model
    from archpass.search.fidelity import FidelityEvaluator, load_calibration

    m = load_model(zoo_model("convnext_tiny"))
    s = analyze(m)
    ev = FidelityEvaluator(m, load_calibration(None, m, samples=2), structure=s)
    group = next(l.in_groups[0] for l in s.layers if l.op == "Gemm" and l.in_hw[0] == 3136)
    e = ev.evaluate(Recipe.of([{"pass": "channels", "site": group, "channels": 64}]))
    fits = {f.layer: f for f in e.fits}
    linears = [f for f in fits.values() if f.rows and s.layer(f.layer).op == "Gemm" and s.layer(f.layer).in_hw[0] == 3136]
    assert linears and all(f.kept in ("refit", "naive") for f in linears)
    assert e.after is not None and e.after.score >= e.before.score


def test_ridge_too_weak_to_factor_is_skipped_not_solved_by_svd():
    """Collinear inputs (a duplicated channel) and no ridge: the Gram matrix cannot be
    Cholesky-factored.  That strength is skipped instead of solved by an SVD least squares
    (1 s per solve at 1536 inputs: 30 of ConvNeXt-T's 250 s in post-training mode), and the
    fit is as good from the next strength."""
    from unittest import mock

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 64)).astype(np.float32)
    a[:, 1], a[:, 2] = a[:, 0], 2 * a[:, 0]
    y = (a @ rng.standard_normal((64, 8))).astype(np.float32)
    real = np.linalg.lstsq
    calls = []
    with mock.patch("numpy.linalg.lstsq", side_effect=lambda *x, **k: (calls.append(1), real(*x, **k))[1]):
        w, b, info = ridge_fit(a, y, alphas=(0.0, 1e-3, 1.0))
    assert not calls and info["alpha"] == 1e-3
    assert np.abs(a @ w + b - y).max() < 1e-2 * np.abs(y).max()
    # the strongest ridge is still solved when nothing weaker factors
    with mock.patch("scipy.linalg.cho_factor", side_effect=np.linalg.LinAlgError("not positive definite")):
        w, b, info = ridge_fit(a, y, alphas=(0.0, 1e-3))
    assert info["alpha"] == 1e-3 and np.isfinite(w).all()


def test_recovery_refits_1d_convs(tmp_path):
    """A 1-D network's layers are refitted like 2-D ones of height 1 (im2col over time)."""
    from archpass import api
    from builders import conv1d_net

    src = tmp_path / "net1d.onnx"
    onnx.save(conv1d_net(), str(src))
    recipe = {"rewrites": [{"pass": "channels", "site": "group2", "channels": 24}]}
    doc = api.apply(src, recipe, tmp_path / "cut.onnx", calib="random", calib_options={"samples": 64})
    fid = doc["fidelity"]
    assert fid["after"]["score"] > fid["before"]["score"] + 0.01
    refit = [f for f in fid["recovered_layers"] if f["kept"] == "refit"]
    assert {"proj"} <= {f["layer"] for f in refit}
    onnx.checker.check_model(str(tmp_path / "cut.onnx"), full_check=True)
    w = {t.name: tuple(t.dims) for t in onnx.load(str(tmp_path / "cut.onnx")).graph.initializer}
    assert w[[n for n in w if "proj" in n or n == "w_proj"][0]] == (16, 24, 1)
