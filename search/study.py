"""A thin facade over Optuna: storage, samplers, and frozen records of trials.

Storage is an Optuna **journal file** next to the output (``OUT.study.jsonl``): an
append-only log of study operations, written under a file lock, that any number of
local processes can share.  Every storage operation is one append flushed to the OS
before the call returns, so a run killed at any point (Ctrl-C, ``kill -9``) keeps every
trial it finished; a resumed run replays the log.  (Appends are not fsync'ed one by one:
that costs a disk sync per trial parameter and only protects against an OS crash.)  (SQLite, the other embedded option, takes a database-wide write lock
per transaction and fails with "database is locked" under several busy writers.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna

from archpass.errors import ArchpassError
from archpass.recipe import Recipe

STUDY_NAME = "archpass-optimize"
SAMPLERS = ("tpe", "nsga2", "random")
CONFIG_ATTR = "archpass.job"


class StudyError(ArchpassError):
    """The study storage cannot be created, resumed or shared."""


def storage_path(output: str | os.PathLike) -> Path:
    """Where a run that writes ``output`` keeps its study: ``<stem>.study.jsonl`` beside it."""
    out = Path(output)
    return out.with_name(out.stem + ".study.jsonl")


def _backend_class():
    import json

    from optuna.storages.journal import JournalFileBackend

    class FlushedJournal(JournalFileBackend):
        """Optuna's journal file, appended under its lock and flushed to the OS without an
        fsync per operation: a killed process loses nothing it wrote (only an OS crash could),
        and a trial costs milliseconds instead of dozens of disk syncs.  Same file format,
        same reader."""

        def append_logs(self, logs):
            from optuna.storages.journal._file import get_lock_file

            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with get_lock_file(self._lock):
                with open(self._file_path, "ab") as f:
                    f.write(text.encode("utf-8"))
                    f.flush()

    return FlushedJournal


#: journal lock regions in progress in this process (acquire to release); a Ctrl-C that
#: lands in one does not raise there (``run._ctrl_c_stops``) but once the lock is released:
#: a KeyboardInterrupt between the flock and the ``try`` that releases it left the lock
#: held, and the next write of the same process waited on it forever (2 of about 130
#: interrupted test runs here)
_LOCKED = [0]
_DEFERRED = [False]


def in_locked_region() -> bool:
    """Whether this process holds (or is taking) its study journal's lock."""
    return _LOCKED[0] > 0


def defer_interrupt(on: bool = True) -> None:
    """Raise KeyboardInterrupt when this process next leaves its journal lock (``on``
    False: no longer)."""
    _DEFERRED[0] = on


def _lock(path: Path):
    """An ``fcntl.flock`` on ``<journal>.lock`` (one system call per append, released by the
    kernel if the holder is killed); Optuna's create/unlink lock file where fcntl is missing."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal._file import BaseJournalFileLock

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return JournalFileOpenLock(str(path))

    class FlockLock(BaseJournalFileLock):
        def __init__(self, lock_path: str):
            self._path = lock_path
            self._fd: int | None = None

        def acquire(self) -> bool:
            _LOCKED[0] += 1
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self.release()
                raise
            return True

        def release(self) -> None:
            try:
                if self._fd is not None:
                    fd, self._fd = self._fd, None
                    os.close(fd)  # closing the descriptor releases its flock
            finally:
                _LOCKED[0] = max(0, _LOCKED[0] - 1)
                if _LOCKED[0] == 0 and _DEFERRED[0]:
                    _DEFERRED[0] = False
                    raise KeyboardInterrupt  # the Ctrl-C that landed while the lock was held

    return FlockLock(str(path) + ".lock")


def _storage(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(_backend_class()(str(path), lock_obj=_lock(path)))


def make_sampler(name: str, *, seed: int | None, n_objectives: int, constraints_func=None, worker: int = 0,
                 workers: int = 1) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, grouped for the define-by-run space; constant liar with several
    workers), NSGA-II or random.  Worker ``i`` of a seeded run uses ``seed + i``."""
    import warnings

    s = None if seed is None else int(seed) + worker
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is experimental, `constraints_func` deprecated in 5.0 for
            warnings.simplefilter("ignore")  # Trial.set_constraint, which costs one storage write per value
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=20, multivariate=True, group=True,
                                              constant_liar=workers > 1, constraints_func=constraints_func)
    if name == "nsga2":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.samplers.NSGAIISampler(seed=s, population_size=24, constraints_func=constraints_func)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s)
    raise StudyError(f"unknown sampler '{name}'", f"use one of {', '.join(SAMPLERS)}")


