"""Deterministic starting points for a study: cheap coordinate descent on the space.

A trial of a random or TPE sampler picks every parameter at once, so it needs many trials
to find what the structure of the problem gives almost for free: the cost model's
latency is a sum over layers, so whether fusing one IBN block pays is nearly independent
of the other blocks, and a stage's (or group's) channel count interacts only with its
neighbours.  Before the sampler starts, :func:`warm_start` walks the space coordinate by
coordinate from the unchanged model (global multiplier, then each ``fuse_ibn`` block,
then each channel factor; ``dw_to_dense`` and ``resolution`` when searched), trying every
value of one parameter with the others fixed and keeping the best, until a sweep changes
nothing (at most ``sweeps``).  Each evaluation is one shape-only score (no Optuna trial,
no storage).  The points it returns (the fusion-only point and the descent's end) are
enqueued as the study's first trials after the unchanged model, so the sampler refines
from them; they are ordinary trials of the same space, counted in ``--trials``.

The descent minimizes the first objective; a candidate over a budget ranks by how far
over it is, one the passes refuse ranks last.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from archpass.errors import ArchpassError

SWEEPS = 3


class DefaultTrial:
    """A fixed trial for define-by-run spaces: ``params`` where given, else the neutral
    value of the parameter (1.0 among numbers, False among booleans); records what it
    was asked (``used``: the value it answered, ``choices``: the values it was offered),
    so a point can be enqueued with exactly the parameters its recipe visits."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)
        self.used: dict[str, Any] = {}
        self.choices: dict[str, list[Any]] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.params and self.params[name] in choices:
            v = self.params[name]
        else:
            v = neutral(choices)
        self.used[name] = v
        self.choices[name] = list(choices)
        return v


def neutral(choices: Sequence[Any]) -> Any:
    for n in (False, 1.0):
        if any(type(c) is type(n) and c == n for c in choices):
            return n
    return choices[-1] if choices else None


def _rank(score, first: int = 0) -> tuple:
    """Sort key of a Score: refused last, then by total budget excess, then the objective."""
    if not score.valid:
        return (1, math.inf, math.inf)
    excess = sum(max(0.0, v) for v in score.violations)
    return (0, excess, score.values[first])


def coordinates(trial: DefaultTrial) -> list[tuple[str, list[Any]]]:
    """The parameters a trial visited and the values it was offered, in the space's walk order."""
    return [(name, list(trial.choices[name])) for name in trial.used]


def _memoized(evaluate: Callable) -> Callable:
    """``evaluate`` once per distinct parameter dict: the sweep that confirms the descent's
    end, and the fusion probes the descent tries again, ask for points already scored."""
    seen: dict[tuple, Any] = {}

    def cached(params):
        key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen[key] = evaluate(params)
        return seen[key]

    cached.seen = seen
    return cached


def warm_start(objective, *, sweeps: int = SWEEPS, evaluate: Callable | None = None) -> list[dict[str, Any]]:
    """Starting points for ``objective``'s space (see the module doc): a list of parameter
    dicts, the fusion-only point first (when it differs from the unchanged model), the
    descent's end last.  ``evaluate(params) -> (Score, DefaultTrial)`` may be given for tests."""
    space = objective.space

    def run(params):
        t = DefaultTrial(params)
        try:
            recipe, structure = space.suggest(t)
            sc = objective.score_structure(recipe, structure)
        except ArchpassError as exc:
            from archpass.recipe import Recipe
            from archpass.search.objective import Score

            sc = Score(Recipe(), None, None, reason=exc.line())
        return sc, t

    evaluate = _memoized(evaluate or run)
    cur_score, cur_trial = evaluate(space.neutral_params())
    cur = dict(cur_trial.used)
    start = dict(cur)
    points: list[dict[str, Any]] = []

    def descend(keys_filter: Callable[[str], bool], max_sweeps: int) -> None:
        nonlocal cur, cur_score, cur_trial
        for _ in range(max_sweeps):
            changed = False
            for name, choices in coordinates(cur_trial):
                if not keys_filter(name) or name not in cur_trial.used:
                    continue  # a parameter an earlier move removed from the walk
                best = None
                for v in choices:
                    if v == cur.get(name):
                        continue
                    sc, t = evaluate({**cur, name: v})
                    if _rank(sc) < _rank(cur_score if best is None else best[0]):
                        best = (sc, t)
                if best is not None:
                    cur_score, cur_trial = best
                    cur = dict(cur_trial.used)
                    changed = True
            if not changed:
                break

    # fusion first: block by block from the unchanged model (latency sums over layers)
    fuse_keys = [k for k in cur if k.startswith("fuse_ibn:")]
    if fuse_keys:
        base_rank = _rank(cur_score)
        gains = [k for k in fuse_keys if _rank(evaluate({**cur, k: True})[0]) < base_rank]
        if gains:
            sc, t = evaluate({**cur, **{k: True for k in gains}})
            if _rank(sc) < _rank(cur_score):
                cur_score, cur_trial, cur = sc, t, dict(t.used)
                points.append(dict(cur))
    descend(lambda k: True, sweeps)
    if cur != start and (not points or points[-1] != cur):
        points.append(dict(cur))
    return points
