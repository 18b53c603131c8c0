"""One optimization run: a :class:`Job` (plain JSON, stored in the study so workers and
``--resume`` rebuild exactly the same search), the Optuna loop, and the choice of the
result.

The choice keeps the promises of ``archpass optimize``:

* **never slower**: the unchanged model is always a candidate (the study's first
  trial, and the fallback); the result is a trial strictly better than it on the first
  objective (and no worse on the others), or the unchanged model with a message;
* **budgets**: only trials within every budget; when none is, and the unchanged model
  is not either, the run fails naming the best reachable value;
* **guard**: the result must pass the accuracy guard; finalists are checked best first,
  only while they can beat the incumbent, each recipe once (:func:`finalists`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from archpass.errors import ArchpassError
from archpass.search import study as st
from archpass.search.objective import MB, Budgets, Objective, Score, constraints, objective_value, parse_objectives
from archpass.search.space import Space, recipe_key

#: Job fields that define a study: a resumed run must agree on all of them.
STUDY_FIELDS = ("model_sha256", "target", "objectives", "budgets", "passes", "freeze", "resolutions", "granularity",
                "mode", "guard",
                "min_fidelity", "min_proxy", "calib", "sampler", "seed",
                "evaluator", "min_metrics", "evaluate_top")
WORKER_START_TIMEOUT = 120.0  # seconds the main process waits for the extra workers to load the model
FINALISTS = 12  # guard evaluations spent on choosing the result, at most (--finalists)


class BudgetError(ArchpassError):
    """No candidate meets a budget."""


@dataclass(frozen=True)
class Job:
    """Everything that defines an optimization run, as JSON."""

    model: str
    target: str
    model_sha256: str = ""
    input_shapes: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ("latency",)
    budgets: Mapping[str, float] = field(default_factory=dict)
    passes: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    resolutions: tuple[int, ...] = ()
    granularity: str = "stage"
    mode: str = "retrain"
    guard: bool = True
    calib: str | None = None
    calib_options: Mapping[str, Any] = field(default_factory=dict)
    min_fidelity: float = 0.99
    min_proxy: float | None = None
    finalists: int = FINALISTS
    sampler: str = "auto"
    seed: int | None = 0
    trials: int = 300
    workers: int = 1
    evaluator: str | None = None  # --evaluator "CMD {model}"
    evaluator_timeout: float | None = None
    min_metrics: tuple[str, ...] = ()  # --min-metric NAME=VALUE, as given
    evaluate_top: int = 5

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Job":
        kw = dict(d)
        for k in ("input_shapes", "objectives", "freeze", "resolutions", "min_metrics"):
            kw[k] = tuple(kw.get(k) or ())
        if kw.get("passes") is not None:
            kw["passes"] = tuple(kw["passes"])
        return cls(**{k: v for k, v in kw.items() if k in cls.__dataclass_fields__})

    @property
    def sampler_name(self) -> str:
        if self.sampler == "auto":
            return "tpe" if len(self.objectives) == 1 else "nsga2"
        return self.sampler

    def study_key(self) -> dict:
        d = self.to_json()
        return {k: d[k] for k in STUDY_FIELDS}


@dataclass
class Prepared:
    """A job's loaded model, structure, target, space, guard and objective."""

    job: Job
    model: Any
    structure: Any
    target: Any
    space: Space
    objective: Objective
    guard: Any = None


