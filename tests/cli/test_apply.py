"""`archpass apply` and `archpass passes` through CliRunner, and `apply` once as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import onnx
import pytest
from typer.testing import CliRunner

from archpass.cli.main import app
from builders import NetBuilder, messy_model

runner = CliRunner()


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "net.onnx"
    b = NetBuilder((1, 3, 32, 32), seed=9).conv(16, 3, stride=2).ibn(16, expand=4).ibn(24, expand=4, stride=2)
    onnx.save(b.head(5).build(), str(p))
    return p


def _recipe(tmp_path, doc, name="recipe.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc) if name.endswith(".json") else doc)
    return p


def test_apply_json_and_inspect_shows_the_record(model, tmp_path):
    src_sha = _sha(model)
    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"},
                                             {"pass": "resolution", "height": 48, "width": 48}]})
    out = tmp_path / "sub" / "out.onnx"
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["output"] == str(out) and [x["pass"] for x in doc["rewrites"]] == ["fuse_ibn", "resolution"]
    assert doc["after"]["macs"] != doc["before"]["macs"] and doc["exact"] is False
    assert _sha(model) == src_sha and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["out.onnx"]  # no temp file left behind
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    ins = json.loads(r.stdout)
    assert [(x["pass"], x["site"]) for x in ins["rewrites"]] == [("fuse_ibn", "block1"), ("resolution", None)]
    assert ins["record"]["source_sha256"] == src_sha
    assert any("fuse_ibn:block1" in (l.get("provenance") or "") for l in ins["layers"])
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "Applied rewrites" in r.stdout and "fuse_ibn" in r.stdout


def test_apply_table_and_yaml_recipe(model, tmp_path):
    recipe = _recipe(tmp_path, "rewrites:\n  - pass: dw_to_dense\n    site: ibn0_dw\n", "recipe.yaml")
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "dw_to_dense" in r.stdout and "exact" in r.stdout and out.exists()


@pytest.mark.parametrize("doc,msg", [
    ({"rewrites": [{"pass": "nope"}]}, "unknown pass 'nope'"),
    ({"rewrites": [{"pass": "fuse_ibn", "site": "block77"}]}, "unknown site 'block77'"),
    ({"rewrites": [{"pass": "channels", "site": "group3", "channels": -4}]}, "channels"),
    ({"rewrites": [{"pass": "fuse_ibn", "site": "block1"}, {"pass": "fuse_ibn", "site": "block1"}]}, "conflicts"),
    ({"rules": []}, "no \"rewrites\" list"),
])
def test_bad_recipe_exits_2_and_writes_nothing(model, tmp_path, doc, msg):
    recipe = _recipe(tmp_path, doc)
    out = tmp_path / "out.onnx"
    sha = _sha(model)
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out)])
    assert r.exit_code == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    assert not out.exists() and _sha(model) == sha


def test_missing_recipe_and_output_equal_to_input(model, tmp_path):
    r = runner.invoke(app, ["apply", str(model), str(tmp_path / "none.json"), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "recipe file not found" in r.stderr
    recipe = _recipe(tmp_path, {"rewrites": []})
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(model)])
    assert r.exit_code == 2 and "is the input model" in r.stderr


def test_apply_with_input_shape(tmp_path):
    p = tmp_path / "messy.onnx"
    onnx.save(messy_model(), str(p))
    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "resolution", "height": 48, "width": 48}]})
    out = tmp_path / "o.onnx"
    r = runner.invoke(app, ["apply", str(p), str(recipe), "-o", str(out), "--input-shape", "input:1,3,64,64", "--json"])
    assert r.exit_code == 0, r.output
    shape = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["N", 3, 48, 48]  # the batch the user pinned only for the analysis stays dynamic
    assert any("dynamic" in n for n in json.loads(r.stdout)["notes"])


def test_passes_command():
    r = runner.invoke(app, ["passes", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["passes"]
    names = [p["name"] for p in doc]
    assert names[:1] == ["fuse_ibn"] and {"dw_to_dense", "resolution", "channels", "width_multiplier"} <= set(names)
    by = {p["name"]: p for p in doc}
    assert by["dw_to_dense"]["exactness"] == "exact" and by["fuse_ibn"]["site_kind"] == "block"
    kinds = {"fuse_ibn": "block", "dw_to_dense": "layer", "channels": "group", "width_multiplier": "stage",
             "resolution": "model"}
    assert {n: by[n]["site_kind"] for n in kinds} == kinds
    assert all(p["summary"] and p["exactness"] for p in doc)
    r = runner.invoke(app, ["passes"])
    assert r.exit_code == 0 and "dw_to_dense" in r.stdout


def test_apply_subprocess(model, tmp_path):
    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]})
    out = tmp_path / "out.onnx"
    p = subprocess.run([sys.executable, "-m", "archpass", "apply", str(model), str(recipe), "-o", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rewrites"][0]["site"] == "block1"
    bad = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "group1"}]}, "bad.json")
    p = subprocess.run([sys.executable, "-m", "archpass", "apply", str(model), str(bad), "-o", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: rewrite #0 (fuse_ibn): unknown site 'group1'")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------- outputs (issue 11)
def _one_line_exit_2(r, needle):
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.output


def test_output_that_is_a_directory_or_a_fifo_or_unwritable(model, tmp_path, monkeypatch):
    import os
    import stat

    import archpass.io as aio

    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]})
    (tmp_path / "outdir").mkdir()
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(tmp_path / "outdir")]),
                     "is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(fifo)]), "is a FIFO")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(aio.os, "access", lambda p, m: False if os.fspath(p) == str(ro) else real(p, m))
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(ro / "o.onnx")]), "no permission")
    assert list(ro.iterdir()) == []


def test_null_device_validates_without_writing(model, tmp_path, monkeypatch):
    import os
    import stat

    import archpass.io as aio

    null = tmp_path / "null"  # stands in for /dev/null, which this test must never risk replacing
    os.mkfifo(null)
    monkeypatch.setattr(aio, "NULL_DEVICE", str(null))
    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]})
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(null)])
    assert r.exit_code == 0, r.output
    assert "validated; nothing written" in r.stdout and stat.S_ISFIFO(os.stat(null).st_mode)
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(null), "--json"])
    assert json.loads(r.stdout)["written"] is False
    bad = _recipe(tmp_path, {"rewrites": [{"pass": "fuse_ibn", "site": "block9"}]}, "bad.json")
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(bad), "-o", str(null)]), "unknown site")


def test_absurd_channels_one_line_and_allow_growth(model, tmp_path, monkeypatch):
    import archpass.limits as lim

    big = _recipe(tmp_path, {"rewrites": [{"pass": "channels", "site": "group1", "channels": 1_000_000_000}]})
    out = tmp_path / "o.onnx"
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(big), "-o", str(out)]), "channels must be at most")
    # within each pass's bounds a recipe can still grow the model out of proportion (a lower limit shows it)
    monkeypatch.setattr(lim, "GROWTH_LIMIT", 1.2)
    grow = _recipe(tmp_path, {"rewrites": [{"pass": "channels", "site": "group1", "channels": 64}]}, "grow.json")
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(grow), "-o", str(out)]), "above the 1.2x limit")
    assert not out.exists()
    r = runner.invoke(app, ["apply", str(model), str(grow), "-o", str(out), "--allow-growth", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["after"]["params"] > 1.2 * json.loads(r.stdout)["before"]["params"] and out.exists()


def test_apply_with_target_prints_before_and_after(model, tmp_path):
    recipe = _recipe(tmp_path, {"rewrites": [{"pass": "channels", "site": "group1", "channels": 64}]})
    out = tmp_path / "o.onnx"
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out), "--target", "edgetpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    est = doc["estimate"]
    assert doc["target"] == "edgetpu" and est["after"]["latency_ms"] > est["before"]["latency_ms"] > 0
    assert est["after"]["params_bytes"] > est["before"]["params_bytes"]
    r = runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out), "--target", "edgetpu"])
    assert r.exit_code == 0 and "on edgetpu: latency" in r.stdout and "peak activations" in r.stdout
    _one_line_exit_2(runner.invoke(app, ["apply", str(model), str(recipe), "-o", str(out), "--target", "nope"]),
                     "unknown target 'nope'")
