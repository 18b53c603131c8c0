"""Warm start: coordinate descent from the unchanged model, enqueued as the study's first trials."""

import optuna
import pytest
from optuna.trial import FixedTrial

from archpass import api
from archpass.analysis import analyze
from archpass.costmodel import load_target
from archpass.model import model_from_proto
from archpass.passes.engine import apply_recipe_shapes
from archpass.recipe import Recipe, Rewrite
from archpass.search.objective import Objective, Score
from archpass.search.space import Space
from archpass.search.warmstart import DefaultTrial, warm_start
from search_helpers import ibn_net


@pytest.fixture(scope="module")
def objective():
    s = analyze(model_from_proto(ibn_net()))
    t = load_target("edgetpu")
    return Objective(Space.build(s, parallelism=t.parallelism, granularity="stage"), t)


def test_default_trial_gives_neutral_values_and_records_the_walk(objective):
    t = DefaultTrial({})
    recipe, _ = objective.space.suggest(t)
    assert len(recipe) == 0
    assert t.used == objective.space.neutral_params()
    # what it records replays exactly through optuna's FixedTrial (what an enqueued trial gets)
    t2 = DefaultTrial({"width_multiplier": 0.5})
    r2, _ = objective.space.suggest(t2)
    assert objective.space.suggest(FixedTrial(t2.used))[0] == r2 and len(r2) == 1


def test_fusion_point_is_the_block_by_block_best_set(objective):
    points = warm_start(objective)
    s = objective.structure
    base = objective.baseline.values[0]
    gains = {b.id for b in s.blocks if b.kind == "ibn"
             if objective.score(Recipe((Rewrite("fuse_ibn", b.id),))).values[0] < base}
    assert gains, "the small net has no block worth fusing on edgetpu: the test needs one"
    fused = {k.split(":", 1)[1] for k, v in points[0].items() if k.startswith("fuse_ibn:") and v}
    assert fused == gains
    assert all(v in (1.0, False) for k, v in points[0].items() if not k.startswith("fuse_ibn:"))


def test_descent_ends_at_a_coordinatewise_minimum_better_than_the_start(objective):
    points = warm_start(objective)
    space = objective.space
    end = points[-1]
    recipe, st = space.suggest(FixedTrial(end))
    value = objective.score_structure(recipe, st).values[0]
    assert value < objective.baseline.values[0]
    assert value <= min(objective.score(space.suggest(FixedTrial(p))[0]).values[0] for p in points)
    # no single parameter change improves it
    t = DefaultTrial(end)
    space.suggest(t)
    for name in t.used:
        choices = space.factors if ":" in name and not name.startswith("fuse_ibn:") else (
            space.multipliers if name == "width_multiplier" else [False, True])
        for v in choices:
            r, s2 = space.suggest(DefaultTrial({**end, name: v}))
            assert objective.score_structure(r, s2).values[0] >= value - 1e-12


class _Fake:
    """A separable objective over a fake space: cost = sum of per-key costs; a budget on one key."""

    def __init__(self, costs, over=()):
        self.costs, self.over, self.calls = costs, set(over), 0

    def __call__(self, params):
        self.calls += 1
        t = DefaultTrial(params)
        for name, choices in self.choices().items():
            t.suggest_categorical(name, choices)
        v = sum(self.costs[k][t.used[k]] for k in self.costs)
        viol = (1.0,) if any((k, t.used[k]) in self.over for k in self.costs) else (-1.0,)
        return Score(Recipe(), {"latency_ms": v}, (v,), viol), t

    def choices(self):
        return {k: list(c) for k, c in self.costs.items()}


def test_descent_finds_the_minimum_of_a_separable_objective_within_budget():
    costs = {"width_multiplier": {0.5: 3.0, 0.75: 1.0, 1.0: 2.0},
             "fuse_ibn:block1": {False: 1.0, True: 0.5},
             "width_multiplier:stage1": {0.5: 0.1, 1.0: 1.0, 1.25: 2.0}}
    fake = _Fake(costs, over=[("width_multiplier:stage1", 0.5)])  # the cheapest value breaks a budget

    class Space_:
        multipliers, factors, resolutions = (0.5, 0.75, 1.0), (0.5, 1.0, 1.25), ()

        def neutral_params(self):
            return {"width_multiplier": 1.0, "fuse_ibn:block1": False, "width_multiplier:stage1": 1.0}

    class Obj:
        space = Space_()

    points = warm_start(Obj(), evaluate=fake)
    assert points[0] == {"width_multiplier": 1.0, "fuse_ibn:block1": True, "width_multiplier:stage1": 1.0}
    assert points[-1] == {"width_multiplier": 0.75, "fuse_ibn:block1": True, "width_multiplier:stage1": 1.0}
    assert fake.calls < 20


def test_search_enqueues_the_points_after_the_unchanged_model(small_model, tmp_path):
    doc = api.optimize(small_model, tmp_path / "out.onnx", "edgetpu", trials=6, guard=False)
    study = optuna.load_study(study_name="archpass-optimize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(doc["storage"])))
    trials = study.get_trials()
    s = analyze(model_from_proto(ibn_net()))
    t = load_target("edgetpu")
    points = warm_start(Objective(Space.build(s, parallelism=t.parallelism, granularity="stage"), t))
    assert trials[0].params == Space.build(s, parallelism=t.parallelism, granularity="stage").neutral_params()
    assert [tr.params for tr in trials[1:1 + len(points)]] == points
    # the result is at least as good as the descent's end
    end = apply_recipe_shapes(s, Space.build(s, parallelism=t.parallelism, granularity="stage")
                              .suggest(FixedTrial(points[-1]))[0])
    from archpass.costmodel import estimate
    assert doc["optimized"]["latency_ms"] <= estimate(end, t, best_order=False).latency_ms + 1e-12
