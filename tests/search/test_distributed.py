"""Several worker processes on one PostgreSQL study (issue 10): nothing lost, nothing
duplicated, and a worker killed with SIGKILL mid-trial neither stops the others nor
leaves its trial RUNNING (Optuna's heartbeat fails it, and it is retried).

Workers are real processes (tests/dist_worker.py) scoring recipes of a small builder
model with the edgetpu cost model.  Needs ``ARCHPASS_TEST_POSTGRES`` (.ci/run starts a
server and sets it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from archpass.search.storage import open_storage, retried_from

PG = os.environ.get("ARCHPASS_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not PG, reason="ARCHPASS_TEST_POSTGRES is not set: start a server with "
                                "`eval \"$(bash .ci/postgres.sh start)\"` (.ci/run does)")
WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"
sys.path.insert(0, str(WORKER.parent))
import dist_worker  # noqa: E402


def _start(tmp: Path, study: str, trials: int, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{name}.log"
    cmd = [sys.executable, str(WORKER), "--storage", PG, "--study", study, "--trials", str(trials),
           "--log", str(log), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.err", "w")), log


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _wait_for(log: Path, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in _lines(log):
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before '{prefix}': "
                                 f"{(log.with_suffix('.err')).read_text()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no '{prefix}' from the worker within {timeout} s")


def _new_study(tmp: Path) -> str:
    dist_worker.small_model_path(tmp)  # written once here, not raced by the workers
    name = f"dist-{uuid.uuid4().hex[:10]}"
    optuna.create_study(storage=open_storage(PG), study_name=name, direction="minimize")
    return name


def _check_nothing_lost(trials, logs: list[Path], killed: set[int] = frozenset()) -> dict:
    import dist_worker

    a = dist_worker.audit(trials, logs)
    assert a["numbers_ok"], "trial numbers must be unique and contiguous"
    assert a["duplicated"] == [], "a trial was finished by two workers"
    assert a["lost"] == [] and a["unreported"] == []
    # the finished count the workers saw is exactly what the storage holds
    assert a["finished_by_workers"] == a["complete_in_storage"]
    assert a["trials_in_storage"] == a["complete_in_storage"] + len(killed)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert "rewrites" in t.user_attrs["recipe"] and t.value == t.user_attrs["latency_ms"]
    return a


def test_two_workers_share_one_study(tmp_path):
    study = _new_study(tmp_path)
    n = 20
    procs = [_start(tmp_path, study, n, f"w{i}", "--seed", str(i)) for i in range(2)]
    for proc, log in procs:
        assert proc.wait(timeout=180) == 0, (log.with_suffix(".err")).read_text()[-2000:]
    trials = optuna.load_study(study_name=study, storage=open_storage(PG)).get_trials(deepcopy=False)
    _check_nothing_lost(trials, [log for _, log in procs])
    assert n <= len(trials) <= n + 1  # each worker may finish the one trial it had in flight
    assert all(dist_worker.finished_by(log) for _, log in procs), "both workers ran trials"
    pids = {t.user_attrs["worker"] for t in trials}
    assert pids == {p.pid for p, _ in procs}


def test_worker_killed_mid_trial(tmp_path):
    study = _new_study(tmp_path)
    n, grace = 10, 4
    flag = tmp_path / "killed"
    beat = ("--heartbeat", "1", "--grace", str(grace))
    hung, hung_log = _start(tmp_path, study, n, "hung", "--hang", *beat)
    killed_number = int(_wait_for(hung_log, "running", hung).split()[1])
    # the survivors go on until n trials are complete and the grace period after the kill is well over
    linger = ("--pace", "0.05", "--linger-after", str(flag), "--linger", str(grace + 2))
    procs = [_start(tmp_path, study, n, f"w{i}", "--seed", str(i), *beat, *linger) for i in range(2)]
    for proc, log in procs:
        _wait_for(log, "done", proc)  # the others are running trials...
    os.kill(hung.pid, signal.SIGKILL)  # ...when this one dies inside its trial
    assert hung.wait(timeout=30) == -signal.SIGKILL
    flag.write_text("killed\n")
    for proc, log in procs:
        assert proc.wait(timeout=180) == 0, (log.with_suffix(".err")).read_text()[-2000:]

    trials = optuna.load_study(study_name=study, storage=open_storage(PG)).get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if retried_from(t) == killed_number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    _check_nothing_lost(trials, [log for _, log in procs], {killed_number})
    assert states[TrialState.COMPLETE] >= n
