"""`archpass verify` and `archpass apply --calib` through CliRunner; verify once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from archpass.cli.main import app
from builders import NetBuilder

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    b = NetBuilder((1, 3, 16, 16), seed=7).conv(16, 3, 2, act="relu6").ibn(16, expand=4, act="relu6")
    src = d / "net.onnx"
    onnx.save(b.ibn(24, expand=4, stride=2, act="relu6").head(6).build(), str(src))
    exact, lossy = d / "exact.onnx", d / "lossy.onnx"
    for recipe, out in (([{"pass": "dw_to_dense", "site": "ibn0_dw"}], exact), ([{"pass": "fuse_ibn", "site": "block0"}], lossy)):
        (d / "r.json").write_text(json.dumps({"rewrites": recipe}))
        r = runner.invoke(app, ["apply", str(src), str(d / "r.json"), "-o", str(out)])
        assert r.exit_code == 0, r.output
    np.save(d / "calib.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    return d, src, exact, lossy


def test_verify_exact_and_lossy(models):
    d, src, exact, lossy = models
    r = runner.invoke(app, ["verify", str(src), str(exact), "--calib", str(d / "calib.npy"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["fidelity"] == pytest.approx(1.0, abs=1e-9) and doc["samples"] == 40 and not doc["random_data"]
    assert doc["outputs"][0]["top1_agreement"] == 1.0 and doc["notes"] == []
    r = runner.invoke(app, ["verify", str(src), str(lossy), "--min-fidelity", "0.9999"])
    assert r.exit_code == 1
    assert "random inputs" in r.stdout and "below --min-fidelity" in r.stderr
    r = runner.invoke(app, ["verify", str(src), str(lossy), "--json", "--samples", "16"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["fidelity"] < 0.9999 and doc["random_data"] and doc["notes"]


def test_apply_with_calib_recovers_and_reports(models, tmp_path):
    d, src, *_ = models
    (tmp_path / "r.json").write_text(json.dumps({"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]}))
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["apply", str(src), str(tmp_path / "r.json"), "-o", str(out), "--calib", str(d / "calib.npy"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"input", "output", "rewrites", "exact", "before", "after"} <= set(doc)  # apply's keys stay
    fid = doc["fidelity"]
    assert fid["after"]["score"] > fid["before"]["score"] and fid["calibration"]["samples"] == 40
    assert any(f["kept"] == "refit" for f in fid["recovered_layers"])
    assert any("held out" in n for n in doc["notes"])  # 40 samples: a quarter scores, the rest fits
    # what apply wrote is the recovered model: verify (on all 40 samples) sees recovered fidelity too
    r = runner.invoke(app, ["verify", str(src), str(out), "--calib", str(d / "calib.npy"), "--json"])
    assert json.loads(r.stdout)["fidelity"] > fid["before"]["score"] + 0.5 * (fid["after"]["score"] - fid["before"]["score"])
    r = runner.invoke(app, ["apply", str(src), str(tmp_path / "r.json"), "-o", str(tmp_path / "naive.onnx"),
                            "--calib", "random", "--samples", "8", "--no-recover"])
    assert r.exit_code == 0, r.output
    assert "before recovery" in r.stdout and "after recovery" not in r.stdout and "random inputs" in r.stdout


@pytest.mark.parametrize("case", ["wrong_shape", "missing_name", "unreadable_image", "empty_folder", "other_model"])
def test_bad_calibration_data_exit_2_nothing_written(models, tmp_path, case):
    d, src, *_ = models
    rng = np.random.default_rng(0)
    if case == "wrong_shape":
        np.save(tmp_path / "c.npy", rng.standard_normal((4, 3, 15, 16)))
        calib = tmp_path / "c.npy"
    elif case == "missing_name":
        np.savez(tmp_path / "c.npz", x=rng.standard_normal((4, 3, 16, 16)))
        calib = tmp_path / "c.npz"
    elif case == "unreadable_image":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "a.jpg").write_bytes(b"not a jpeg")
        calib = tmp_path / "imgs"
    elif case == "empty_folder":
        (tmp_path / "imgs").mkdir()
        calib = tmp_path / "imgs"
    else:
        np.savez(tmp_path / "c.npz", input=rng.standard_normal((4, 3, 224, 224)))
        calib = tmp_path / "c.npz"
    (tmp_path / "r.json").write_text(json.dumps({"rewrites": [{"pass": "fuse_ibn", "site": "block0"}]}))
    out = tmp_path / "out.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, ["apply", str(src), str(tmp_path / "r.json"), "-o", str(out), "--calib", str(calib)])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = runner.invoke(app, ["verify", str(src), str(src), "--calib", str(calib)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


def test_verify_models_with_different_outputs_is_bad_input(models, tmp_path):
    _, src, *_ = models
    other = tmp_path / "other.onnx"
    onnx.save(NetBuilder((1, 3, 16, 16), seed=1).conv(8, 3).head(4).build(), str(other))
    r = runner.invoke(app, ["verify", str(src), str(other)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


def test_verify_subprocess(models):
    d, src, exact, _ = models
    p = subprocess.run([sys.executable, "-m", "archpass", "verify", str(src), str(exact), "--calib", str(d / "calib.npy"),
                        "--min-fidelity", "0.999", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["passed"] is True


def test_verify_reads_images_for_an_nhwc_model_without_a_layout_flag(tmp_path):
    """A TensorFlow/Keras-style export (input N,H,W,C) takes a folder of images as they
    come: the default --layout auto reads the channels from the last axis."""
    from PIL import Image

    from builders import nhwc_input

    src = tmp_path / "nhwc.onnx"
    onnx.save(nhwc_input(NetBuilder((1, 3, 16, 16), seed=3).conv(8, 3, 2, act="relu").head(4).build()), str(src))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    r = runner.invoke(app, ["verify", str(src), str(src), "--calib", str(imgs), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["samples"] == 3 and doc["fidelity"] == pytest.approx(1.0, abs=1e-9)
    r = runner.invoke(app, ["verify", str(src), str(src), "--calib", str(imgs), "--layout", "nchw"])
    assert r.exit_code == 2 and "16 channels in nchw layout" in r.output
