"""Storage: resume after kill -9 without losing a finished trial, several local workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from archpass import api
from archpass.search import study as st
from archpass.search.study import StudyError

ARCHPASS = [sys.executable, "-m", "archpass"]


def _poll_complete(path: Path) -> dict[int, dict]:
    """The finished trials of a study a running process writes: none yet while the file
    exists but the process has not written the study into it."""
    if not path.is_file():
        return {}
    try:
        return _complete(path)
    except StudyError:
        return {}


def _complete(path: Path) -> dict[int, dict]:
    s = st.load_study(path, sampler=None)
    return {t.number: t.params for t in s.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}


def test_resume_after_sigkill_loses_no_finished_trial(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    store = st.storage_path(out)
    cmd = ARCHPASS + ["optimize", str(small_model), "-o", str(out), "--trials", "5000", "--no-guard", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(_poll_complete(store)) >= 12:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the run finished no trial in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _complete(store)
    assert len(before) >= 12 and not out.exists()
    n = max(before) + 10
    cmd = ARCHPASS + ["optimize", str(small_model), "-o", str(out), "--trials", str(n), "--no-guard", "--resume", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = _complete(store)
    assert all(after.get(k) == v for k, v in before.items()), "a finished trial was lost or changed"
    assert len(after) == n and out.is_file()
    s = st.load_study(store, sampler=None)
    assert not s.get_trials(states=(optuna.trial.TrialState.RUNNING,)), "a stale RUNNING trial was left"


def test_resume_refuses_a_different_command(small_model, tmp_path):
    api.optimize(small_model, tmp_path / "o.onnx", "edgetpu", trials=3, guard=False)
    with pytest.raises(StudyError, match="differs from the interrupted run in target"):
        api.optimize(small_model, tmp_path / "o.onnx", "cpu", trials=6, guard=False, resume=True)
    with pytest.raises(StudyError, match="nothing to resume"):
        api.optimize(small_model, tmp_path / "other.onnx", "edgetpu", trials=6, guard=False, resume=True)


def test_two_local_workers_share_one_study(small_model, tmp_path):
    doc = api.optimize(small_model, tmp_path / "o.onnx", "edgetpu", trials=150, guard=False, workers=2)
    s = st.load_study(Path(doc["storage"]), sampler=None)
    done = s.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    workers = {t.user_attrs.get("worker") for t in done}
    assert workers == {0, 1}
    assert len(done) >= 150 and doc["trials"] == len(done)
    assert len({t.number for t in done}) == len(done)


def test_ctrl_c_stops_cleanly_and_writes_the_best_so_far(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    store = st.storage_path(out)
    cmd = ARCHPASS + ["optimize", str(small_model), "-o", str(out), "--trials", "100000", "--no-guard", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_poll_complete(store)) < 8:
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
            _, stderr = proc.communicate(timeout=30)
            pytest.fail(f"optimize did not stop within 60 s of Ctrl-C:\n{stderr[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    import json

    doc = json.loads(stdout)
    assert doc["interrupted"] and doc["trials"] >= 8 and out.is_file()
    assert "Traceback" not in stderr and "--resume" in stderr