def prepare(job: Job, *, model=None, structure=None, target=None, guard_factory: Callable | None = None,
            with_guard: bool = True) -> Prepared:
    """Load and validate everything a job names (bad input raises ArchpassError).
    Extra workers only score trials: they skip the guard (``with_guard=False``)."""
    from archpass.analysis import analyze
    from archpass.costmodel import load_target
    from archpass.model import load_model, parse_input_shapes

    if job.mode not in ("retrain", "post-training"):
        raise ArchpassError(f"unknown --mode '{job.mode}'", "use post-training (needs --calib) or retrain")
    if job.mode == "post-training" and job.guard and not job.calib:
        raise ArchpassError("post-training mode needs calibration data", "add --calib DATA, or use --mode retrain")
    if job.sampler not in ("auto",) + st.SAMPLERS:
        raise ArchpassError(f"unknown sampler '{job.sampler}'", f"use one of {', '.join(st.SAMPLERS)}")
    if job.trials < 1:
        raise ArchpassError(f"--trials must be at least 1, got {job.trials}", "e.g. --trials 300")
    if job.finalists < 1:
        raise ArchpassError(f"--finalists must be at least 1, got {job.finalists}", "e.g. --finalists 12")
    if job.workers < 1:
        raise ArchpassError(f"--workers must be at least 1, got {job.workers}", "e.g. --workers 2")
    objectives = parse_objectives(job.objectives)
    budgets = Budgets(**job.budgets)
    target = target or load_target(job.target)
    model = model or load_model(job.model, parse_input_shapes(list(job.input_shapes)) if job.input_shapes else None)
    structure = structure or analyze(model)
    floor = 0
    if job.mode == "retrain" and job.guard and job.min_proxy is None:  # search where the default guard can pass
        from archpass.search.space import width_floor

        floor = width_floor(structure, [o.name for o in model.proto.graph.output])
    space = Space.build(structure, parallelism=int(getattr(target, "parallelism", 8) or 8), passes=job.passes,
                        freeze=job.freeze, resolutions=job.resolutions, granularity=job.granularity, min_width=floor)
    evaluation = evaluation_step(job, model)
    guard = None
    if job.guard and with_guard and space.empty_reason() is not None:
        # nothing to search, so nothing to guard: the guard's reference (the zero-shot score's
        # runs, a minute on a large model; the fidelity guard's original outputs) is not made,
        # but calibration data is still read, so bad data stays an error
        if job.mode == "post-training" and job.calib != "random":
            from archpass.search.calib import load_calibration

            load_calibration(job.calib, model, **dict(job.calib_options))
    elif job.guard and with_guard:
        if guard_factory is not None:
            guard = guard_factory(job, model, structure)
        else:
            guard = default_guard(job, model, structure)
    objective = Objective(space, target, objectives, budgets, evaluation=evaluation)
    return Prepared(job, model, structure, target, space, objective, guard)


def evaluation_step(job: Job, model):
    """The user's evaluator as the objective runs it (None without ``--evaluator``);
    a command that does not exist or a malformed ``--min-metric`` is exit 2 here,
    before any trial."""
    from archpass.search.evaluator import EvaluationStep, Evaluator, EvaluatorError, parse_min_metrics

    minimums = parse_min_metrics(job.min_metrics)
    if job.evaluator is None:
        if minimums:
            raise EvaluatorError("--min-metric bounds the metrics of an --evaluator, and none was given",
                                 'add --evaluator "CMD {model}" (its last stdout line: a JSON object of metrics)')
        return None
    if job.evaluate_top < 1:
        raise EvaluatorError(f"--evaluate-top must be at least 1, got {job.evaluate_top}", "e.g. --evaluate-top 5")
    return EvaluationStep(Evaluator.parse(job.evaluator, job.evaluator_timeout), model, minimums,
                          top_k=int(job.evaluate_top))


def default_guard(job: Job, model, structure):
    from archpass.search import guard as g

    if job.mode == "post-training":
        from archpass.search.fidelity import load_calibration

        data = load_calibration(None if job.calib == "random" else job.calib, model, **dict(job.calib_options))
        return g.fidelity_guard(model, structure, data, min_fidelity=job.min_fidelity)
    return g.proxy_guard(model, structure, min_proxy=job.min_proxy, seed=job.seed or 0)


# ---------------------------------------------------------------------------- the loop
def _sampler(job: Job, worker: int = 0):
    return st.make_sampler(job.sampler_name, seed=job.seed, n_objectives=len(job.objectives),
                           constraints_func=constraints, worker=worker, workers=job.workers)


