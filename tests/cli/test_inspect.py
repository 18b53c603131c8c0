"""`archpass inspect` through typer's CliRunner, and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from archpass.cli.main import app
from builders import NetBuilder, messy_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mobilenet_v2.onnx"
runner = CliRunner()


@pytest.fixture
def messy(tmp_path):
    p = tmp_path / "messy.onnx"
    onnx.save(messy_model(), str(p))
    return p


def test_table_output(messy):
    r = runner.invoke(app, ["inspect", str(messy), "--input-shape", "input:1,3,64,64"])
    assert r.exit_code == 0, r.output
    for word in ("Blocks", "Layers", "Channel groups", "ibn", "totals:"):
        assert word in r.stdout


def test_json_document(messy):
    r = runner.invoke(app, ["inspect", str(messy), "--input-shape", "input:1,3,64,64", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("inputs", "layers", "blocks", "channel_groups", "totals", "rewrites"):
        assert key in doc
    assert doc["inputs"] == [{"name": "input", "shape": [1, 3, 64, 64]}]
    for key in ("id", "op", "cin", "cout", "kernel", "stride", "groups", "in_hw", "out_hw", "macs", "params"):
        assert key in doc["layers"][0]
    for key in ("id", "kind", "layers", "residual", "stage"):
        assert key in doc["blocks"][0]
    for key in ("id", "channels", "adjustable", "members"):
        assert key in doc["channel_groups"][0]
    assert doc["totals"]["macs"] == sum(l["macs"] for l in doc["layers"])
    # where each pass applies, with typed domains a sampler reads
    by = {}
    for site in doc["sites"]:
        by.setdefault(site["pass"], []).append(site)
    adjustable = {g["id"]: g["channels"] for g in doc["channel_groups"] if g["adjustable"]}
    assert {x["site"] for x in by["channels"]} == set(adjustable)
    for x in by["channels"]:
        assert x["kind"] == "group" and x["domains"]["channels"]["current"] == adjustable[x["site"]]
    assert by["width_multiplier"][0]["site"] is None and by["width_multiplier"][0]["kind"] == "stage"
    assert by["width_multiplier"][0]["domains"]["multiplier"]["type"] == "float"
    assert by["resolution"][0]["domains"]["height"]["current"] == 64


@pytest.mark.parametrize("args,needle", [
    (["missing.onnx"], "model file not found"),
    (["{messy}"], "dynamic input dimensions"),
    (["{messy}", "--input-shape", "image:1,3,64,64"], "unknown input 'image'"),
    (["{messy}", "--input-shape", "input=1,3,64,64"], "malformed --input-shape"),
])
def test_bad_input_one_line_exit_2(messy, tmp_path, args, needle):
    args = [a.replace("{messy}", str(messy)) if a != "missing.onnx" else str(tmp_path / a) for a in args]
    r = runner.invoke(app, ["inspect", *args])
    assert r.exit_code == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in r.output


def test_debug_shows_traceback(tmp_path):
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing.onnx"), "--debug"])
    assert r.exit_code == 2 and "Traceback" in r.stderr


def test_model_with_unsupported_ops_still_inspects(tmp_path):
    b = NetBuilder((1, 3, 8, 8)).conv(8, 3, name="c")
    b.x = b.node("LpNormalization", [b.x], "norm", axis=1)
    p = tmp_path / "u.onnx"
    onnx.save(b.conv(4, 1).build(), str(p))
    r = runner.invoke(app, ["inspect", str(p), "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["unsupported_ops"] == ["LpNormalization"]
    assert any(not g["adjustable"] and "LpNormalization" in (g["reason"] or "") for g in doc["channel_groups"])


def test_a_video_network_shows_its_whole_macs_and_what_the_latency_leaves_out(tmp_path):
    from builders import video_net

    p = tmp_path / "video.onnx"
    onnx.save(video_net(), str(p))
    r = runner.invoke(app, ["inspect", str(p), "--target", "edgetpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    t = doc["totals"]
    assert t["other_macs"] == 8 * 4 * 8 * 8 * 81 and t["macs"] == t["other_macs"] + 16 * 8 * 8 * 32 * 9
    assert doc["estimate"]["macs"] == t["macs"]
    assert any("3-D Conv x1" in n for n in doc["notes"])
    r = runner.invoke(app, ["inspect", str(p), "--target", "edgetpu"], terminal_width=200)
    assert r.exit_code == 0 and "are in nodes that are not layers (3-D Conv x1)" in r.output
    assert f"{t['macs'] / 1e6:.1f} M MACs" in r.output  # under a billion in millions


def test_macs_read_in_billions_from_a_billion_on():
    from archpass.structure import macs_text

    assert macs_text(300.8e6) == "300.8 M" and macs_text(40_696_553_472) == "40.70 G"


def test_subprocess_console_script_and_module():
    out = subprocess.run([sys.executable, "-m", "archpass", "inspect", str(EXAMPLE), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [b["kind"] for b in doc["blocks"]].count("ibn") == 16
    bad = subprocess.run([sys.executable, "-m", "archpass", "inspect", "does-not-exist.onnx"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stdout == ""


# ---------------------------------------------------------------------------- 80 columns (issue 11)
def _ids(doc) -> list[str]:
    return ([l["id"] for l in doc["layers"]] + [g["id"] for g in doc["channel_groups"]]
            + [b["id"] for b in doc["blocks"]])


@pytest.mark.parametrize("wide", [False, True])
def test_ids_are_whole_at_80_columns(tmp_path, monkeypatch, wide):
    from archpass.cli import common

    monkeypatch.setattr(common.stdout, "width", 80)
    doc = json.loads(runner.invoke(app, ["inspect", str(EXAMPLE), "--json"]).stdout)
    # a recipe whose site is the longest layer id, so the Applied rewrites table holds it
    dw = max((l for l in doc["layers"] if l["groups"] > 1), key=lambda l: len(l["id"]))["id"]
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rewrites": [{"pass": "dw_to_dense", "site": dw}]}))
    out = tmp_path / "o.onnx"
    r = runner.invoke(app, ["apply", str(EXAMPLE), str(recipe), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert dw in r.stdout and "…" not in r.stdout
    r = runner.invoke(app, ["inspect", str(out), "--target", "edgetpu"] + (["--wide"] if wide else []))
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    for i in _ids(doc):
        assert i in r.stdout, i
    assert f" {dw} " in r.stdout.split("Applied rewrites")[1]  # the site, whole, in the rewrites table
    if not wide:  # the compact view fits 80 columns for these ids
        assert max(len(line) for line in r.stdout.split("Layers")[1].split("Channel groups")[0].splitlines()) <= 80
    else:
        assert "MMACs" in r.stdout and "relu6" in r.stdout


def test_ids_are_whole_in_a_real_80_column_terminal_width():
    p = subprocess.run([sys.executable, "-m", "archpass", "inspect", str(EXAMPLE)], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    doc = json.loads(runner.invoke(app, ["inspect", str(EXAMPLE), "--json"]).stdout)
    assert all(i in p.stdout for i in _ids(doc)) and "…" not in p.stdout


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.onnx"
    b = NetBuilder((1, 16, 28, 28))
    b.conv(16, 3)
    b.conv(32, 1)
    onnx.save(b.build(), str(p))
    return p


def test_measure_times_the_model_as_the_target_runs_it(small):
    r = runner.invoke(app, ["inspect", str(small), "--target", "cpu", "--measure", "--windows", "2", "--json"])
    assert r.exit_code == 0, r.output
    e = json.loads(r.stdout)["estimate"]
    m = e["measured"]
    assert m["ms"] > 0 and len(m["windows_ms"]) == 2 and (m["threads"], m["graph_optimization"]) == (1, "all")
    assert m["error_pct"] == pytest.approx((e["latency_ms"] / m["ms"] - 1) * 100, abs=0.01)
    r = runner.invoke(app, ["inspect", str(small), "--target", "cpu", "--measure", "--windows", "1"])
    assert r.exit_code == 0, r.output
    assert "measured on this host:" in r.stdout and "the faster half of 1 window, 1 thread," in r.stdout
    assert "measure: window 1/1" in r.stderr


def test_a_prediction_far_from_the_measurement_gets_a_note(small, monkeypatch):
    import archpass.costmodel.measure as measure

    seen = {"ms": 1000.0, "windows_ms": [1000.0], "statistic": "mean of the faster half of the windows", "slow_state_windows": 0,
            "retaken": 0, "waited_s": 0.0, "other_cores_max": 0.0, "provider": "CPUExecutionProvider", "threads": 1,
            "graph_optimization": "all"}
    monkeypatch.setattr(measure, "measure_latency", lambda proto, target, **kw: seen)
    r = runner.invoke(app, ["inspect", str(small), "--target", "cpu", "--measure", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    note = [n for n in doc["notes"] if "off the 1000.000 ms it took on this host" in n]
    assert len(note) == 1 and "-100% off" in note[0] and note[0].endswith("--name cpu-here --install")
    assert doc["estimate"]["measured"]["error_pct"] < -99


def test_a_measurement_never_in_parallel_gets_a_note(small, monkeypatch):
    import archpass.costmodel.measure as measure

    seen = {"ms": 1.0, "windows_ms": [1.0], "statistic": "mean of the faster half of the fast-state windows", "slow_state_windows": 0,
            "retaken": 0, "waited_s": 30.0, "other_cores_max": 0.0, "provider": "CPUExecutionProvider", "threads": 2,
            "graph_optimization": "all", "parallel_state_seen": False}
    monkeypatch.setattr(measure, "measure_latency", lambda proto, target, **kw: seen)
    r = runner.invoke(app, ["inspect", str(small), "--target", "cpu", "--measure"])
    assert r.exit_code == 0, r.output
    assert "note: the host never ran 2 threads in parallel during the measurement: 1.000 ms is a slow state's" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--measure"], "no --target was given"),
    (["--target", "edgetpu", "--measure"], "edgetpu is measured with zigzag"),
    (["--target", "cpu", "--measure", "--windows", "0"], "--windows 0 is not positive"),
])
def test_measure_bad_input_one_line_exit_2(small, args, needle):
    r = runner.invoke(app, ["inspect", str(small), *args])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
