import pytest
from optuna.trial import FixedTrial

from archpass.analysis import analyze
from archpass.costmodel import estimate, load_target
from archpass.errors import RecipeError
from archpass.model import model_from_proto
from archpass.recipe import Recipe, Rewrite
from archpass.search.objective import Budgets, Objective, ObjectiveError, objective_value, parse_objectives
from archpass.search.space import Space
from search_helpers import ibn_net


@pytest.fixture(scope="module")
def setup():
    s = analyze(model_from_proto(ibn_net()))
    return s, load_target("edgetpu"), Space.build(s, parallelism=8)


def _all_fused(space):
    p = space.neutral_params()
    p.update({k: True for k in p if k.startswith("fuse_ibn:")})
    p["width_multiplier"] = 0.5
    return p


def test_baseline_is_the_estimate_of_the_structure(setup):
    s, t, space = setup
    obj = Objective(space, t, ("latency", "memory", "macs"))
    e = estimate(s, t, best_order=False)
    assert obj.baseline.values == (e.latency_ms, e.params_bytes + e.peak_activation_bytes, e.macs)


def test_trial_carries_recipe_estimate_and_constraints(setup):
    s, t, space = setup
    obj = Objective(space, t)
    trial = FixedTrial(_all_fused(space))
    value = obj(trial)
    attrs = trial.user_attrs
    recipe = Recipe.from_json(attrs["recipe"])
    assert len(recipe) > 0 and value == attrs["estimate"]["latency_ms"]
    assert value == pytest.approx(obj.score(recipe).values[0])
    assert value < obj.baseline.values[0]
    assert attrs["constraints"] == [0.0]


def test_budgets_are_constraints(setup):
    s, t, space = setup
    base = Objective(space, t).baseline.metrics
    obj = Objective(space, t, budgets=Budgets(max_latency_ms=base["latency_ms"] / 100, max_params_mb=1000.0))
    trial = FixedTrial(space.neutral_params())
    obj(trial)
    lat, params, invalid = trial.user_attrs["constraints"]
    assert lat == pytest.approx(99.0) and params < 0 and invalid == 0


def test_a_refused_recipe_is_an_infeasible_trial_not_an_exception(setup):
    s, t, space = setup

    class Refusing(Space):
        def suggest(self, trial):
            raise RecipeError("rewrite #0 (fuse_ibn block0): block0 is a depthwise block", "change it")

    obj = Objective(Refusing(**{f: getattr(space, f) for f in space.__dataclass_fields__}), t)
    trial = FixedTrial({})
    assert obj(trial) == obj.baseline.values[0]
    assert "block0 is a depthwise block" in trial.user_attrs["invalid"]
    assert trial.user_attrs["constraints"][-1] > 0
    sc = obj.score(Recipe((Rewrite("fuse_ibn", "block77"),)))
    assert not sc.valid and "block77" in sc.reason


def test_objective_values_and_names():
    m = {"latency_ms": 2.0, "params_bytes": 10, "peak_activation_bytes": 5, "macs": 7}
    assert [objective_value(o, m) for o in ("latency", "memory", "macs")] == [2.0, 15.0, 7.0]
    assert parse_objectives("latency,memory") == ("latency", "memory")
    with pytest.raises(ObjectiveError, match="unknown objective 'speed'"):
        parse_objectives("speed")
    with pytest.raises(ObjectiveError, match="must be positive"):
        Budgets(max_latency_ms=0)
