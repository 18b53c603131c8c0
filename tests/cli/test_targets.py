"""`archpass targets`, `archpass calibrate` and `inspect --target` through the CLI."""

from __future__ import annotations

import json

import pytest
from builders import NetBuilder
from typer.testing import CliRunner

from archpass.cli.main import app
from archpass.costmodel import builtin_names
from archpass.costmodel.backends.zigzag import available as zigzag_available

runner = CliRunner()
BUILT = {"edgetpu", "tpu", "cpu"} <= set(builtin_names())


@pytest.mark.skipif(not BUILT, reason="built-in targets not generated")
def test_targets_json_lists_builtins_with_accuracy():
    r = runner.invoke(app, ["targets", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    by = {t["name"]: t for t in doc["targets"]}
    assert {"edgetpu", "tpu", "cpu"} <= set(by)
    assert by["edgetpu"]["parallelism"] == 8 and by["tpu"]["parallelism"] == 32 and by["cpu"]["parallelism"] == 8
    assert by["edgetpu"]["source"] == "zigzag" and by["cpu"]["source"] == "onnxruntime"
    assert by["tpu"]["clock_hz"] > 0 and by["cpu"]["clock_hz"] is None
    for t in by.values():
        assert t["heldout_accuracy"]["kernels"]["n"] > 0


@pytest.mark.skipif(not BUILT, reason="built-in targets not generated")
def test_targets_table():
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0 and "edgetpu" in r.stdout and "zigzag" in r.stdout


@pytest.mark.skipif(not BUILT, reason="built-in targets not generated")
def test_inspect_with_target_json(tmp_path):
    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu6").ibn(16, expand=4).head(10).build(), path)
    r = runner.invoke(app, ["inspect", str(path), "--target", "edgetpu", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.stdout)["estimate"]
    for key in ("latency_ms", "params_bytes", "peak_activation_bytes", "macs", "kernels"):
        assert key in est
    assert est["kernels"][0]["layers"] and est["kernels"][0]["latency_ms"] > 0
    r = runner.invoke(app, ["inspect", str(path), "--target", "edgetpu"])
    assert r.exit_code == 0 and "latency" in r.stdout


def test_unknown_target_exit_2_lists_known(tmp_path):
    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(NetBuilder((1, 3, 16, 16)).conv(8, 3).build(), path)
    r = runner.invoke(app, ["inspect", str(path), "--target", "nosuch"])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "unknown target 'nosuch'" in line and len(line.splitlines()) == 1
    for name in builtin_names():
        assert name in line


def test_calibrate_bad_inputs_exit_2(tmp_path):
    r = runner.invoke(app, ["calibrate", "--backend", "onnxruntime", "--provider", "NoSuchExecutionProvider",
                            "--name", "x", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not installed here" in r.stderr
    r = runner.invoke(app, ["calibrate", "--backend", "zigzag", "--name", "x", "-o", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--hardware and --mapping" in r.stderr


@pytest.mark.skipif(not zigzag_available(), reason="zigzag-dse not installed (pip install 'archpass[zigzag]')")
def test_calibrate_zigzag_bad_hardware_exit_2(tmp_path):
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: broken\n")
    from archpass.costmodel.build_targets import HARDWARE

    r = runner.invoke(app, ["calibrate", "--backend", "zigzag", "--hardware", str(bad), "--mapping",
                            str(HARDWARE / "edge_tpu_like.mapping.yaml"), "--name", "x", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "ZigZag rejects hardware" in r.stderr


@pytest.mark.slow
def test_calibrate_onnxruntime_small_and_resume(tmp_path):
    out = tmp_path / "mycpu"
    args = ["calibrate", "--backend", "onnxruntime", "--name", "mycpu", "-o", str(out), "--samples", "10",
            "--workers", "1", "--max-wait", "0", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["target"]["name"] == "mycpu" and doc["accuracy"]["measured_points"] > 10
    lines = (out / "dataset.jsonl").read_text().splitlines()
    assert len(lines) == 10
    # a rerun measures nothing new (every chain is cached) and rewrites the same target
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and len((out / "dataset.jsonl").read_text().splitlines()) == 10
    r = runner.invoke(app, ["targets", str(out), "--json"])
    assert "mycpu" in {t["name"] for t in json.loads(r.stdout)["targets"]}


def test_calibrate_output_that_is_not_a_folder_exit_2(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep")
    r = runner.invoke(app, ["calibrate", "--backend", "onnxruntime", "--name", "x", "-o", str(f), "--samples", "10"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: the output folder {f} exists and is not a folder; give a folder path."]
    assert f.read_text() == "keep"
