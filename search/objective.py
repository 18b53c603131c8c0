"""Scoring a recipe: shapes only, through the cost model.

``recipe → apply_recipe_shapes → costmodel.estimate``: no ONNX is touched.  A recipe
the passes refuse is an *infeasible* trial (its reason is a trial attribute and one
of its constraint values is positive), never an exception through Optuna.  Budgets
are Optuna constraints (positive = violated), so constrained samplers learn them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from archpass.costmodel import Estimate, Target, estimate
from archpass.errors import ArchpassError
from archpass.passes.engine import apply_recipe_shapes
from archpass.recipe import Recipe
from archpass.search.space import Space, recipe_key
from archpass.structure import Structure

OBJECTIVES = ("latency", "memory", "macs")
MB = 1e6  # budgets are in decimal megabytes
SEED_RECIPE_ATTR = "seed_recipe"  # user attribute of an enqueued --seed-recipe trial: the recipe it scores
MAX_SHORTFALL = 1e12  # a --min-metric the evaluator did not report (Optuna constraints stay finite)


class ObjectiveError(ArchpassError):
    """An unknown objective or an unusable budget."""


def metrics(est: Estimate) -> dict[str, float]:
    """What the search reports of an estimate (the keys of ``--json``'s baseline/optimized)."""
    return {"latency_ms": est.latency_ms, "params_bytes": est.params_bytes,
            "peak_activation_bytes": est.peak_activation_bytes, "macs": est.macs}


def objective_value(name: str, m: Mapping[str, float]) -> float:
    if name == "latency":
        return float(m["latency_ms"])
    if name == "memory":
        return float(m["params_bytes"] + m["peak_activation_bytes"])
    if name == "macs":
        return float(m["macs"])
    raise ObjectiveError(f"unknown objective '{name}'", f"use one or more of {', '.join(OBJECTIVES)}")


def parse_objectives(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ObjectiveError("no objective given", f"use one or more of {', '.join(OBJECTIVES)}")
    for n in names:
        if n not in OBJECTIVES:
            raise ObjectiveError(f"unknown objective '{n}'", f"use one or more of {', '.join(OBJECTIVES)} (comma-separated)")
    if len(set(names)) != len(names):
        raise ObjectiveError(f"objective named twice in '{','.join(names)}'", "name each objective once")
    return tuple(names)


@dataclass(frozen=True)
class Budgets:
    max_latency_ms: float | None = None
    max_params_mb: float | None = None
    max_peak_mb: float | None = None

    def __post_init__(self):
        for k, v in self.items():
            if v is not None and not v > 0:
                raise ObjectiveError(f"--{k.replace('_', '-')} must be positive, got {v}", "give a budget above 0")

    def items(self) -> list[tuple[str, float | None]]:
        return [("max_latency_ms", self.max_latency_ms), ("max_params_mb", self.max_params_mb),
                ("max_peak_mb", self.max_peak_mb)]

    def violations(self, m: Mapping[str, float]) -> tuple[float, ...]:
        """Relative excess over each set budget (<= 0 when met), in a fixed order."""
        have = {"max_latency_ms": m["latency_ms"], "max_params_mb": m["params_bytes"] / MB,
                "max_peak_mb": m["peak_activation_bytes"] / MB}
        return tuple((have[k] - v) / v for k, v in self.items() if v is not None)

    def describe(self) -> dict:
        return {k: v for k, v in self.items() if v is not None}


@dataclass(frozen=True)
class Score:
    """A recipe and what it costs (``metrics`` None when the passes refused it)."""

    recipe: Recipe
    metrics: Mapping[str, float] | None
    values: tuple[float, ...] | None
    violations: tuple[float, ...] = ()
    reason: str | None = None

    @property
    def valid(self) -> bool:
        return self.metrics is not None

    @property
    def within_budget(self) -> bool:
        return self.valid and all(v <= 0 for v in self.violations)


@dataclass
class Objective:
    """The Optuna objective: a trial's recipe from ``space``, scored on ``target``.

    Constraint values (positive = violated): one per budget, then one for a recipe the
    passes refused, then one per ``--min-metric`` when the user's evaluator runs
    (``evaluation``, an :class:`~archpass.search.evaluator.EvaluationStep`: only on
    candidates within the constraints so far whose cost ranks among the study's best,
    see :meth:`evaluate`).  The accuracy guard is not part of it: it costs seconds per
    candidate and runs on finalists only (:func:`archpass.search.run.choose`).

    A trial enqueued with a ``seed_recipe`` user attribute (``--seed-recipe``) scores
    that recipe instead of suggesting one."""

    space: Space
    target: Target
    objectives: tuple[str, ...] = ("latency",)
    budgets: Budgets = field(default_factory=Budgets)
    worker: int | str | None = None  # with several workers, each trial records which one ran it
    evaluation: Any = None  # EvaluationStep: the user's evaluator on promising candidates
    baseline: Score = field(init=False)

    def __post_init__(self):
        self.baseline = self.score_structure(Recipe(), self.space.structure)

    @property
    def structure(self) -> Structure:
        return self.space.structure

    def score_structure(self, recipe: Recipe, structure: Structure) -> Score:
        m = metrics(estimate(structure, self.target, best_order=False))
        return Score(recipe, m, tuple(objective_value(o, m) for o in self.objectives), self.budgets.violations(m))

    def score(self, recipe: Recipe) -> Score:
        """Score any recipe; a refused one comes back with its reason, not an exception."""
        try:
            s = apply_recipe_shapes(self.structure, recipe)
        except ArchpassError as exc:
            return Score(recipe, None, None, reason=exc.line())
        return self.score_structure(recipe, s)

    def __call__(self, trial) -> float | tuple[float, ...]:
        seed = trial.user_attrs.get(SEED_RECIPE_ATTR)
        try:
            if seed is not None:
                recipe = Recipe.from_json(seed)
                structure = apply_recipe_shapes(self.structure, recipe)
            else:
                recipe, structure = self.space.suggest(trial)
            sc = self.score_structure(recipe, structure)
        except ArchpassError as exc:
            # the passes refused a pick: infeasible, scored as the unchanged model
            recipe = Recipe()
            sc = Score(recipe, None, None, reason=exc.line())
        trial.set_user_attr("recipe", recipe.to_json())
        if self.worker is not None:
            trial.set_user_attr("worker", self.worker)
        if not sc.valid:
            trial.set_user_attr("invalid", sc.reason)
            values = self.baseline.values
            cons = [0.0] * len(self.budgets.describe()) + [1.0]
        else:
            trial.set_user_attr("estimate", dict(sc.metrics))
            values = sc.values
            cons = list(sc.violations) + [0.0]
        if self.evaluation is not None:
            cons += self.evaluate(trial, recipe, values[0], feasible=sc.valid and all(c <= 0 for c in cons))
        trial.set_user_attr("constraints", cons)
        return values[0] if len(values) == 1 else tuple(values)

    def evaluate(self, trial, recipe: Recipe, value: float, feasible: bool) -> list[float]:
        """The ``--min-metric`` constraint values of a trial: the user's evaluator runs when
        the candidate is within every other constraint and its cost ``value`` ranks among
        the ``--evaluate-top`` best of the study so far (every worker's trials count, so
        with a shared database the evaluations spread over the workers).  A candidate not
        evaluated is infeasible when minimums are set (its metrics are unknown); a failed
        run raises EvaluatorFailure, which fails the trial."""
        ev = self.evaluation
        skipped = [1.0] * len(ev.minimums)
        study = getattr(trial, "study", None)  # FixedTrial has none: always evaluate
        if not feasible:
            return skipped
        if study is not None and not ev.promising(study, value):
            if ev.minimums:
                trial.set_user_attr("evaluator", {"ok": None, "reason": f"not evaluated: its cost is not among the "
                                                  f"{ev.top_k} best so far (--evaluate-top)"})
            return skipped
        return [min(v, MAX_SHORTFALL) for v in ev(trial, recipe)]


def constraints(trial) -> Sequence[float]:
    """Optuna ``constraints_func``: the values the objective stored (positive = violated)."""
    return trial.user_attrs.get("constraints", (1.0,))


__all__ = ["Budgets", "Objective", "Score", "constraints", "metrics", "objective_value", "parse_objectives",
           "recipe_key", "OBJECTIVES"]