@contextlib.contextmanager
def _ctrl_c_stops(study: optuna.Study):
    """Ctrl-C stops the study even when Python swallows the KeyboardInterrupt.

    Python raises KeyboardInterrupt wherever the main thread is; in a finalizer (for
    instance LightGBM's ``_InnerPredictor.__del__``, run after every prediction) it is
    printed as "Exception ignored" and lost, and the search went on (1 in 124 interrupted
    runs here).  While the study runs, SIGINT also asks Optuna to stop after the current
    trial; the caller counts it as an interruption (``seen["n"]``) either way.  Inside the
    journal's lock (``study.in_locked_region``) the KeyboardInterrupt waits until the lock
    is released: raised there it could leave the lock held and the process waiting on
    itself."""
    seen = {"n": 0}
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield seen  # a worker thread, or an embedding program that handles SIGINT itself
        return

    def handler(signum, frame):
        seen["n"] += 1
        try:
            study.stop()
        except RuntimeError:  # between trials, outside Optuna's loop: the raise below stops it
            pass
        if st.in_locked_region():  # raising inside the journal's lock could leave it held
            st.defer_interrupt()
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        st.defer_interrupt(False)  # a deferred Ctrl-C belongs to this search only
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _optimize(study: optuna.Study, prep: Prepared, callbacks: Sequence = (), shared: bool = False) -> None:
    """Run trials until the study holds ``--trials`` finished ones (complete, or failed by
    the user's evaluator: such a failure fails one trial and the study goes on).  With
    other processes on the study (``--workers``, a shared ``--storage``) the count is
    checked after every trial."""
    from archpass.search.evaluator import EvaluatorFailure

    total = prep.job.trials
    done = st.n_finished(study)
    if done >= total:
        return

    def enough(study, trial) -> None:
        if st.n_finished(study) >= total:
            study.stop()

    together = prep.job.workers > 1 or shared
    study.optimize(prep.objective, n_trials=None if together else total - done,
                   callbacks=[enough, *callbacks], catch=(EvaluatorFailure,))


def worker_main(path: str, index: int, ready=None, study_name: str | None = None, heartbeat: int | None = None) -> None:
    """Entry point of an extra local worker process (``--workers N``); sets ``ready`` once
    it can run trials.  ``study_name`` names the study of an explicit ``--storage``
    (``path`` is then its location); None: the run's own journal file."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        if study_name is None:
            job = Job.from_json(st.study_job(st.load_study(Path(path), sampler=None)))
        else:
            storage = st.open_study_storage(path, heartbeat_interval=heartbeat)
            job = Job.from_json(st.study_job(optuna.load_study(study_name=study_name, storage=storage, sampler=None)))
        prep = prepare(job, with_guard=False)
        prep.objective.worker = index if study_name is None else worker_id(index)
        if study_name is None:
            study = st.load_study(Path(path), sampler=_sampler(job, index))
        else:
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=_sampler(job, index))
        if ready is not None:
            ready.set()
        _optimize(study, prep, shared=study_name is not None)
    except KeyboardInterrupt:
        pass


def worker_id(index: int = 0) -> str:
    """Which process ran a trial of a shared study: ``host:pid`` (``/i`` for local worker i)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{index}" if index else "")


@dataclass(frozen=True)
class Outcome:
    """What a run found."""

    baseline: Score
    best: Score
    best_trial: int | None
    guard: Mapping[str, Any] | None  # the chosen candidate's guard result
    guard_info: Mapping[str, Any] | None  # the guard's kind, threshold, baseline score
    front: tuple[Mapping[str, Any], ...]  # Pareto front (several objectives), with guard results
    checked: tuple[Mapping[str, Any], ...]  # finalists the guard evaluated, best first
    trials: int
    interrupted: bool
    message: str | None
    storage: Path
    records: tuple[st.TrialRecord, ...] = ()
    explored: Mapping[str, Any] | None = None  # the post-training ladder (search.ladder.Exploration.to_json)
    study: Any = field(default=None, compare=False, repr=False)  # the optuna.Study (reports read it)

    @property
    def improved(self) -> bool:
        return self.best_trial is not None


