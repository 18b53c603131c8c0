"""Several worker processes on one PostgreSQL study (issue 10): nothing lost, nothing
duplicated, and a worker killed with SIGKILL mid-trial neither stops the others nor
leaves its trial RUNNING (Optuna's heartbeat fails it, and it is retried).

Workers are real processes (tests/dist_worker.py) scoring recipes of a small builder
model with the edgetpu cost model.  Needs ``ARCHPASS_TEST_POSTGRES`` (.ci/run starts a
server and sets it).
"""

from __future__ import annotations

import json
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
    # each worker may finish one trial more: the one in flight when the other reached n, or one it
    # started without checking the count (dist_worker checks only from trial number n - 1 on)
    assert n <= len(trials) <= n + 2
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


# ---------------------------------------------------------------------------- `archpass optimize` processes
ARCHPASS = [sys.executable, "-m", "archpass"]
EVAL_CMD = Path(__file__).resolve().with_name("eval_cmd.py")


def _optimize_cmd(model: Path, out: Path, study: str, trials: int, *extra: str, heartbeat: int = 1) -> list[str]:
    """The same command on every "machine": only -o (and the environment) differ."""
    return ARCHPASS + ["optimize", str(model), "-o", str(out), "--storage", PG, "--study-name", study,
                       "--trials", str(trials), "--no-guard", "--heartbeat", str(heartbeat), "--json",
                       "--evaluator", f"{sys.executable} {EVAL_CMD} {{model}}", *extra]


def _small_model(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx
    from search_helpers import ibn_net

    path = tmp / "net.onnx"
    onnx.save(ibn_net(), str(path))
    return path


def _study(name: str):
    return optuna.load_study(study_name=name, storage=open_storage(PG))


def test_two_archpass_optimize_processes_share_one_postgres_study(tmp_path):
    """Two `archpass optimize` runs of one command on one PostgreSQL study (as two machines
    would): trials are numbered once, none lost or duplicated, both ran trials and
    evaluations, and the last to finish saw every trial the storage holds."""
    model, name, n = _small_model(tmp_path), f"cli-{uuid.uuid4().hex[:10]}", 30
    procs = [subprocess.Popen(_optimize_cmd(model, tmp_path / f"m{i}" / "out.onnx", name, n, "--evaluate-top", "6"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        docs.append(json.loads(out))
    trials = _study(name).get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == states[TrialState.FAIL] == 0
    assert n <= len(complete) <= n + 1  # each process may finish the one trial it had in flight
    assert max(d["trials"] for d in docs) == len(complete)
    workers = Counter(t.user_attrs["worker"] for t in complete)
    assert len(workers) == 2, workers
    evaluated = Counter(t.user_attrs["worker"] for t in complete if t.user_attrs.get("evaluator", {}).get("ok"))
    assert len(evaluated) == 2  # the evaluations spread over both processes
    assert sum(not t.user_attrs["recipe"]["rewrites"] for t in complete) >= 1  # the unchanged model, enqueued once
    for d in docs:
        assert d["study_name"] == name and d["storage"] == PG and Path(d["output"]).is_file()


def test_an_optimize_process_killed_mid_evaluation_leaves_no_running_trial(tmp_path):
    """An `archpass optimize` process hangs inside its evaluator: a process resuming the
    study meanwhile leaves its RUNNING trial alone (it is alive).  Then it is SIGKILLed (a
    lost machine): the next process on the study fails the silent trial by its heartbeat,
    retries it and finishes; nothing is left RUNNING, and the report lists the failed trial."""
    model, name, n = _small_model(tmp_path), f"cli-{uuid.uuid4().hex[:10]}", 8
    flag = tmp_path / "hang.pid"
    beat = 2  # seconds; a trial silent for twice that is stale (margin for a loaded machine)
    lost = subprocess.Popen(_optimize_cmd(model, tmp_path / "a" / "out.onnx", name, n, "--evaluate-top", "2", heartbeat=beat),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ARCHPASS_TEST_HANG_FLAG": str(flag)})
    end = time.monotonic() + 120
    while not flag.exists():
        assert lost.poll() is None, lost.stderr.read()[-2000:]
        assert time.monotonic() < end, "the first process never reached its evaluator"
        time.sleep(0.1)
    hung = [t for t in _study(name).get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert len(hung) == 1
    # while it is alive (its heartbeat beats), another process resuming the study leaves its trial alone
    r = subprocess.run(_optimize_cmd(model, tmp_path / "c" / "out.onnx", name, 4, "--evaluate-top", "2", "--resume",
                                     heartbeat=beat),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _study(name).get_trials(deepcopy=False)[hung[0].number].state == TrialState.RUNNING
    lost.kill()
    os.kill(int(flag.read_text()), signal.SIGKILL)  # its evaluator too (it runs in its own session)
    assert lost.wait(timeout=30) == -signal.SIGKILL
    time.sleep(2 * beat + 0.5)  # the grace period (twice the heartbeat) passes
    r = subprocess.run(_optimize_cmd(model, tmp_path / "b" / "out.onnx", name, n, "--evaluate-top", "2",
                                     "--report", str(tmp_path / "rep"), heartbeat=beat),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = _study(name).get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    killed = trials[hung[0].number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if retried_from(t) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert states[TrialState.COMPLETE] >= n
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"- trial {killed.number} (fail): trial failed (worker lost" in md
