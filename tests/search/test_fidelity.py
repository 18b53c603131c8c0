"""Fidelity metrics on hand-computed cases, and the evaluator on exact and lossy recipes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archpass.analysis import analyze
from archpass.model import model_from_proto
from archpass.recipe import Recipe
from archpass.search.fidelity import FidelityEvaluator, compare, fidelity, load_calibration, output_fidelity
from builders import NetBuilder


def test_metrics_by_hand():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    cand = np.array([[3.0, 5.0], [0.0, 1.0]])
    o = output_fidelity("y", ref, cand)
    # cosine: (9+20)/(5*sqrt(34)) and 0, averaged
    assert o.cosine == pytest.approx((29 / (5 * math.sqrt(34)) + 0.0) / 2)
    # SNR: signal 25+1 = 26, error 1 + 1 + 1 = 3
    assert o.snr_db == pytest.approx(10 * math.log10(26 / 3))
    assert o.score == pytest.approx(26 / 29)
    assert o.max_abs_error == pytest.approx(1.0)
    assert o.top1_agreement == pytest.approx(0.5)  # sample 0: class 1 both; sample 1: 0 vs 1


def test_identical_and_non_classifier_outputs():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    o = output_fidelity("map", x, x.copy())
    assert o.score == 1.0 and o.cosine == pytest.approx(1.0) and o.max_abs_error == 0.0
    assert o.top1_agreement is None  # two non-batch axes longer than 1: not classifier-shaped
    assert output_fidelity("z", np.zeros((2, 3)), np.zeros((2, 3))).cosine == 1.0
    f = compare([x, np.ones((2, 5))], [x, 2 * np.ones((2, 5))], ["a", "b"], random_data=True)
    assert f.score == pytest.approx(0.5) and f.random_data and f.samples == 2  # worst output decides
    assert f.to_json()["outputs"][1]["snr_db"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def setup():
    b = NetBuilder((1, 3, 16, 16), seed=3).conv(16, 3, 2, act="relu6")
    b.ibn(16, expand=4, act="relu6").ibn(24, expand=4, stride=2, act="relu6").head(10)
    m = model_from_proto(b.build())
    s = analyze(m)
    data = load_calibration(None, m, samples=96, seed=0)
    return m, s, data, FidelityEvaluator(m, data, structure=s)


@pytest.mark.parametrize("recipe", [
    [{"pass": "channels", "site": "group2", "channels": 72}],  # rounding up: zero padding
    [{"pass": "dw_to_dense", "site": "ibn0_dw"}],
])
def test_exact_rewrites_score_one(setup, recipe):
    *_, ev = setup
    e = ev.evaluate(Recipe.of(recipe))
    assert e.before.score == pytest.approx(1.0, abs=1e-9)
    assert e.after is None and not e.fits


@pytest.mark.parametrize("recipe", [
    [{"pass": "fuse_ibn", "site": "block0"}],
    [{"pass": "channels", "site": "group2", "channels": 40}],
    [{"pass": "width_multiplier", "multiplier": 0.75}],
])
def test_lossy_rewrites_score_below_one_and_recovery_raises_it(setup, recipe):
    m, _, data, ev = setup
    e = ev.evaluate(Recipe.of(recipe))
    assert e.before.score < 0.999
    assert e.after is not None and e.after.score > e.before.score
    assert any(f.kept == "refit" for f in e.fits)
    # the recovered proto carries the record and the recovery note, and fidelity() agrees with the evaluator
    keys = {p.key for p in e.proto.metadata_props}
    assert {"archpass.rewrites", "archpass.recovery"} <= keys
    # scored on held-out samples by a fit that never saw them; the emitted weights are refitted on
    # every sample, so on the scoring samples they do at least about as well as that estimate
    assert ev.held_out and ev.score_data.samples + ev.fit_data.samples == data.samples
    assert fidelity(m, e.proto, ev.score_data).score >= e.after.score - 0.01
    assert fidelity(m, e.proto, data).score > e.before.score


def test_split_calibration_holds_out_a_quarter_disjoint_and_seeded():
    from archpass.search.calib import CalibData
    from archpass.search.fidelity import split_calibration

    x = np.arange(40, dtype=np.float32).reshape(40, 1)
    d = CalibData({"x": x}, False, "test")
    fit, score = split_calibration(d, seed=3)
    assert (fit.samples, score.samples) == (30, 10)
    assert not set(fit.arrays["x"][:, 0]) & set(score.arrays["x"][:, 0])
    assert set(fit.arrays["x"][:, 0]) | set(score.arrays["x"][:, 0]) == set(x[:, 0])
    again = split_calibration(d, seed=3)[1]
    assert np.array_equal(again.arrays["x"], score.arrays["x"])
    small = CalibData({"x": x[:8]}, False, "test")
    f2, s2 = split_calibration(small)
    assert f2 is small and s2 is small  # too few samples to split: both use all


def test_resolution_candidates_get_resized_inputs(setup):
    *_, ev = setup
    e = ev.evaluate(Recipe.of([{"pass": "resolution", "height": 12, "width": 12}]))
    assert 0.0 < e.before.score < 1.0 and e.after is None


def test_nhwc_calibration_images_are_resized_on_their_height_and_width_axes():
    """An NHWC input (a Transpose makes it NCHW): a resolution candidate's inputs are resized
    on axes 1 and 2 (they were refused: only axes 2 and 3 were ever resized)."""
    import onnx

    from archpass.search.fidelity import feeds_for
    from builders import nhwc_input

    m = model_from_proto(nhwc_input(NetBuilder((1, 3, 16, 16), seed=3).conv(8, 3, 2, act="relu").head(4).build()))
    data = load_calibration(None, m, samples=8, seed=0)
    assert data.arrays["nhwc"].shape == (8, 16, 16, 3)
    e = FidelityEvaluator(m, data, structure=analyze(m)).evaluate(
        Recipe.of([{"pass": "resolution", "height": 12, "width": 10}]))
    assert 0.0 < e.before.score < 1.0
    small = onnx.ModelProto()
    small.CopyFrom(m.proto)
    for d, v in zip(small.graph.input[0].type.tensor_type.shape.dim, (1, 12, 10, 3)):
        d.dim_value = v
    fed = feeds_for(small, {"nhwc": np.ones((2, 16, 16, 3), dtype=np.float32)})["nhwc"]
    assert fed.shape == (2, 12, 10, 3) and np.allclose(fed, 1.0)


def test_emit_false_scores_the_same_without_the_refit_on_every_sample(setup):
    import json

    from onnx import numpy_helper

    *_, ev = setup
    r = Recipe.of([{"pass": "channels", "site": "group2", "channels": 40}])
    full, quick = ev.evaluate(r), ev.evaluate(r, emit=False)
    assert quick.fidelity.score == pytest.approx(full.fidelity.score, abs=1e-12)
    notes = [json.loads(e.proto.metadata_props[-1].value)["fitted_on"] for e in (full, quick)]
    assert notes == ["every sample", "the samples not held out"]
    w = [{t.name: numpy_helper.to_array(t) for t in e.proto.graph.initializer} for e in (full, quick)]
    assert any(not np.array_equal(w[0][k], w[1][k]) for k in w[0] if k in w[1])  # the refit differs


def test_half_precision_export_is_fed_scored_and_recovered_in_float16(setup):
    """A float16 export (its inputs float16): calibration data is cast at the onnxruntime
    boundary, lossy candidates score as in float32, and recovered weights stay float16."""
    import onnx
    from onnx import TensorProto

    from builders import half_precision, run_ort

    m32, _, data, ev32 = setup
    m16 = model_from_proto(half_precision(m32.proto))
    ev16 = FidelityEvaluator(m16, data)
    recipe = Recipe.of([{"pass": "width_multiplier", "multiplier": 0.75}])
    e16, e32 = ev16.evaluate(recipe), ev32.evaluate(recipe)
    assert e16.before.score < 0.999 and e16.after.score > e16.before.score
    assert e16.before.score == pytest.approx(e32.before.score, abs=0.01)
    assert e16.after.score == pytest.approx(e32.after.score, abs=0.01)
    onnx.checker.check_model(e16.proto, full_check=True)
    assert {t.data_type for t in e16.proto.graph.initializer} == {TensorProto.FLOAT16}
    x = data.arrays["input"][:1].astype(np.float16)
    out = run_ort(e16.proto, {"input": x})[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert fidelity(m16, e16.proto, ev16.score_data).score == pytest.approx(e16.after.score, abs=0.02)


def test_a_reference_that_ignores_its_inputs_is_named():
    """An original whose output is the same for every sample (weights never trained, a
    broken export, samples all alike) makes any candidate that keeps the constant look
    perfect: the fidelity says so (a randomly initialized DeepLabV3 export did this, and
    50 rewrites scored 1.0)."""
    from archpass.search.fidelity import constant_output_notes

    rng = np.random.default_rng(0)
    varying, constant = rng.standard_normal((4, 10)), np.tile(rng.standard_normal(10), (4, 1))
    assert constant_output_notes([varying], ["logits"]) == ()
    (note,) = constant_output_notes([varying, constant + 1e-9 * rng.standard_normal((4, 10))], ["logits", "out"])
    assert "output 'out' is the same for all 4 calibration samples" in note
    offset = 5.0 + 0.01 * varying  # a large constant part: varies by about 0.001 of its size
    (note,) = constant_output_notes([offset], ["logits"])
    assert "varies across the 4 calibration samples by only 0.001 of its size" in note
    assert constant_output_notes([5.0 + 0.2 * varying], ["logits"]) == ()  # a few % varies enough
    assert "all zeros" in constant_output_notes([np.zeros((3, 5))], ["z"])[0]
    assert constant_output_notes([constant[:1]], ["one"]) == ()  # one sample cannot tell

    b = NetBuilder((1, 3, 8, 8), seed=2).conv(8, 3, act="relu")
    b.x = b.node("Mul", [b.x, b.tensor("zero", np.zeros((1,), np.float32))], "mute")
    m = model_from_proto(b.head(4).build())  # the head's bias alone
    data = load_calibration(None, m, samples=6, seed=0)
    assert any("is the same for all 6" in n for n in fidelity(m, m, data).notes)
    assert any("is the same for all" in n for n in FidelityEvaluator(m, data).notes)
    from archpass.search.guard import fidelity_guard

    assert any("is the same for all" in n for n in fidelity_guard(m, analyze(m), data).notes)  # optimize's notes
    live = model_from_proto(NetBuilder((1, 3, 8, 8), seed=2).conv(8, 3, act="relu").head(4).build())
    assert FidelityEvaluator(live, data).notes == () and fidelity(live, live, data).notes == ()
