"""`archpass optimize` through CliRunner (results, bad inputs) and the retrain-mode ONNX -> PyTorch conversion."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from archpass.cli.main import app
from builders import NetBuilder, random_input, run_ort

runner = CliRunner()


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "net.onnx"
    b = NetBuilder((1, 3, 32, 32), seed=4).conv(16, 3, stride=2).ibn(16, expand=4).ibn(24, expand=4, stride=2)
    onnx.save(b.ibn(24, expand=4).head(5).build(), str(p))
    return p


def _opt(model, tmp_path, *extra):
    return runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "20",
                               "--no-guard", *extra])


def test_optimize_json_then_apply_replays_the_recipe(model, tmp_path):
    r = _opt(model, tmp_path, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"baseline", "optimized", "recipe", "trials", "output", "storage"} <= set(doc)
    assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
    replay = tmp_path / "replay.onnx"
    r2 = runner.invoke(app, ["apply", str(model), str(tmp_path / "out.recipe.json"), "-o", str(replay), "--json"])
    assert r2.exit_code == 0, r2.output
    a, b = onnx.load(str(tmp_path / "out.onnx")), onnx.load(str(replay))
    x = {"input": random_input((1, 3, 32, 32))}
    np.testing.assert_array_equal(run_ort(a, x)[0], run_ort(b, x)[0])


def test_optimize_table(model, tmp_path):
    r = _opt(model, tmp_path)
    assert r.exit_code == 0, r.output
    assert "latency (ms)" in r.stdout and "rewrites:" in r.stdout and "wrote" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--target", "warp-drive"], "unknown target 'warp-drive'"),
    (["--max-latency-ms", "0.000001", "--no-guard"], "no candidate meets --max-latency-ms"),
    (["--passes", "fuse_ibn,shrink_everything"], "unknown pass 'shrink_everything'"),
    (["--freeze", "block42"], "--freeze names a site this model does not have: 'block42'"),
    (["--objective", "speed"], "unknown objective 'speed'"),
    (["--mode", "post-training"], "post-training mode needs calibration data"),
])
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, args, words):
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "5", *args])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_retrain_output_converts_to_pytorch(model, tmp_path):
    """The README's retraining route: the emitted ONNX -> onnx2torch -> a trainable torch module."""
    torch = pytest.importorskip("torch")
    onnx2torch = pytest.importorskip("onnx2torch")
    r = _opt(model, tmp_path, "--mode", "retrain")
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(tmp_path / "out.onnx"))
    net = onnx2torch.convert(proto)
    x = random_input((1, 3, 32, 32))
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), run_ort(proto, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = net(torch.from_numpy(x)).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unreadable_calibration_data_is_exit_2(model, tmp_path):
    bad = tmp_path / "calib.npy"
    bad.write_bytes(b"not numpy at all")
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "5", "--calib", str(bad)])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "cannot read calibration file" in lines[0], r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_default_retrain_guard_reports_the_proxy(model, tmp_path):
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "15", "--finalists", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    p = doc["proxy"]
    from archpass.search.guard import PROXY_TOLERANCE

    assert doc["mode"] == "retrain" and 1 <= len(doc["finalists"]) <= 3
    assert p["threshold"] == pytest.approx(p["baseline"] - PROXY_TOLERANCE)
    # never slower, and the emitted model passes the guard (or is the original)
    assert doc["optimized"]["latency_ms"] <= doc["baseline"]["latency_ms"]
    assert p["ok"] and (p["score"] >= p["threshold"] or not doc["improved"])


def test_post_training_with_calibration_data(model, tmp_path):
    from archpass.model import load_model

    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "15", "--finalists", "3",
                            "--calib", str(tmp_path / "calib.npy"), "--min-fidelity", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    f = doc["fidelity"]
    assert doc["mode"] == "post-training" and f["threshold"] == 0.5 and f["ok"]
    out = load_model(tmp_path / "out.onnx")
    assert doc["improved"]  # emitted with the recovered weights the guard scored, and the record
    from archpass.record import read_record

    assert doc["weights"] == "recovered on the calibration data"
    assert len(read_record(out.proto)["rewrites"]) == len(doc["recipe"]["rewrites"])


def test_calibration_preprocessing_options_reach_the_guard(model, tmp_path):
    """optimize takes the same calibration options as apply and verify: a malformed one is refused
    up front, and --samples limits the data the guard reads."""
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["optimize", str(model), "-o", str(out), "--trials", "5", "--calib", str(tmp_path / "calib.npy"),
                            "--mean", "0.5,abc"])
    assert r.exit_code == 2 and "--mean" in r.stderr and not out.exists(), r.output
    r = runner.invoke(app, ["optimize", str(model), "-o", str(out), "--trials", "8", "--finalists", "2",
                            "--calib", str(tmp_path / "calib.npy"), "--samples", "4", "--min-fidelity", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["mode"] == "post-training" and doc["fidelity"]["threshold"] == 0.5
    from archpass.search import study as st

    job = st.study_job(st.load_study(st.storage_path(out), sampler=None))
    assert dict(job["calib_options"])["samples"] == 4
