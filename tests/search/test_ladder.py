"""The post-training ladder: options, probes, the greedy ladder, the climb, and the run around it."""

import math

import numpy as np
import onnx
import pytest

from archpass import api
from archpass.analysis import analyze
from archpass.costmodel import load_target
from archpass.model import load_model
from archpass.recipe import Recipe, Rewrite
from archpass.search import ladder as lad
from archpass.search.guard import Guard, fidelity_guard
from archpass.search.objective import Objective
from archpass.search.run import finalists
from archpass.search.space import Space
from archpass.search.study import TrialRecord


def _prep(path):
    s = analyze(load_model(path))
    space = Space.build(s, parallelism=8)
    return space, Objective(space, load_target("edgetpu"))


class RatioGuard:
    """An additive fake guard: each rewrite costs a known error ratio; counts evaluations."""

    def __init__(self, cost, threshold=0.99):
        self.calls = []

        def scorer(recipe):
            self.calls.append(recipe)
            return lad.share(sum(cost(r) for r in recipe))

        self.guard = Guard("fidelity", threshold, scorer, baseline=1.0, additive=True)

    def factory(self, job, model, structure):
        return self.guard


def _cost(r: Rewrite) -> float:
    """Late, wide groups are cheap to cut; everything else is expensive."""
    if r.pass_name == "channels" and r.site in ("group6", "group7"):
        return 0.002
    return 0.05


def test_error_ratio_and_share_are_inverse():
    for s in (1.0, 0.999, 0.99, 0.5, 0.1):
        assert lad.share(lad.error_ratio(s)) == pytest.approx(s)
    assert lad.error_ratio(0.99) == pytest.approx(1 / 99)
    assert lad.error_ratio(float("nan")) == math.inf and lad.share(math.inf) == 0.0
    # two independent errors of 0.99 each: about 0.98
    assert lad.share(2 * lad.error_ratio(0.99)) == pytest.approx(0.98, abs=2e-4)


def test_ladder_takes_the_most_gain_per_error_first_one_value_per_parameter():
    o = lad.Option
    opts = [o("a", 0.5, 10.0, 0.90), o("a", 0.75, 6.0, 0.999), o("b", True, 5.0, 0.95), o("c", 0.5, 1.0, None)]
    steps = lad.ladder(opts)
    assert [dict((p, x.value) for p, x in s.items()) for s in steps] == [
        {"a": 0.75}, {"a": 0.75, "b": True}, {"a": 0.5, "b": True}]
    for earlier, later in zip(steps, steps[1:]):  # nested: each rung adds or upgrades one parameter
        assert set(earlier) <= set(later)
        assert sum(x.gain for x in later.values()) > sum(x.gain for x in earlier.values())
    assert "c" not in steps[-1]  # never probed: not on the ladder


def test_options_are_single_choices_that_save_latency(small_model):
    space, obj = _prep(small_model)
    opts = lad.options(space, obj)
    assert opts and all(x.gain > 0 for x in opts)
    assert [x.gain for x in opts] == sorted((x.gain for x in opts), reverse=True)
    neutral = space.neutral_params()
    assert all(x.param in neutral and x.value != neutral[x.param] for x in opts)
    assert any(x.param.startswith("channels:") for x in opts) and any(x.param.startswith("fuse_ibn:") for x in opts)
    keys = [x.recipe.dumps() for x in opts]
    assert len(keys) == len(set(keys))  # factors that snap to the same count are one option


def test_probes_cover_every_parameter_before_a_second_value(small_model):
    space, obj = _prep(small_model)
    opts = lad.options(space, obj)
    params = {x.param for x in opts}
    fake = RatioGuard(_cost)
    probed = [x for x in lad.probe(opts, fake.guard, space, budget=len(params)) if x.score is not None]
    assert len(probed) == len(params) == len(fake.calls)
    assert {x.param for x in probed} == params
    # the most aggressive value of each parameter (largest gain) is the one probed
    for x in probed:
        assert x.gain == max(y.gain for y in opts if y.param == x.param)


def test_explore_finds_the_fastest_passing_rung_in_few_evaluations(small_model):
    space, obj = _prep(small_model)
    fake = RatioGuard(_cost)
    found = lad.explore(space, obj, fake.guard, probes=200, rungs=6)
    probes = sum(1 for x in found.options if x.score is not None)
    assert len(fake.calls) <= probes + 6
    assert found.best is not None and found.best.ok and found.best.score >= 0.99
    assert found.best.value < obj.baseline.values[0]
    # the best rung cuts the cheap groups and nothing expensive
    sites = {r.site for r in found.best.recipe}
    assert sites and sites <= {"group6", "group7"}
    checked = [r for r in found.rungs if r.score is not None]
    assert all(r.ok == (r.score >= 0.99) for r in checked)
    # rungs are ordered by falling predicted score; a rung after the best one that passed failed
    preds = [r.predicted for r in found.rungs]
    assert preds == sorted(preds, reverse=True)
    doc = found.to_json()
    assert doc["probed"] == probes and doc["best"]["ok"]
    for p in doc["probes"]:  # each probe is the one option alone, a recipe of one rewrite
        assert len(Recipe.from_json(p["recipe"])) == 1


