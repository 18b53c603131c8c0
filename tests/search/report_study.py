"""A small stored study for the report tests, with the trial attributes the search sets.

``make_study(folder, trials)`` runs a real study on a builder model: each trial picks a
recipe (fuse or not per IBN block, a width multiplier, sometimes a rewrite the passes
refuse), scores it with the ``edgetpu`` cost model from shapes, and records what
:mod:`archpass.search.objective` records (``recipe``, ``estimate``, ``invalid``,
``constraints``, ``guard``) plus an ``evaluator`` result; trial 7's evaluator fails with
a stderr tail.  The study's ``archpass.job`` names the model and target, as
``archpass optimize`` writes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAILED_EVALUATOR_TRIAL = 7
STDERR = "Traceback (most recent call last):\nRuntimeError: evaluation data set not found: /data/val"


def make_study(folder: Path, trials: int = 40, study_name: str = "report-test", storage: str | None = None):
    """Run the study in ``storage`` (default: a journal file ``study.log`` in ``folder``)."""
    import optuna

    import dist_worker
    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.errors import ArchpassError
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe, Rewrite
    from archpass.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = dist_worker.small_model_path(folder)
    s = analyze(load_model(model))
    target = load_target("edgetpu")
    base = estimate(s, target, best_order=False).latency_ms
    ibn = [b.id for b in s.blocks if b.kind == "ibn"]
    storage_path = storage or folder / "study.log"
    study = optuna.create_study(storage=open_storage(storage_path), study_name=study_name,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("archpass.job", {"model": str(model), "target": "edgetpu", "objectives": ["latency"]})

    def objective(trial):
        rws = [Rewrite("fuse_ibn", b) for b in ibn if trial.suggest_categorical(f"fuse:{b}", [False, True])]
        m = trial.suggest_categorical("width", [0.5, 0.75, 1.0, 1.25])
        if m != 1.0:
            rws.append(Rewrite("width_multiplier", None, {"multiplier": m, "parallelism": 8}))
        if trial.number % 9 == 4:  # the input's channels are fixed: the passes refuse this
            rws.append(Rewrite("channels", "group0", {"channels": 8}))
        recipe = Recipe(tuple(rws))
        trial.set_user_attr("recipe", recipe.to_json())
        try:
            est = estimate(apply_recipe_shapes(s, recipe), target, best_order=False)
        except ArchpassError as exc:
            trial.set_user_attr("invalid", exc.line())
            trial.set_user_attr("constraints", [1.0, 0.0])
            return base
        trial.set_user_attr("estimate", {"latency_ms": est.latency_ms, "params_bytes": est.params_bytes,
                                         "peak_activation_bytes": est.peak_activation_bytes, "macs": est.macs})
        proxy = 1.0 - 0.3 * abs(1.0 - m) - 0.02 * len(rws)  # a stand-in score that falls with the change
        ok = proxy >= 0.9
        trial.set_user_attr("guard", {"kind": "proxy", "score": proxy, "threshold": 0.9, "ok": ok})
        if trial.number == FAILED_EVALUATOR_TRIAL:
            trial.set_user_attr("evaluator", {"ok": False, "reason": "evaluator exited with code 1",
                                              "stderr_tail": STDERR, "returncode": 1})
        else:
            trial.set_user_attr("evaluator", {"ok": True, "metrics": {"agreement": round(proxy, 4)}})
        trial.set_user_attr("constraints", [0.0, 0.0 if ok else 0.9 - proxy])
        return est.latency_ms

    study.optimize(objective, n_trials=trials)
    return study, storage_path, s, target
