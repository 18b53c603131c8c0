"""Exploring the latency-fidelity trade-off for the post-training guard: a ladder.

A latency-driven study heads for the fastest corner of the space: on a trained model
nearly every candidate it keeps combines twenty or more lossy rewrites, and none of them
keeps 0.99 fidelity, while far milder candidates with most of the speed-up (a narrower
head whose classifier recovery refits, say) are never sampled.  Checking more of the
study's fastest candidates does not help; the guard has to look elsewhere.

The ladder builds those candidates from the space itself:

1. **Options**: every single non-neutral choice of the space on the unchanged model (one
   parameter changed, the rest neutral) and its *gain*, how much it lowers the first
   objective, from shapes (free).
2. **Probes**: the guard scores options alone, the largest gains first, one option per
   parameter per round (the most aggressive value of every parameter, then the next...),
   at most ``probes`` of them.  A guard whose scores are energy shares
   (``Guard.additive``: fidelity ``s = sig / (sig + err)``) turns each into an error
   ratio ``(1 - s) / s``; independent errors add, so a candidate's predicted score is
   ``1 / (1 + sum of its options' ratios)``.
3. **Ladder**: a greedy multiple-choice knapsack over the probed options (at most one
   value per parameter): repeatedly take the upgrade with the most gain per predicted
   error, giving nested candidates of growing speed and falling predicted fidelity.
4. **Climb**: the guard checks the rung where the prediction crosses the threshold, then
   binary-searches up (it passed) or down (it failed) the ladder, at most ``rungs``
   evaluations; rungs are nested, so fidelity falls along them, which a binary search
   over unrelated study candidates cannot assume.

The rungs that pass are added to the study as trials (enqueued with their parameters), so
the result is chosen among them like any candidate, carries its record, and a resumed run
sees them.  Everything the guard scores is cached by recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import optuna

from archpass.errors import ArchpassError
from archpass.recipe import Recipe
from archpass.search.objective import Objective
from archpass.search.space import Space, recipe_key
from archpass.search.warmstart import DefaultTrial

PROBES = 64  # guard evaluations of single options, at most
RUNGS = 8  # guard evaluations along the ladder, at most


@dataclass(frozen=True)
class Option:
    """One non-neutral choice of one parameter, on the unchanged model."""

    param: str
    value: Any
    gain: float  # first objective saved against the unchanged model (shapes only)
    score: float | None = None  # the guard's score of the option alone (None: not probed)
    recipe: Recipe | None = field(default=None, compare=False)  # the option alone, as a recipe

    @property
    def ratio(self) -> float:
        return error_ratio(self.score) if self.score is not None else math.inf


@dataclass(frozen=True)
class Rung:
    """A candidate of the ladder: its parameters, recipe, first objective, predicted score."""

    params: Mapping[str, Any]
    recipe: Recipe
    value: float
    predicted: float
    score: float | None = None  # the guard's score, when checked
    ok: bool | None = None

    def to_json(self) -> dict:
        changed = {k: v for k, v in self.params.items() if k in self.changed}
        return {"value": self.value, "predicted": self.predicted, "score": self.score, "ok": self.ok,
                "choices": changed, "recipe": self.recipe.to_json()}

    changed: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Exploration:
    options: tuple[Option, ...]
    rungs: tuple[Rung, ...]
    best: Rung | None  # the fastest rung that passed

    def to_json(self) -> dict:
        probed = [o for o in self.options if o.score is not None]
        return {"options": len(self.options), "probed": len(probed),
                "probes": [{"param": o.param, "value": o.value, "gain": o.gain, "score": o.score,
                            "recipe": o.recipe.to_json() if o.recipe is not None else None} for o in probed],
                "rungs": [r.to_json() for r in self.rungs if r.score is not None],
                "best": self.best.to_json() if self.best else None}


def error_ratio(score: float) -> float:
    """``(1 - s) / s`` for an energy share ``s``: the error's energy over the signal's."""
    if not math.isfinite(score) or score <= 0:
        return math.inf
    return max(0.0, (1.0 - score) / score)


def share(ratio: float) -> float:
    """The energy share of an error ratio (the inverse of :func:`error_ratio`)."""
    return 0.0 if math.isinf(ratio) else 1.0 / (1.0 + ratio)


def _suggest(space: Space, params: Mapping[str, Any]):
    return space.suggest(optuna.trial.FixedTrial(dict(params)))


def options(space: Space, objective: Objective) -> list[Option]:
    """Every single non-neutral choice that lowers the first objective and is valid, most gain
    first; one option per distinct recipe (two factors may snap to the same channel count)."""
    neutral = space.neutral_params()
    rec = DefaultTrial(neutral)  # records the values each parameter offers
    space.suggest(rec)
    base = objective.baseline.values[0]
    out, seen = [], set()
    for name, values in rec.choices.items():
        if name not in neutral:
            continue
        for v in values:
            if v == neutral[name]:
                continue
            try:
                recipe, structure = _suggest(space, {**neutral, name: v})
            except (ArchpassError, ValueError):  # refused, or a site the neutral walk does not have
                continue
            if not len(recipe) or recipe_key(recipe) in seen:  # two values may snap to one count
                continue
            seen.add(recipe_key(recipe))
            sc = objective.score_structure(recipe, structure)
            gain = base - sc.values[0]
            if gain > 0:
                out.append(Option(name, v, gain, recipe=recipe))
    return sorted(out, key=lambda o: -o.gain)


def probe(opts: Sequence[Option], guard, space: Space, budget: int = PROBES) -> list[Option]:
    """Score options alone with ``guard``, one per parameter per round (largest gain first), at most ``budget``."""
    neutral = space.neutral_params()
    by_param: dict[str, list[Option]] = {}
    for o in opts:  # already most gain first
        by_param.setdefault(o.param, []).append(o)
    order = sorted(by_param, key=lambda p: -by_param[p][0].gain)
    scored: dict[tuple, float] = {}
    rnd = 0
    while len(scored) < budget and any(rnd < len(by_param[p]) for p in order):
        for p in order:
            if len(scored) >= budget:
                break
            if rnd < len(by_param[p]):
                o = by_param[p][rnd]
                recipe = o.recipe if o.recipe is not None else _suggest(space, {**neutral, o.param: o.value})[0]
                scored[(o.param, _key(o.value))] = guard.check(recipe).score
        rnd += 1
    return [replace(o, score=scored.get((o.param, _key(o.value)))) for o in opts]


def _key(v) -> str:
    return repr(v)


def ladder(opts: Sequence[Option]) -> list[dict[str, Option]]:
    """Nested choices (param -> option), each one upgrade more than the last: the upgrade
    with the most gain per added error ratio first (a greedy multiple-choice knapsack)."""
    pool: dict[str, list[Option]] = {}
    for o in opts:
        if o.score is not None and math.isfinite(o.ratio):
            pool.setdefault(o.param, []).append(o)
    chosen: dict[str, Option] = {}
    out = []
    while True:
        best, best_eff = None, -math.inf
        for p, cands in pool.items():
            g0 = chosen[p].gain if p in chosen else 0.0
            r0 = chosen[p].ratio if p in chosen else 0.0
            for o in cands:
                if o.gain <= g0:
                    continue
                eff = (o.gain - g0) / max(o.ratio - r0, 1e-12)
                if eff > best_eff or (eff == best_eff and best is not None and o.gain > best.gain):
                    best, best_eff = o, eff
        if best is None:
            return out
        chosen = {**chosen, best.param: best}
        out.append(chosen)


def explore(space: Space, objective: Objective, guard, *, probes: int = PROBES, rungs: int = RUNGS) -> Exploration:
    """Options, probes, the ladder and the climb (see the module doc)."""
    opts = probe(options(space, objective), guard, space, probes)
    neutral = space.neutral_params()
    ladder_rungs: list[Rung] = []
    seen = set()
    for choice in ladder(opts):
        params = {**neutral, **{p: o.value for p, o in choice.items()}}
        try:
            recipe, structure = _suggest(space, params)
        except (ArchpassError, ValueError):
            continue
        sc = objective.score_structure(recipe, structure)
        key = recipe_key(recipe)
        if key in seen or not sc.within_budget:
            continue
        seen.add(key)
        pred = share(sum(o.ratio for o in choice.values()))
        ladder_rungs.append(Rung(params, recipe, sc.values[0], pred, changed=tuple(choice)))
    checked: dict[int, Rung] = {}

    def ok(i: int) -> bool:
        if i not in checked:
            r = guard.check(ladder_rungs[i].recipe)
            checked[i] = Rung(ladder_rungs[i].params, ladder_rungs[i].recipe, ladder_rungs[i].value,
                              ladder_rungs[i].predicted, r.score, r.ok, ladder_rungs[i].changed)
        return bool(checked[i].ok)

    n = len(ladder_rungs)
    if n and rungs > 0:
        start = max([i for i, r in enumerate(ladder_rungs) if r.predicted >= guard.threshold], default=0)
        lo, hi = (start, n) if ok(start) else (-1, start)  # lo passes (or -1: the original), hi fails (or n: the end)
        while hi - lo > 1 and len(checked) < rungs:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
    all_rungs = tuple(checked.get(i, r) for i, r in enumerate(ladder_rungs))
    passed = [r for r in checked.values() if r.ok]
    best = min(passed, key=lambda r: r.value) if passed else None
    return Exploration(tuple(opts), all_rungs, best)


def add_to_study(study: optuna.Study, objective: Objective, found: Exploration) -> int:
    """Run the rungs that passed as trials of ``study`` (enqueued with their parameters); how many were added."""
    passed = [r for r in found.rungs if r.ok]
    for r in passed:
        study.enqueue_trial(dict(r.params), skip_if_exists=True)
    waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    if waiting:
        from archpass.search.evaluator import EvaluatorFailure

        study.optimize(objective, n_trials=waiting, catch=(EvaluatorFailure,))  # a failed --evaluator run fails one trial
    return len(passed)