def test_finalists_start_from_a_known_passing_candidate():
    cands = [TrialRecord(i, (float(i),), Recipe((Rewrite("channels", f"group{i}", {"channels": 8}),)), {}, (0.0,), None)
             for i in range(40)]
    calls = []
    guard = Guard("fidelity", 0.0, lambda r: calls.append(r) or (1.0 if int(r.rewrites[0].site[5:]) >= 3 else -1.0))
    guard.check(cands[20].recipe)  # what the ladder found
    calls.clear()
    chosen, checked = finalists(guard, cands, budget=30)
    assert chosen.number == 3
    # only candidates better than the incumbent were evaluated, closest first
    assert [int(r.rewrites[0].site[5:]) for r in calls] == list(range(19, -1, -1))
    assert len(checked) == 21


def test_optimize_post_training_ladder_beats_failing_fast_candidates(small_model, tmp_path):
    fake = RatioGuard(_cost)
    doc = api.optimize(small_model, tmp_path / "out.onnx", "edgetpu", trials=30, guard=True,
                       guard_factory=fake.factory, finalists=4, granularity="group")
    assert doc["improved"] and doc["fidelity"]["ok"] and doc["fidelity"]["score"] >= 0.99
    assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
    assert {r["site"] for r in doc["recipe"]["rewrites"]} <= {"group6", "group7"}
    assert doc["ladder"]["best"]["ok"] and doc["ladder"]["probed"] > 0
    # the rung is a trial of the study (its record and estimate are stored like any other)
    from archpass.search import study as st

    recs = st.records(st.load_study(tmp_path / "out.study.jsonl", sampler=None))
    assert any(r.recipe.to_json() == doc["recipe"] for r in recs)
    keys = [r.dumps() for r in fake.calls]
    assert len(keys) == len(set(keys)), "a recipe was evaluated twice"
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_a_guard_that_is_not_additive_gets_no_ladder(small_model, tmp_path):
    fake = RatioGuard(_cost)
    fake.guard.additive = False
    doc = api.optimize(small_model, tmp_path / "out.onnx", "edgetpu", trials=10, guard=True,
                       guard_factory=fake.factory, finalists=2)
    assert "ladder" not in doc and fake.guard.evaluations <= 2


def test_explore_with_the_real_fidelity_guard(small_model):
    """Recovered fidelity on a small IBN network: probes and rungs are real guard evaluations."""
    from archpass.search.calib import load_calibration

    m = load_model(small_model)
    s = analyze(m)
    space = Space.build(s, parallelism=8, passes=("channels",))
    obj = Objective(space, load_target("edgetpu"))
    data = load_calibration(None, m, samples=32)
    guard = fidelity_guard(m, s, data, min_fidelity=0.99)
    found = lad.explore(space, obj, guard, probes=6, rungs=3)
    assert guard.evaluations <= 9
    probed = [x for x in found.options if x.score is not None]
    assert len(probed) == 6 and all(0.0 <= x.score <= 1.0 for x in probed)
    for r in found.rungs:
        if r.ok:  # a passing rung carries its recovered weights, ready to emit
            proto = guard.model_for(r.recipe)
            assert proto is not None
            onnx.checker.check_model(proto, full_check=True)


def test_options_on_mobilenet_v2_reach_the_head(zoo_model):
    """On a real architecture the wide head group's cut is an option with a latency gain."""
    m = load_model(zoo_model("mobilenet_v2"))
    s = analyze(m)
    space = Space.build(s, parallelism=8, passes=("channels",))
    opts = lad.options(space, Objective(space, load_target("edgetpu")))
    head = max(s.groups, key=lambda g: g.channels if g.adjustable else 0)
    assert head.channels == 1280
    assert any(x.param == f"channels:{head.id}" and x.gain > 0 for x in opts)
    assert np.all(np.diff([x.gain for x in opts]) <= 0)


def test_a_passing_rung_is_chosen_with_several_objectives_though_off_the_front(small_model, tmp_path):
    fake = RatioGuard(_cost)
    doc = api.optimize(small_model, tmp_path / "out.onnx", "edgetpu", trials=30, objective="latency,memory",
                       guard=True, guard_factory=fake.factory, finalists=4, granularity="group")
    assert doc["improved"] and doc["fidelity"]["ok"]
    assert {r["site"] for r in doc["recipe"]["rewrites"]} <= {"group6", "group7"}
    b, a = doc["baseline"], doc["optimized"]
    assert a["latency_ms"] < b["latency_ms"]
    assert a["params_bytes"] + a["peak_activation_bytes"] <= b["params_bytes"] + b["peak_activation_bytes"]
