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


def test_an_enqueued_seed_recipe_is_scored_as_written(setup):
    """A --seed-recipe trial (enqueued with a seed_recipe attribute) scores that recipe, not a suggestion."""
    from archpass.search.objective import SEED_RECIPE_ATTR

    s, t, space = setup
    obj = Objective(space, t)
    seed = Recipe((Rewrite("fuse_ibn", "block2"), Rewrite("channels", "group1", {"channels": 8})))
    trial = FixedTrial({})
    trial.set_user_attr(SEED_RECIPE_ATTR, seed.to_json())
    assert obj(trial) == pytest.approx(obj.score(seed).values[0])
    assert Recipe.from_json(trial.user_attrs["recipe"]) == seed and trial.params == {}
    bad = FixedTrial({})
    bad.set_user_attr(SEED_RECIPE_ATTR, {"rewrites": [{"pass": "fuse_ibn", "site": "block77"}]})
    obj(bad)
    assert "block77" in bad.user_attrs["invalid"] and bad.user_attrs["constraints"][-1] > 0


def _step(model, minimums, **kw):
    import shlex
    import sys
    from pathlib import Path

    from archpass.search.evaluator import EvaluationStep, Evaluator, parse_min_metrics

    script = Path(__file__).with_name("eval_cmd.py")
    extra = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in kw.items())
    ev = Evaluator.parse(f"{shlex.quote(sys.executable)} {script} {{model}} {extra}", timeout_s=60)
    return EvaluationStep(ev, model, parse_min_metrics(minimums), top_k=3)


def test_the_evaluator_adds_min_metric_constraints(setup):
    """--min-metric bounds are constraint values after the budgets and the refusal one; the
    evaluator's metrics are a trial attribute; an infeasible candidate is not evaluated."""
    s, t, space = setup
    model = model_from_proto(ibn_net())
    obj = Objective(space, t, budgets=Budgets(max_params_mb=1000.0),
                    evaluation=_step(model, ["convs=12", "params=1"]))
    neutral = FixedTrial(space.neutral_params())
    obj(neutral)
    ev = neutral.user_attrs["evaluator"]
    convs = sum(n.op_type == "Conv" for n in ibn_net().graph.node)
    assert ev["ok"] and ev["metrics"]["convs"] == convs
    budget, invalid, c_convs, c_params = neutral.user_attrs["constraints"]
    assert budget < 0 and invalid == 0 and c_convs == 12 - convs and c_params < 0
    fused = FixedTrial(_all_fused(space))
    obj(fused)
    assert fused.user_attrs["evaluator"]["metrics"]["convs"] == convs - 4  # four IBN blocks fused
    # over budget: not evaluated, and infeasible on the metric too (its metrics are unknown)
    tight = Objective(space, t, budgets=Budgets(max_params_mb=1e-6), evaluation=_step(model, ["convs=1"]))
    over = FixedTrial(space.neutral_params())
    tight(over)
    assert "evaluator" not in over.user_attrs and over.user_attrs["constraints"][-1] > 0


def test_a_failing_evaluator_fails_the_trial_with_its_stderr(setup):
    from archpass.search.evaluator import EvaluatorFailure

    s, t, space = setup
    obj = Objective(space, t, evaluation=_step(model_from_proto(ibn_net()), [], fail_on="0"))
    trial = FixedTrial(space.neutral_params())
    with pytest.raises(EvaluatorFailure, match="exited with code 3"):
        obj(trial)
    ev = trial.user_attrs["evaluator"]
    assert ev["ok"] is False and "out of memory" in ev["stderr_tail"]
    assert "recipe" in trial.user_attrs and "estimate" in trial.user_attrs  # the report still shows what it was
