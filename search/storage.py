"""Where a study lives: Optuna storage opened from a URL or an embedded file.

``open_storage("postgresql+psycopg://USER@HOST/DB")`` gives an Optuna ``RDBStorage`` that
workers on any number of machines share (Optuna's RDB storage is the distributed
engine; archpass does not write its own).  A worker that dies mid-trial (SIGKILL, a lost
machine) stops sending heartbeats; once ``grace_period`` seconds pass, the next worker
that starts a trial marks the stale trial FAIL and Optuna's retry callback enqueues a
copy of it (same parameters, ``failed_trial`` system attribute naming the original), so
a study is never stuck on a RUNNING trial.

An embedded path is a SQLite file when it ends in ``.db``/``.sqlite``/``.sqlite3`` (an
RDB storage too, with heartbeats) and an Optuna journal file otherwise (safe for several
local processes; journal storage has no heartbeat).

Connection problems become one-line :class:`StorageError` s: an unreachable server, a
wrong password (named as such; the password itself is never part of a message), a
database that does not exist, a missing driver, a malformed URL.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from archpass.errors import ArchpassError

DEFAULT_HEARTBEAT_S = 30
DEFAULT_MAX_RETRY = 3
CONNECT_TIMEOUT_S = 10
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

# DBAPI module -> the pip requirement that provides it
_DRIVER_PACKAGES = {"psycopg": "archpass[postgres] (psycopg 3)", "psycopg2": "psycopg2-binary",
                    "pymysql": "pymysql", "MySQLdb": "mysqlclient", "pg8000": "pg8000"}


class StorageError(ArchpassError):
    """The study storage cannot be opened: bad URL, unreachable server, bad credentials, no driver."""


@dataclass(frozen=True)
class StorageLocation:
    """A parsed ``--storage`` value.  ``display`` is safe to print (password masked)."""

    kind: str  # "rdb" or "journal"
    url: str  # SQLAlchemy URL (rdb) or file path (journal)
    display: str
    heartbeat: bool
    path: Path | None = None  # the file of an embedded storage

    @property
    def is_remote(self) -> bool:
        return self.kind == "rdb" and not self.url.startswith("sqlite")


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


def parse_storage(location: str | os.PathLike) -> StorageLocation:
    """Classify ``location`` without connecting: a database URL or an embedded file path."""
    text = os.fspath(location)
    if "://" not in text:
        path = Path(text).expanduser()
        if path.suffix.lower() in SQLITE_SUFFIXES:
            url = f"sqlite:///{path.resolve()}"
            return StorageLocation("rdb", url, str(path), heartbeat=True, path=path)
        return StorageLocation("journal", str(path), str(path), heartbeat=False, path=path)

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
        raise StorageError(f"storage URL {shown} is malformed",
                           "write it as postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from None
    if url.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; archpass ships psycopg 3.
        url = url.set(drivername="postgresql+psycopg")
    return StorageLocation("rdb", url.render_as_string(hide_password=False),
                           url.render_as_string(hide_password=True), heartbeat=True)


def _check_driver(url) -> None:
    try:
        url.get_dialect().import_dbapi()
    except ImportError as exc:
        module = getattr(exc, "name", None) or url.drivername
        package = _DRIVER_PACKAGES.get(module.split(".")[0], module)
        raise StorageError(f"the database driver for {url.drivername}:// ({module}) is not installed",
                           f"pip install {package!r}") from None
    except Exception as exc:  # an unknown dialect name
        if type(exc).__name__ == "NoSuchModuleError":
            raise StorageError(f"unknown database kind {url.drivername}:// in --storage",
                               "use postgresql+psycopg://USER@HOST/DB, sqlite:///PATH or a file path") from None
        raise


def _connect_error(exc: Exception, location: StorageLocation, password: str | None) -> StorageError:
    """One line for a failed connection, by what the driver said."""
    orig = getattr(exc, "orig", None) or exc
    said = _scrub(" ".join(str(orig).split()), password)
    where = location.display
    low = said.lower()
    if "password authentication failed" in low or "access denied" in low:
        user = re.search(r'for user "([^"]*)"', said)
        who = f" for user {user.group(1)}" if user else ""
        return StorageError(f"wrong password{who} for the study database {where}",
                            "check the password in --storage (or the PGPASSWORD / ~/.pgpass the driver reads)")
    if "no password supplied" in low:
        return StorageError(f"the study database {where} requires a password and none was given",
                            "add it to --storage (postgresql+psycopg://USER:PASSWORD@HOST/DB) or to ~/.pgpass")
    if "does not exist" in low and "database" in low:
        return StorageError(f"the database in {where} does not exist",
                            "create it first (createdb NAME) or name an existing one")
    if "no pg_hba.conf entry" in low or "authentication" in low:
        return StorageError(f"the study database {where} refused the connection ({said})",
                            "check the user name and the server's pg_hba.conf")
    if "unable to open database file" in low:
        return StorageError(f"cannot open the study file {where}", "check that its folder exists and is writable")
    return StorageError(f"cannot reach the study database {where} ({said})",
                        "check that the server runs and the host and port in --storage are right")


def _engine_kwargs(url) -> dict:
    if url.get_backend_name() == "postgresql":
        # no pool_pre_ping: it doubles the round trips of every storage call
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


def open_storage(
    location: str | os.PathLike,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
):
    """Open (creating when needed) the Optuna storage at ``location``.

    Database storages get heartbeats every ``heartbeat_interval`` seconds; a trial
    without one for ``grace_period`` seconds (default: twice the interval) is failed by
    the next worker and retried up to ``max_retry`` times.  Raises :class:`StorageError`
    with one line when the storage cannot be opened."""
    import optuna

    loc = parse_storage(location)
    if loc.kind == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(loc.url)
        if not path.parent.is_dir():
            raise StorageError(f"the folder of the study file {path} does not exist", "create it or pick another path")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"cannot open the study file {path} ({exc.strerror})", "check its permissions") from None

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    url = make_url(loc.url)
    password = url.password
    _check_driver(url)
    kwargs = _engine_kwargs(url)
    probe = sa.create_engine(url, **kwargs)
    try:
        probe.connect().close()
    except sa.exc.DBAPIError as exc:
        raise _connect_error(exc, loc, password) from None
    finally:
        probe.dispose()

    interval = max(1, int(heartbeat_interval))
    grace = int(grace_period) if grace_period is not None else 2 * interval
    try:
        with warnings.catch_warnings():  # heartbeats and retries are flagged experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(loc.url, engine_kwargs=kwargs, heartbeat_interval=interval,
                                              grace_period=grace, **_retry_callback(max_retry))
    except sa.exc.DBAPIError as exc:
        raise _connect_error(exc, loc, password) from None
    except sa.exc.SQLAlchemyError as exc:
        raise StorageError(f"cannot set up the study tables in {loc.display} ({_scrub(str(exc).splitlines()[0], password)})",
                           "check that the database user may create tables") from None


def _retry_callback(max_retry: int | None) -> dict:
    """Optuna's retry of heartbeat-stale trials, under the keyword the installed Optuna uses
    (``heartbeat_stale_trial_callback`` since Optuna 5, ``failed_trial_callback`` before)."""
    from optuna import storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=max_retry)}


def retried_from(trial) -> int | None:
    """The number of the trial a retried trial repeats (None for a first attempt)."""
    value = trial.system_attrs.get("failed_trial")
    return int(value) if value is not None else None


def load_existing_study(location: str | os.PathLike, study_name: str | None = None):
    """An existing study (never created): by name, or the only one the storage holds."""
    import optuna

    loc = parse_storage(location)
    if loc.path is not None and not loc.path.is_file():
        raise StorageError(f"no study file at {loc.display}", "give the storage path archpass optimize printed")
    storage = open_storage(location)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name is None:
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise StorageError(f"{loc.display} holds {len(names)} studies ({found})",
                               "name one with --study-name")
        study_name = names[0]
    if study_name not in names:
        found = ", ".join(names) if names else "none"
        raise StorageError(f"no study named '{study_name}' in {loc.display} (studies: {found})",
                           "check --study-name")
    return optuna.load_study(study_name=study_name, storage=storage)


def fail_stale_by_heartbeat(study) -> list[int]:
    """Fail (and, through the storage's retry callback, re-enqueue) the trials whose worker
    stopped beating for longer than the grace period; a live worker's RUNNING trial is
    left alone.  Storages without heartbeats (journal files) are untouched.  Returns the
    failed trials' numbers."""
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if not is_heartbeat_enabled(study._storage):
        return []
    before = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    with warnings.catch_warnings():  # flagged experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    return sorted(before - after)
