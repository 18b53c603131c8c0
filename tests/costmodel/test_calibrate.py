"""A full runtime calibration's note when its summed kernels miss whole networks."""

import json
from dataclasses import replace

from typer.testing import CliRunner

from archpass.cli.main import app
from archpass.costmodel import load_target
from archpass.costmodel.calibrate import NETWORK_MAPE_NOTE, calibration_notes

runner = CliRunner()


def _with(chains, **source):
    t = load_target("cpu")
    return replace(t, accuracy={**t.accuracy, "chains": chains}, source={**t.source, **source})


def test_no_note_when_whole_networks_are_right():
    assert load_target("cpu").accuracy["chains"]["mape_pct"] < NETWORK_MAPE_NOTE
    assert calibration_notes(load_target("cpu")) == []
    assert calibration_notes(_with({"n": 0})) == []  # too few networks held out to tell
    assert calibration_notes(_with({"n": 40, "mape_pct": NETWORK_MAPE_NOTE, "within_10pct": 70.0})) == []


def test_note_names_the_adaptation_in_the_calibration_setting():
    (note,) = calibration_notes(_with({"n": 202, "mape_pct": 17.7, "within_10pct": 38.6}, threads=2))
    assert "18% off (MAPE over 202; 39% within ±10%)" in note and "with several threads" in note
    assert "archpass calibrate --adapt cpu --backend onnxruntime --threads 2 --name NAME -o DIR" in note
    (note,) = calibration_notes(_with({"n": 50, "mape_pct": NETWORK_MAPE_NOTE + 0.5, "within_10pct": 60.0},
                                      threads=1, graph_optimization="basic"))
    assert "--threads 1 --graph-opt basic --name" in note and "several threads" not in note


def test_calibrate_prints_the_note(tmp_path, monkeypatch):
    from archpass.costmodel import calibrate as cal

    noisy = _with({"n": 202, "mape_pct": 17.7, "within_10pct": 38.6, "within_20pct": 63.4, "rmspe_pct": 22.1}, threads=2)
    noisy = replace(noisy, accuracy={**noisy.accuracy, "notes": calibration_notes(noisy)})
    monkeypatch.setattr(cal, "calibrate_onnxruntime", lambda **kw: noisy)
    args = ["calibrate", "--backend", "onnxruntime", "--threads", "2", "--name", "x", "-o", str(tmp_path / "x")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"note: {noisy.accuracy['notes'][0]}" in " ".join(r.stdout.split())
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["notes"] == noisy.accuracy["notes"]
