"""A search worker process for the distributed-storage tests and benchmarks/distributed.py.

    python tests/dist_worker.py --storage URL --study NAME --trials N --log FILE [--hang]

Joins study NAME in storage URL (opened by :func:`archpass.search.storage.open_storage`,
so with heartbeats and retry of stale trials) and runs trials until the study holds N
complete ones (as Optuna's ``MaxTrialsCallback`` does; ``--linger-after FILE --linger S``
also waits until FILE exists and is S seconds old).  The objective is cheap but real: a
recipe (fuse or not per IBN block of a small builder model, a global width multiplier)
applied to the analyzed structure through the shape-only path and scored by the
``edgetpu`` cost model.  Every finished trial is appended to ``FILE`` as
``done NUMBER STATE`` (flushed and fsynced, after Optuna stored the result), so a test can
compare what the workers did with what the storage holds.  ``--hang`` makes the worker
write ``running NUMBER`` and stop inside its first trial, to be killed; ``--pace S``
makes every trial take S seconds longer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MULTIPLIERS = (0.5, 0.75, 1.0, 1.25)


def small_model_path(folder: Path) -> Path:
    """The small MobileNet-like builder model the workers score (written once, atomically)."""
    from builders import NetBuilder

    from archpass.model import save_model

    path = folder / "dist_model.onnx"
    if not path.exists():
        model = (NetBuilder((1, 3, 64, 64)).conv(16, k=3, stride=2, act="relu6")
                 .ibn(24, expand=4, stride=2).ibn(24, expand=4).ibn(32, expand=6, stride=2).ibn(32, expand=6)
                 .ibn(64, expand=6, stride=2).head(10).build())
        save_model(model, path)
    return path


def make_objective(model_path: Path, hang: bool, log, pace: float = 0.0):
    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe, Rewrite

    structure = analyze(load_model(model_path))
    target = load_target("edgetpu")
    ibn = [b.id for b in structure.blocks if b.kind == "ibn"]

    def objective(trial):
        rewrites = [Rewrite("fuse_ibn", b) for b in ibn if trial.suggest_categorical(f"fuse:{b}", [False, True])]
        m = trial.suggest_categorical("width", list(MULTIPLIERS))
        if hang:
            log(f"running {trial.number}")
            time.sleep(3600)
        if m != 1.0:
            rewrites.append(Rewrite("width_multiplier", None, {"multiplier": m, "parallelism": 8}))
        recipe = Recipe(tuple(rewrites))
        est = estimate(apply_recipe_shapes(structure, recipe), target, best_order=False)
        trial.set_user_attr("recipe", recipe.to_json())
        trial.set_user_attr("latency_ms", est.latency_ms)
        trial.set_user_attr("worker", os.getpid())
        time.sleep(pace)
        return est.latency_ms

    return objective


def finished_by(log: Path) -> list[int]:
    """The trial numbers a worker finished as COMPLETE (after Optuna stored them)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [int(l.split()[1]) for l in lines if l.startswith("done") and l.endswith("COMPLETE")]


def audit(trials, logs: list[Path]) -> dict:
    """Compare what the workers say they finished with what the storage holds.

    ``duplicated``: trials finished by more than one worker; ``lost``: trials a worker
    finished that the storage does not hold as COMPLETE; ``unreported``: COMPLETE trials
    no worker finished; ``numbers_ok``: trial numbers are 0..n-1, each once."""
    from collections import Counter

    from optuna.trial import TrialState

    done = [n for log in logs for n in finished_by(log)]
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    states = Counter(t.state.name for t in trials)
    return {
        "trials_in_storage": len(trials),
        "complete_in_storage": len(complete),
        "finished_by_workers": len(done),
        "duplicated": sorted(n for n, c in Counter(done).items() if c > 1),
        "lost": sorted(set(done) - complete),
        "unreported": sorted(complete - set(done)),
        "numbers_ok": sorted(t.number for t in trials) == list(range(len(trials))),
        "states": dict(states),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--trials", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--heartbeat", type=int, default=1)
    ap.add_argument("--grace", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--pace", type=float, default=0.0, help="seconds each trial waits (a slower objective)")
    ap.add_argument("--linger-after", default=None,
                    help="do not stop before this file exists and --linger seconds passed since it was written")
    ap.add_argument("--linger", type=float, default=0.0)
    ap.add_argument("--start-after", default=None, help="after 'ready', wait until this file exists")
    args = ap.parse_args(argv)

    import optuna
    from optuna.trial import TrialState

    from archpass.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = open(args.log, "a", buffering=1)

    def log(line: str) -> None:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())

    def record(study, trial) -> None:  # called after Optuna stored the trial's result
        log(f"done {trial.number} {trial.state.name}")
        if trial.number + 1 < args.trials:  # numbers are study-wide: fewer trials exist than asked for
            return
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < args.trials:
            return
        if args.linger_after:
            flag = Path(args.linger_after)
            if not flag.exists() or time.time() - flag.stat().st_mtime < args.linger:
                return
        study.stop()

    model_dir = Path(args.model_dir) if args.model_dir else Path(args.log).parent
    objective = make_objective(small_model_path(model_dir), args.hang, log, args.pace)
    storage = open_storage(args.storage, heartbeat_interval=args.heartbeat, grace_period=args.grace)
    study = optuna.load_study(study_name=args.study, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=args.seed))
    log("ready")
    if args.start_after:
        while not Path(args.start_after).exists():
            time.sleep(0.01)
    study.optimize(objective, callbacks=[record])
    log("exit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