def create_study(path: Path, *, directions: Sequence[str], sampler, job: Mapping[str, Any]) -> optuna.Study:
    """A fresh study at ``path`` (a previous one there is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".lock")):
        if p.exists() or p.is_symlink():
            p.unlink()
    study = optuna.create_study(storage=_storage(path), study_name=STUDY_NAME, directions=list(directions),
                                sampler=sampler)
    study.set_user_attr(CONFIG_ATTR, dict(job))
    return study


def load_study(path: Path, *, sampler) -> optuna.Study:
    """The study at ``path`` (to resume it, or as one more worker)."""
    if not path.is_file():
        raise StudyError(f"nothing to resume: no study at {path}", "run the same command without --resume")
    try:
        return optuna.load_study(storage=_storage(path), study_name=STUDY_NAME, sampler=sampler)
    except KeyError:
        raise StudyError(f"{path} holds no archpass study", "delete it, or run without --resume") from None
    except Exception as exc:  # a damaged journal
        raise StudyError(f"cannot read the study at {path} ({type(exc).__name__}: {exc})",
                         "delete it and run without --resume") from None


def study_job(study: optuna.Study) -> dict:
    return dict(study.user_attrs.get(CONFIG_ATTR) or {})


def fail_stale(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed run as FAIL (only call when no other process runs)."""
    n = 0
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the search reads it back."""

    number: int
    values: tuple[float, ...]
    recipe: Recipe
    metrics: Mapping[str, float] | None
    constraints: tuple[float, ...]
    invalid: str | None

    @property
    def feasible(self) -> bool:
        """Valid and within every budget."""
        return self.metrics is not None and all(c <= 0 for c in self.constraints)

    def to_json(self) -> dict:
        d = {"number": self.number, "values": list(self.values), "recipe": self.recipe.to_json(),
             "estimate": dict(self.metrics) if self.metrics else None}
        if self.invalid:
            d["invalid"] = self.invalid
        return d


def records(study: optuna.Study) -> tuple[TrialRecord, ...]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        out.append(TrialRecord(t.number, tuple(t.values), Recipe.from_json(a.get("recipe", {"rewrites": []})),
                               a.get("estimate"), tuple(a.get("constraints", (1.0,))), a.get("invalid")))
    return tuple(out)


# ---------------------------------------------------------------------------- shared studies (--storage)
def open_study_storage(location: str | os.PathLike, *, heartbeat_interval: int | None = None):
    """The Optuna storage of an explicit ``--storage``: a journal file (this module's
    flushed, flock'ed journal) for a plain path, else :func:`archpass.search.storage.open_storage`
    (PostgreSQL or SQLite, with heartbeats and retry of stale trials; connection problems
    are one :class:`~archpass.search.storage.StorageError` line)."""
    from archpass.search import storage as sto

    loc = sto.parse_storage(location)
    if loc.kind == "journal":
        if not loc.path.parent.is_dir():
            raise sto.StorageError(f"the folder of the study file {loc.path} does not exist",
                                   "create it or pick another path")
        return _storage(loc.path)
    kw = {} if heartbeat_interval is None else {"heartbeat_interval": heartbeat_interval}
    return sto.open_storage(location, **kw)


JOB_WAIT_S = 30.0  # how long a joining worker waits for the creator to store the job


def join_study(storage, name: str, *, directions: Sequence[str], sampler, job: Mapping[str, Any],
               must_exist: bool = False, where: str = "") -> tuple[optuna.Study, bool]:
    """Create study ``name`` in ``storage``, or load it when another worker (another
    machine, or an earlier run) created it: ``(study, created)``.  Only the creator
    stores the job (and enqueues the first trials); a joiner waits briefly for the job
    the creator is writing.  ``must_exist`` (``--resume``) refuses to create."""
    import time

    created = False
    if must_exist:
        try:
            study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        except KeyError:
            raise StudyError(f"nothing to resume: no study '{name}' in {where}",
                             "run the same command without --resume") from None
    else:
        try:
            study = optuna.create_study(storage=storage, study_name=name, directions=list(directions), sampler=sampler)
            created = True
            study.set_user_attr(CONFIG_ATTR, dict(job))
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    if not created:
        deadline = time.monotonic() + JOB_WAIT_S
        while not study_job(study) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not study_job(study):
            raise StudyError(f"study '{name}' in {where} was not made by archpass optimize",
                             "give another --study-name")
    return study, created


def n_finished(study: optuna.Study, failed_attr: str = "evaluator") -> int:
    """Trials that count towards ``--trials``: complete ones, and those the user's
    evaluator failed (a failed evaluation is a finished trial; a trial failed because its
    worker died is not: it is retried)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)):
        if t.state == optuna.trial.TrialState.COMPLETE or (t.user_attrs.get(failed_attr) or {}).get("ok") is False:
            n += 1
    return n
