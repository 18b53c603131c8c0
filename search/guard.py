"""The accuracy guard: a candidate must keep enough of the model's function.

Two modes (``--mode``):

* **post-training** (the default when calibration data is given): the candidate is
  materialized, its weights recovered on the calibration data, and its *fidelity* to
  the original (:mod:`archpass.search.fidelity`) must be at least ``--min-fidelity``
  (default 0.99);
* **retrain**: the candidate will be trained again, so what matters is whether it can
  learn: a zero-shot trainability score (``fidelity.trainability``: the weakest layer's
  per-position NASWOT score, :mod:`archpass.search.zeroshot`) must be no lower than the
  original model's minus ``PROXY_TOLERANCE`` (default), or ``--min-proxy``.

A guard scores recipes through one callable and caches the result by recipe, so a
candidate visited twice (or a finalist re-checked) is evaluated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from archpass.recipe import Recipe
from archpass.search.space import recipe_key

MODES = ("post-training", "retrain")
DEFAULT_MIN_FIDELITY = 0.99
#: The default retrain guard accepts a score this much below the original's, its noise:
#: seed to seed (redrawn weights, inputs and positions) the score of MobileNetV2 224 has a
#: standard deviation of 0.061 (10 seeds), the difference of two scores 0.087; narrowing
#: one group to 8 channels lowers it by 0.24, the width x0.25 by 0.27, every group at 8 by
#: 0.55, fusing all 16 IBN blocks by nothing (benchmarks/search.py ``proxy`` section).
PROXY_TOLERANCE = 0.15


@dataclass(frozen=True)
class GuardResult:
    kind: str  # "fidelity" or "proxy"
    score: float
    threshold: float
    error: str | None = None  # why the candidate could not be evaluated (counts as failed)

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.score) and self.score >= self.threshold

    def to_json(self) -> dict:
        d = {"kind": self.kind, "score": self.score, "threshold": self.threshold, "ok": self.ok}
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class Guard:
    """``scorer(recipe) -> float`` against ``threshold`` (higher is better), cached by recipe."""

    kind: str
    threshold: float
    scorer: Callable[[Recipe], float]
    baseline: float | None = None  # the original model's score, when known
    #: scores are energy shares (fidelity): a recipe's error ratio (1-s)/s is about the sum of
    #: its rewrites' (what the post-training ladder, :mod:`archpass.search.ladder`, predicts with)
    additive: bool = False
    cache: dict[str, GuardResult] = field(default_factory=dict)
    models: dict[str, object] = field(default_factory=dict)  # recipe key -> the candidate the guard scored, when it
    # is what should be emitted (post-training: the recovered weights)

    #: ``emitter(recipe) -> proto``: what to emit for a recipe that passed, built when first asked
    #: (post-training: the weights refitted on every calibration sample), or None
    emitter: Callable[[Recipe], object] | None = None
    #: what the user should know about the guard's scores (for instance: measured on random inputs)
    notes: tuple[str, ...] = ()

    def model_for(self, recipe: Recipe):
        """The ONNX proto to emit for ``recipe`` (recovered weights), or None: kept by the
        scorer, or built by ``emitter`` once, for a recipe that passed."""
        key = recipe_key(recipe)
        if key not in self.models and self.emitter is not None and self.check(recipe).ok:
            self.models[key] = self.emitter(recipe)
        return self.models.get(key)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def shortfall(self, score: float) -> float:
        """How far below the threshold (a positive constraint value); 1 when not a number."""
        return self.threshold - score if math.isfinite(score) else 1.0

    def known(self, recipe: Recipe) -> GuardResult | None:
        """The cached result for ``recipe``, without evaluating it."""
        return self.cache.get(recipe_key(recipe))

    def check(self, recipe: Recipe) -> GuardResult:
        key = recipe_key(recipe)
        if key not in self.cache:
            from archpass.errors import ArchpassError

            try:
                score = float(self.scorer(recipe))
                self.cache[key] = GuardResult(self.kind, score, self.threshold)
            except ArchpassError as exc:
                self.cache[key] = GuardResult(self.kind, float("nan"), self.threshold, exc.line())
        return self.cache[key]

    def describe(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "baseline": self.baseline,
                "evaluations": self.evaluations}


def fidelity_guard(model, structure, data, *, min_fidelity: float = DEFAULT_MIN_FIDELITY, evaluator=None) -> Guard:
    """Post-training guard: recovered candidates must keep ``min_fidelity`` on ``data``."""
    if evaluator is None:
        from archpass.search.fidelity import FidelityEvaluator

        evaluator = FidelityEvaluator(model, data, structure=structure)

    def score(recipe: Recipe) -> float:
        # scored on the held-out samples, from a fit without them; the refit on every sample is
        # made only for the candidate emitted (``model_for``)
        return evaluator.evaluate(recipe, recover=True, emit=False).fidelity.score

    def emit(recipe: Recipe):
        return evaluator.evaluate(recipe, recover=True).proto  # emitted with its recovered weights

    from archpass.search.fidelity import RANDOM_DATA_NOTE

    return Guard("fidelity", float(min_fidelity), score, baseline=1.0, additive=True, emitter=emit,
                 notes=((RANDOM_DATA_NOTE,) if getattr(data, "random", False) else ()) + tuple(getattr(evaluator, "notes", ())))


def proxy_guard(model, structure, *, min_proxy: float | None = None, seed: int = 0, scorer=None,
                tolerance: float = PROXY_TOLERANCE) -> Guard:
    """Retrain guard: the zero-shot trainability score must stay at ``min_proxy``, by
    default the original model's own score minus ``tolerance`` (its measured noise)."""
    from archpass.passes.engine import apply_recipe

    if scorer is None:
        from archpass.search.fidelity import trainability

        def scorer(proto_or_model):
            return trainability(proto_or_model, seed=seed)

    base = float(scorer(model.proto))

    def score(recipe: Recipe) -> float:
        if not len(recipe):
            return base
        return scorer(apply_recipe(model, recipe, structure=structure, verify=False).proto)

    return Guard("proxy", base - tolerance if min_proxy is None else float(min_proxy), score, baseline=base)
