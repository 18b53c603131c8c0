"""`archpass report` through CliRunner (embedded and PostgreSQL storage), bad storage
input (one line, exit 2), and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from archpass.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "search"))
from report_study import make_study  # noqa: E402

runner = CliRunner()
PG = os.environ.get("ARCHPASS_TEST_POSTGRES")


@pytest.fixture(scope="module")
def journal_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-report")
    study, storage, *_ = make_study(folder, trials=25)
    return study, storage


def test_report_from_an_embedded_study(journal_study, tmp_path):
    study, storage = journal_study
    res = runner.invoke(app, ["report", "--storage", str(storage), "-o", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["study"] == study.study_name and sum(doc["headline"]["trials"].values()) == 25
    assert sorted(doc["files"]) == sorted(["report.json", "report.md", "trials.png", "blocks.png", "history.png",
                                           "report.html"])
    assert json.loads((tmp_path / "r" / "report.json").read_text())["best_trial"] == doc["best_trial"]
    table = runner.invoke(app, ["report", "--storage", str(storage), "--study-name", study.study_name,
                                "-o", str(tmp_path / "t")])
    assert table.exit_code == 0 and "wrote" in table.stdout and "report.html" in table.stdout


@pytest.mark.parametrize("args, words", [
    (["--storage", "{tmp}/missing.log"], "no study file"),
    (["--storage", "{storage}", "--study-name", "nope"], "no study named 'nope'"),
    (["--storage", "postgresql+psycopg://u@127.0.0.1:1/db"], "cannot reach the study database"),
    (["--storage", "{storage}", "-o", "{storage}"], "is not a folder"),
])
def test_bad_storage_is_one_line(journal_study, tmp_path, args, words):
    _, storage = journal_study
    args = [a.format(tmp=tmp_path, storage=storage) for a in args]
    res = runner.invoke(app, ["report", *args] + ([] if "-o" in args else ["-o", str(tmp_path / "r")]))
    assert res.exit_code == 2 and words in res.stderr
    assert len([l for l in res.stderr.splitlines() if l.startswith("error:")]) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not PG, reason="ARCHPASS_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_report_from_postgres_and_wrong_password(tmp_path):
    name = f"report-{uuid.uuid4().hex[:8]}"
    make_study(tmp_path, trials=12, study_name=name, storage=PG)
    res = runner.invoke(app, ["report", "--storage", PG, "--study-name", name, "-o", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["study"] == name and (tmp_path / "r" / "report.html").is_file()
    secret = "n0t-the-Passw0rd"
    bad = make_url(PG).set(username="archpass_pw", password=secret).render_as_string(hide_password=False)
    res = runner.invoke(app, ["report", "--storage", bad, "--study-name", name, "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "wrong password" in res.stderr and secret not in res.output + res.stderr


def test_report_as_a_subprocess(journal_study, tmp_path):
    _, storage = journal_study
    proc = subprocess.run([sys.executable, "-m", "archpass", "report", "--storage", str(storage), "-o",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "report.html").stat().st_size > 10_000 and "latency" in proc.stdout