def _job_diff(study: optuna.Study, job: Job) -> list[str]:
    """The study-defining fields in which ``job`` differs from the one stored in ``study``
    (fields an older study lacks count as their defaults)."""
    old, new = Job.from_json({"model": "", "target": "", **st.study_job(study)}).study_key(), job.study_key()
    return [k for k in STUDY_FIELDS if old.get(k) != new.get(k)]


def enqueue_first(study: optuna.Study, prep: Prepared, seeds: Sequence = ()) -> None:
    """The first trials of a new study: the unchanged model, then each ``--seed-recipe``
    (``seeds``: SeedResolution per file) that resolved to at least one rewrite, then the
    coordinate-descent starting points (:mod:`archpass.search.warmstart`) when ``--trials``
    leaves room for them; the seeds' resolution is stored for the report (``archpass.seed``)."""
    from archpass.search.objective import SEED_RECIPE_ATTR
    from archpass.search.report import SEED_ATTR
    from archpass.search.seed import SEED_ATTR as SEED_TRIAL_ATTR

    study.enqueue_trial(prep.space.neutral_params(), skip_if_exists=True)
    first = 1
    for i, res in enumerate(seeds):
        if len(res.recipe):
            study.enqueue_trial({}, user_attrs={SEED_RECIPE_ATTR: res.recipe.to_json(), SEED_TRIAL_ATTR: i})
            first += 1
    if seeds:
        study.set_user_attr(SEED_ATTR, seed_entries(seeds))
    # the descent scores hundreds of points; skip it when --trials leaves none of its points a trial
    if prep.space.empty_reason() is None and first < prep.job.trials:
        from archpass.search.warmstart import warm_start

        for params in warm_start(prep.objective):
            study.enqueue_trial(params, skip_if_exists=True)


def seed_entries(seeds: Sequence) -> list[dict]:
    """Every seed rewrite's resolution (SeedEntry JSON), with the index of its file."""
    return [{"file": i, **e.to_json()} for i, res in enumerate(seeds) for e in res.entries]


def _open_shared(prep: Prepared, location: str, study_name: str, *, resume: bool, heartbeat: int | None,
                 seeds: Sequence) -> optuna.Study:
    """Create or join the study ``study_name`` of an explicit ``--storage`` (see module
    :mod:`archpass.search.storage`).  A joiner must run the same job; only the creator
    enqueues the first trials.  Other workers' RUNNING trials are left alone: a database
    storage fails a dead worker's trial by its heartbeat (and retries it); a journal file,
    which has no heartbeat, has its RUNNING trials failed on ``--resume``, which assumes
    no other process is running."""
    from archpass.search.storage import parse_storage

    job = prep.job
    loc = parse_storage(location)
    storage = st.open_study_storage(location, heartbeat_interval=heartbeat)
    study, created = st.join_study(storage, study_name, directions=["minimize"] * len(job.objectives),
                                   sampler=_sampler(job), job=job.to_json(), must_exist=resume, where=loc.display)
    if not created:
        diff = _job_diff(study, job)
        if diff:
            raise st.StudyError(f"study '{study_name}' in {loc.display} was made by a command that differs in "
                                f"{', '.join(diff)}", "run the same command as the other workers, or give another --study-name")
        if resume and loc.kind == "journal":
            st.fail_stale(study)
        # a joiner samples with its own seed (the same command on every machine would
        # otherwise propose the same first points); the creator keeps --seed
        study.sampler = _sampler(job, 1 + zlib.crc32(worker_id().encode()) % 1_000_000)
    else:
        enqueue_first(study, prep, seeds)
    return study


