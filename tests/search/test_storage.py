"""search/storage.py: opening study storage, and one-line errors for every way it fails.

The PostgreSQL tests need a real server: ``.ci/run`` starts one and sets
``ARCHPASS_TEST_POSTGRES`` (``bash .ci/postgres.sh run python -m pytest ...`` does the same
for a developer).  The server has a role ``archpass_pw`` with a password, so a wrong
password can be tried for real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
import warnings

import optuna
import pytest
from sqlalchemy.engine import make_url

from archpass.search.storage import StorageError, open_storage, parse_storage, retried_from

PG = os.environ.get("ARCHPASS_TEST_POSTGRES")
needs_pg = pytest.mark.skipif(not PG, reason="ARCHPASS_TEST_POSTGRES is not set: start a server with "
                              "`eval \"$(bash .ci/postgres.sh start)\"` (.ci/run does)")
WRONG_PASSWORD = "Wr0ng-Pa55word-xyz"


def _pg(user: str, password: str | None = None, database: str | None = None) -> str:
    url = make_url(PG).set(username=user, password=password)
    if database:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_paths_are_embedded_storages(tmp_path):
    assert parse_storage(tmp_path / "s.db").kind == "rdb"
    assert parse_storage(tmp_path / "s.db").heartbeat
    journal = parse_storage(tmp_path / "study.log")
    assert journal.kind == "journal" and not journal.heartbeat
    assert parse_storage("postgresql://u:secret@h/db").url.startswith("postgresql+psycopg://")
    assert "secret" not in parse_storage("postgresql://u:secret@h/db").display


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_sqlite_storage_has_heartbeats_and_retries(tmp_path):
    storage = open_storage(tmp_path / "s.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()  # a trial whose worker beat once, then died
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # SQLite timestamps have one-second resolution: wait past grace + 1 s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[trial.number].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if retried_from(t) == trial.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING


def test_journal_storage_round_trip(tmp_path):
    study = optuna.create_study(storage=open_storage(tmp_path / "study.log"), study_name="j")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    again = optuna.load_study(study_name="j", storage=open_storage(tmp_path / "study.log"))
    assert len(again.trials) == 3


@pytest.mark.parametrize("location, words", [
    ("postgresql+psycopg://postgres@127.0.0.1:{port}/archpass", "cannot reach the study database"),
    ("postgresql+psycopg://u:p@h:notaport/db", "malformed"),
    ("nosuchdb://x/y", "unknown database kind"),
    ("{tmp}/missing/folder/s.db", "cannot open the study file"),
    ("{tmp}/missing/folder/study.log", "folder of the study file"),
])
def test_bad_storage_is_one_line(tmp_path, location, words):
    location = location.format(port=_free_port(), tmp=tmp_path)
    with pytest.raises(StorageError) as err:
        open_storage(location)
    line = str(err.value)
    assert words in line and "\n" not in line and err.value.exit_code == 2


def test_missing_driver_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *a, **k):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(StorageError) as err:
        open_storage("postgresql+psycopg://u@127.0.0.1:1/db")
    assert "driver" in str(err.value) and "psycopg" in str(err.value) and "archpass[postgres]" in str(err.value)


@needs_pg
def test_wrong_password_is_named_without_echoing_it():
    with pytest.raises(StorageError) as err:
        open_storage(_pg("archpass_pw", WRONG_PASSWORD))
    line = str(err.value)
    assert "wrong password" in line and "archpass_pw" in line
    assert WRONG_PASSWORD not in line and "\n" not in line


@needs_pg
def test_missing_password_and_missing_database():
    with pytest.raises(StorageError, match="requires a password"):
        open_storage(_pg("archpass_pw"))
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(_pg("postgres", database="no_such_db"))


@needs_pg
def test_right_password_opens_postgres_with_heartbeat():
    url = _pg("archpass_pw", "archpass-test-pw", database="archpass_pw")
    storage = open_storage(url, heartbeat_interval=5)
    name = f"pw-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=storage, study_name=name)
    study.optimize(lambda t: t.suggest_int("x", 0, 9), n_trials=2)
    assert storage.get_heartbeat_interval() == 5
    assert len(optuna.load_study(study_name=name, storage=open_storage(url)).trials) == 2


@needs_pg
def test_wrong_password_from_a_real_process():
    """The password must not reach the terminal through any path (stdout, stderr, traceback)."""
    code = ("from archpass.search.storage import open_storage\n"
            f"open_storage({_pg('archpass_pw', WRONG_PASSWORD)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "wrong password" in proc.stderr
    assert WRONG_PASSWORD not in proc.stderr + proc.stdout
