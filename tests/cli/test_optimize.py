"""`archpass optimize` through CliRunner (results, bad inputs) and the retrain-mode ONNX -> PyTorch conversion."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

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
    # issue 10: storage, evaluator, seeds
    (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/studies"], "cannot reach the study database"),
    (["--storage", "postgresql+psycopg://u:pw@host:notaport/db"], "storage URL postgresql+psycopg://u:***@host:notaport/db is malformed"),
    (["--evaluator", "no-such-evaluator-cmd {model}"], "evaluator command 'no-such-evaluator-cmd' not found on PATH"),
    (["--evaluator", f"{sys.executable} x.py {{model}}", "--min-metric", "agreement"], "--min-metric 'agreement' has no '='"),
    (["--min-metric", "agreement=0.9"], "--min-metric bounds the metrics of an --evaluator, and none was given"),
    (["--study-name", "team"], "--study-name names a study in a --storage, and none was given"),
    (["--seed-recipe", "no-such-recipe.json"], "recipe file not found"),
])
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, args, words):
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "5", *args])
    _one_error_line(r, words)
    assert not (tmp_path / "out.onnx").exists()


def _one_error_line(r, words: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


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


def test_table_never_rounds_a_fidelity_up_to_one(capsys):
    """A fidelity of 0.9999973 is printed as such, not as 1 (a lossless-looking figure)."""
    from archpass.cli.optimize import _guard_value, render

    est = {"latency_ms": 1.0, "params_bytes": 1000, "peak_activation_bytes": 1000, "macs": 10}
    doc = {"input": "m.onnx", "target": "edgetpu", "objectives": ["latency"], "trials": 3, "baseline": est,
           "optimized": est, "recipe": {"rewrites": []}, "output": "o.onnx", "recipe_file": "o.recipe.json",
           "storage": "o.study.jsonl", "study_name": "s",
           "fidelity": {"threshold": 0.99, "baseline": 1.0, "score": 0.9999973313062179}}
    render(doc)
    row = next(line for line in capsys.readouterr().out.splitlines() if "fidelity" in line)
    assert "0.999997" in row and "≥ 0.99" in row, row
    assert [_guard_value(x) for x in (1.0, 0.9931234, -4.352944606614031, 0.99999999999)] == \
        ["1", "0.9931", "-4.353", "0.99999999999"]


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


# ---------------------------------------------------------------------------- issue 10: storage, evaluator, seeds, report
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mobilenet_v2.onnx"
PG = os.environ.get("ARCHPASS_TEST_POSTGRES")


@pytest.mark.skipif(not PG, reason="ARCHPASS_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_wrong_database_password_is_named_and_not_echoed(model, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(PG).set(username="archpass_pw", password="not-the-Password-42", database="archpass_pw")
    r = runner.invoke(app, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--trials", "5",
                            "--storage", url.render_as_string(hide_password=False)])
    _one_error_line(r, "wrong password for user archpass_pw")
    assert "not-the-Password-42" not in r.output and not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_example_agreement_evaluator_in_the_loop(tmp_path):
    """The README's evaluator example: examples/evaluate_agreement.py measures top-1 agreement
    of each promising candidate with the bundled model; --min-metric keeps only candidates
    that agree (fusing IBN blocks of this random-weight model does not: the original is kept)."""
    cmd = f"{shlex.quote(sys.executable)} {ROOT / 'examples' / 'evaluate_agreement.py'} {{model}} --samples 32"
    r = runner.invoke(app, ["optimize", str(EXAMPLE), "-o", str(tmp_path / "out.onnx"), "--trials", "5", "--no-guard",
                            "--passes", "fuse_ibn", "--evaluator", cmd, "--min-metric", "agreement=0.9",
                            "--evaluate-top", "2", "--report", str(tmp_path / "report"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ev = doc["evaluator"]
    assert ev["evaluated"] == 5 and not ev["failed"] and ev["metrics"]["agreement"] == 1.0  # the original
    assert not doc["improved"] and doc["recipe"] == {"rewrites": []}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    fused = [t for t in report["trials"] if t["recipe"]["rewrites"]]
    assert fused and all(t["metrics"]["agreement"] < 0.9 and "< 0.9" in t["reason"] for t in fused)


def _recipe(path: Path, rewrites: list[dict]) -> Path:
    path.write_text(json.dumps({"rewrites": rewrites}))
    return path


@pytest.mark.slow
def test_recipe_found_on_mobilenet_v2_seeds_its_width_075_and_160_siblings(zoo_model, tmp_path):
    """A recipe `archpass optimize` finds on torchvision MobileNetV2 seeds runs on torchvision
    MobileNetV2 at width 0.75 and at 160x160: sites resolve by stage and block position, channel
    counts and the input size are scaled, and the output lists what resolved and what did not."""
    base = zoo_model("mobilenet_v2")
    found = tmp_path / "found.onnx"
    r = runner.invoke(app, ["optimize", str(base), "-o", str(found), "--trials", "15", "--no-guard",
                            "--passes", "fuse_ibn,channels,dw_to_dense,resolution", "--resolutions", "192,224",
                            "--granularity", "group"])
    assert r.exit_code == 0, r.output
    recipe = json.loads((tmp_path / "found.recipe.json").read_text())["rewrites"]
    assert {rw["pass"] for rw in recipe} >= {"fuse_ibn", "channels"}
    by_hand = _recipe(tmp_path / "hand.json", [
        {"pass": "channels", "site": "group1", "channels": 24},  # the stem's 32 output channels
        {"pass": "fuse_ibn", "site": "block0"},  # block0 has no expand conv: not even valid on the source
        {"pass": "fuse_ibn", "site": "block99"},  # MobileNetV2 has 17 blocks
    ])
    for sibling, hw in (("mobilenet_v2_w075", 224), ("mobilenet_v2_160", 160)):
        out = tmp_path / sibling / "out.onnx"
        args = ["optimize", str(zoo_model(sibling)), "-o", str(out), "--trials", "3", "--no-guard",
                "--seed-recipe", str(tmp_path / "found.recipe.json"), "--seed-recipe", str(by_hand),
                "--seed-model", str(base), "--report", str(out.parent / "report")]
        if sibling.endswith("w075"):  # the table once; each sibling's search once more, as --json
            table = runner.invoke(app, args)
            assert table.exit_code == 0, table.output
            assert f"{len(recipe)} of {len(recipe)} rewrites resolved" in table.stdout
            assert "1 of 3 rewrites resolved" in table.stdout and "not resolved" in table.stdout
        doc = json.loads(runner.invoke(app, args + ["--json"]).stdout)
        s_found, s_hand = doc["seeds"]
        assert s_found["unresolved"] == 0 and s_found["resolved"] == len(recipe)
        moved = {(e["source"]["pass"], e["source"].get("site")): e["resolved"] for e in s_found["entries"]}
        for rw in recipe:
            if rw["pass"] == "fuse_ibn":
                assert moved[("fuse_ibn", rw["site"])]["site"] == rw["site"]  # same architecture, same block
            if rw["pass"] == "resolution":
                assert moved[("resolution", None)]["height"] == (rw["height"] if hw == 224 else 136)
        stem = s_hand["entries"][0]
        assert stem["ok"] and stem["address"] == "output channels of stem layer 0"
        assert stem["resolved"]["channels"] == (16 if sibling.endswith("w075") else 24)  # 24 of 32 -> of 24
        assert not s_hand["entries"][1]["ok"] and "does not apply to the source model" in s_hand["entries"][1]["note"]
        assert not s_hand["entries"][2]["ok"] and "block99" in s_hand["entries"][2]["note"]
        from archpass.search import study as st

        trials = st.load_study(st.storage_path(out), sampler=None).trials
        assert trials[1].user_attrs["recipe"] == s_found["recipe"] and "invalid" not in trials[1].user_attrs
        assert trials[2].user_attrs["recipe"] == s_hand["recipe"]
        md = (out.parent / "report" / "report.md").read_text()
        assert "## Seed recipes" in md and md.count("**not resolved**") == 2


@pytest.mark.parametrize("calib", [[], ["--calib", "random", "--samples", "16"]], ids=["retrain", "post-training"])
def test_half_precision_export_optimizes_and_stays_float16(tmp_path, calib):
    """A float16 export through both modes (it crashed with an onnxruntime type error):
    the emitted model keeps float16 inputs and weights, passes the checker and runs."""
    from builders import half_precision

    src = tmp_path / "net16.onnx"
    b = NetBuilder((1, 3, 32, 32), seed=4).conv(16, 3, stride=2).ibn(16, expand=4).ibn(24, expand=4, stride=2)
    onnx.save(half_precision(b.ibn(24, expand=4).head(5).build()), str(src))
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["optimize", str(src), "-o", str(out), "--trials", "15", "--json", *calib])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["mode"] == ("post-training" if calib else "retrain") and doc["improved"]
    assert src.read_bytes() == before
    emitted = onnx.load(str(out))
    onnx.checker.check_model(emitted, full_check=True)
    assert {t.data_type for t in emitted.graph.initializer} == {onnx.TensorProto.FLOAT16}
    y = run_ort(emitted, {"input": random_input((1, 3, 32, 32)).astype(np.float16)})[0]
    assert y.dtype == np.float16 and np.isfinite(y).all()