def search(prep: Prepared, storage: Path, *, resume: bool = False, progress: Callable | None = None,
           study_name: str | None = None, heartbeat: int | None = None, seeds: Sequence = ()) -> Outcome:
    """Run (or resume) the study for ``prep``'s job and choose the result.  With
    ``study_name``, ``storage`` is an explicit ``--storage`` (a database URL or a file)
    that other workers may share (:func:`_open_shared`); otherwise the run's own journal."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a Ctrl-C'ed trial is reported by the caller, not logged
    job = prep.job
    directions = ["minimize"] * len(job.objectives)
    shared = study_name is not None
    if shared:
        study = _open_shared(prep, str(storage), study_name, resume=resume, heartbeat=heartbeat, seeds=seeds)
        prep.objective.worker = worker_id()
    elif resume:
        study = st.load_study(storage, sampler=_sampler(job))
        diff = _job_diff(study, job)
        if diff:
            raise st.StudyError(f"--resume: this command differs from the interrupted run in {', '.join(diff)}",
                                "repeat the first command exactly, plus --resume (or drop --resume to start over)")
        st.fail_stale(study)
    else:
        study = st.create_study(storage, directions=directions, sampler=_sampler(job), job=job.to_json())
        enqueue_first(study, prep, seeds)

    empty = prep.space.empty_reason()
    interrupted = False
    procs = []
    if empty is None:
        if job.workers > 1:
            prep.objective.worker = 0
            ctx = multiprocessing.get_context("spawn")
            ready = [ctx.Event() for _ in range(1, job.workers)]
            procs = [ctx.Process(target=worker_main, args=(str(storage), i, ev, study_name, heartbeat), daemon=True)
                     for i, ev in zip(range(1, job.workers), ready)]
            for p in procs:
                p.start()
            # start together, so N processes share the trials (a worker that died is not waited for)
            deadline = time.monotonic() + WORKER_START_TIMEOUT
            for p, ev in zip(procs, ready):
                while not ev.wait(0.2) and p.is_alive() and time.monotonic() < deadline:
                    pass
        cbs = [progress] if progress else []
        try:
            with _ctrl_c_stops(study) as ctrl_c:
                _optimize(study, prep, cbs, shared=shared)
            interrupted = ctrl_c["n"] > 0  # its KeyboardInterrupt was lost, its stop was not
        except KeyboardInterrupt:
            interrupted = True
        except UnboundLocalError as exc:
            # Optuna 5.0's _run_trial: a Ctrl-C while it stores a trial's result surfaces as an
            # UnboundLocalError raised from its `finally` (the KeyboardInterrupt is its context)
            if not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            interrupted = True
        finally:
            for p in procs:
                p.join(timeout=None if not interrupted else 10)
                if p.is_alive():
                    p.terminate()
    explored = None
    if empty is None and not interrupted and getattr(prep.guard, "additive", False):
        from archpass.search import ladder

        try:
            found = ladder.explore(prep.space, prep.objective, prep.guard)
            ladder.add_to_study(study, prep.objective, found)
            explored = found.to_json()
        except KeyboardInterrupt:
            interrupted = True
    if shared:
        from archpass.search.storage import fail_stale_by_heartbeat

        fail_stale_by_heartbeat(study)
    recs = st.records(study)
    out = choose(prep, recs, storage=storage, interrupted=interrupted, empty=empty)
    record_outcome(study, out)
    return replace(out, study=study, explored=explored)


#: how many chosen candidates in a row may fail to be emitted before optimize gives up
EMIT_ATTEMPTS = 3


def emit(prep: Prepared, out: Outcome) -> tuple[Any, Any, Outcome, list[str]]:
    """The chosen candidate made real: ``(applied, recovered proto or None, outcome, notes)``.

    The search scored shapes; this is where the recipe is applied to the ONNX graph, its
    shapes checked against the shape path's and the result checked (``apply_recipe``), and
    in post-training mode its weights recovered.  A candidate that fails there is an
    archpass bug; rather than lose the search (``--resume`` would choose it again), it is
    dropped and the next best chosen, at most ``EMIT_ATTEMPTS`` times, each named in a note."""
    from archpass.passes.engine import apply_recipe

    notes: list[str] = []
    bad: set = set()
    for attempt in range(EMIT_ATTEMPTS + 1):
        recipe = out.best.recipe
        try:
            applied = apply_recipe(prep.model, recipe, structure=prep.structure)
            recovered = prep.guard.model_for(recipe) if prep.guard is not None and len(recipe) else None
            return applied, recovered, out, notes
        except Exception as exc:  # noqa: BLE001 - one candidate's failure, reported below (Ctrl-C is not an Exception)
            if not len(recipe) or attempt == EMIT_ATTEMPTS:
                raise
            if isinstance(exc, ArchpassError):  # a refusal (e.g. an output out of proportion), not a bug
                why = exc.line()
            else:
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                why = (f"{type(exc).__name__}: {first}".rstrip(": ") + "; an archpass bug, please report it with the "
                       "model's `archpass inspect --json`")
            notes.append(f"the best candidate (trial {out.best_trial}) could not be emitted ({why}): the next best was chosen")
            bad.add(recipe_key(recipe))
            kept = tuple(r for r in out.records if recipe_key(r.recipe) not in bad)
            again = choose(prep, kept, storage=out.storage, interrupted=out.interrupted)
            out = replace(again, trials=out.trials, records=out.records, study=out.study, explored=out.explored)
            if out.study is not None:
                record_outcome(out.study, out)
    raise AssertionError("unreachable")


def record_outcome(study: optuna.Study, out: Outcome) -> None:
    """Store what this run chose in the study (``archpass.finalists``: the guard's results;
    ``archpass.result``: the chosen trial and guard), so ``archpass report`` on the
    storage gives the report ``--report`` wrote."""
    from archpass.search.report import FINALISTS_ATTR, RESULT_ATTR

    study.set_user_attr(FINALISTS_ATTR, [dict(c) for c in out.checked])
    info = dict(out.guard_info or {})
    study.set_user_attr(RESULT_ATTR, {"best_trial": out.best_trial, "score_kind": info.get("kind"),
                                      "baseline_score": info.get("baseline"),
                                      "best_score": (out.guard or {}).get("score") if out.guard else None,
                                      "message": out.message})


def _dominates_or_equal(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b))


def pareto(recs: Sequence[st.TrialRecord]) -> list[st.TrialRecord]:
    """Non-dominated records (by values), one per distinct value vector, sorted by the first objective."""
    out: dict[tuple, st.TrialRecord] = {}
    for r in recs:
        if any(_dominates_or_equal(o.values, r.values) and tuple(o.values) != tuple(r.values) for o in recs):
            continue
        out.setdefault(tuple(r.values), r)
    return sorted(out.values(), key=lambda r: r.values)


def _best_reachable(prep: Prepared, recs: Sequence[st.TrialRecord]) -> str:
    """The lowest value of each violated budget any candidate reached."""
    b = prep.objective.budgets
    cands = [dict(r.metrics) for r in recs if r.metrics] + [dict(prep.objective.baseline.metrics)]
    parts = []
    have = {"max_latency_ms": ("latency_ms", 1.0, "ms", "--max-latency-ms"),
            "max_params_mb": ("params_bytes", 1 / MB, "MB", "--max-params-mb"),
            "max_peak_mb": ("peak_activation_bytes", 1 / MB, "MB", "--max-peak-mb")}
    for k, v in b.items():
        if v is None:
            continue
        key, scale, unit, flag = have[k]
        lo = min(c[key] * scale for c in cands)
        if lo > v:
            parts.append(f"{flag} {v:g} (best reachable {lo:.4g} {unit})")
    return "; ".join(parts) or "the budgets together"


def finalists(guard, cands: Sequence[st.TrialRecord], budget: int) -> tuple[st.TrialRecord | None, list[dict]]:
    """The best candidate (``cands`` sorted best first) that passes ``guard``, with at most
    ``budget`` evaluations, and the evaluations made (best first).

    A guard costs seconds per candidate, so not every candidate is checked: the best one
    first; if it fails, a binary search along the sorted list for the best that passes
    (candidates further from the best are milder, so more likely to pass); then the
    evaluations left go to the unchecked candidates better than that incumbent, closest
    first.  Only candidates that can beat the incumbent are ever evaluated."""
    results: dict[int, Any] = {}

    def ok(i: int) -> bool:
        if i not in results:
            results[i] = guard.check(cands[i].recipe)
        return results[i].ok

    best = None
    # a candidate the guard already passed (the post-training ladder's rungs) is a free incumbent:
    # only candidates better than it are evaluated
    known = getattr(guard, "known", lambda r: None)
    for i, c in enumerate(cands):
        r = known(c.recipe)
        if r is not None and r.ok:
            results[i], best = r, i
            break
    if best is not None:
        for i in range(best - 1, -1, -1):
            if len(results) - 1 >= budget:
                break
            if ok(i):
                best = i
    elif cands and budget > 0:
        if ok(0):
            best = 0
        else:
            lo, hi = 1, len(cands) - 1
            while lo <= hi and len(results) < budget:
                mid = (lo + hi) // 2
                if ok(mid):
                    best, hi = mid, mid - 1
                else:
                    lo = mid + 1
            for i in range((best if best is not None else len(cands)) - 1, 0, -1):
                if len(results) >= budget:
                    break
                if i not in results and ok(i):
                    best = i
    evaluated = [{"number": cands[i].number, "values": list(cands[i].values), **results[i].to_json()}
                 for i in sorted(results)]
    return (cands[best] if best is not None else None), evaluated


def choose(prep: Prepared, recs: Sequence[st.TrialRecord], *, storage: Path, interrupted: bool = False,
           empty: str | None = None) -> Outcome:
    obj = prep.objective
    base = obj.baseline
    guard = prep.guard
    common = dict(trials=len(recs), interrupted=interrupted, storage=storage, records=tuple(recs))
    if empty is not None:
        return Outcome(base, base, None, None, front=(), checked=(), guard_info=guard.describe() if guard else None,
                       message=f"nothing to optimize: {empty}; wrote the original model", **common)
    ok = [r for r in recs if r.feasible]
    if not ok and not base.within_budget:
        raise BudgetError(f"no candidate meets {_best_reachable(prep, recs)}",
                          "raise the budget, or widen the search (--trials, --passes, --resolutions)")
    better = [r for r in ok if r.values[0] < base.values[0] and _dominates_or_equal(r.values, base.values)]
    several = len(obj.objectives) > 1
    if several:
        front = pareto(ok)
        known = getattr(guard, "known", lambda r: None)  # a candidate the guard passed (the ladder's) stays one

        def passed(r) -> bool:
            res = known(r.recipe) if guard is not None else None
            return res is not None and res.ok

        better = [r for r in better if r in front or passed(r)]
    better.sort(key=lambda r: (r.values, r.number))
    unique, seen = [], set()
    for r in better:
        key = recipe_key(r.recipe)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    checked: list[dict] = []
    if guard is None:
        chosen = unique[0] if unique else None
    else:
        chosen, checked = finalists(guard, unique, prep.job.finalists)
    front = [r.to_json() for r in pareto(ok)] if several else []
    if several and guard is not None:
        by_number = {c["number"]: c for c in checked}
        for d in front:
            if d["number"] in by_number:
                d["guard"] = {k: by_number[d["number"]][k] for k in ("score", "threshold", "ok")}
    if chosen is None:
        if not base.within_budget:
            raise BudgetError(f"no candidate that passes the guard meets {_best_reachable(prep, recs)}",
                              "raise the budget or lower the guard's threshold")
        why = ("no candidate beat the original model" if not unique else
               f"no candidate better than the original passed the {guard.kind} guard "
               f"({len(checked)} checked, threshold {guard.threshold:.4g})")
        g = {"kind": guard.kind, "score": guard.baseline, "threshold": guard.threshold, "ok": True} if guard else None
        return Outcome(base, base, None, g, front=tuple(front), checked=tuple(checked),
                       guard_info=guard.describe() if guard else None, message=f"{why}; wrote the original model", **common)
    best = Score(chosen.recipe, chosen.metrics, tuple(objective_value(o, chosen.metrics) for o in obj.objectives),
                 obj.budgets.violations(chosen.metrics))
    g = guard.check(chosen.recipe).to_json() if guard is not None else None
    return Outcome(base, best, chosen.number, g, front=tuple(front), checked=tuple(checked),
                   guard_info=guard.describe() if guard else None, message=None, **common)
