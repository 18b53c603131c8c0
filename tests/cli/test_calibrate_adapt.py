"""`archpass calibrate --adapt` bad input, the host note in inspect, and user targets through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import onnx
import pytest
from builders import NetBuilder
from typer.testing import CliRunner

from archpass.cli.main import app
from archpass.costmodel import load_target, save_target
from archpass.costmodel.calibrate import DATASET, Dataset
from archpass.costmodel.host import fingerprint

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu6").ibn(16, expand=4).head(10).build(), path)
    return path


@pytest.mark.parametrize("args, expect", [
    (["--adapt", "nosuch", "--backend", "onnxruntime"], "unknown target 'nosuch'"),
    (["--adapt", "edgetpu", "--backend", "onnxruntime"], "measured with zigzag, not onnxruntime"),
    (["--adapt", "cpu", "--backend", "zigzag"], "measured with onnxruntime, not zigzag"),
    (["--adapt", "cpu", "--backend", "onnxruntime", "--budget-s", "0.05"], "too small to measure anything"),
    (["--adapt", "cpu", "--backend", "onnxruntime", "--models", "missing.onnx"], "--models file not found"),
    (["--adapt", "edgetpu", "--backend", "zigzag"], "needs --hardware and --mapping"),
    (["--adapt", "cpu", "--backend", "onnxruntime", "--correction", "magic"], "unknown --correction 'magic'"),
    (["--adapt", "cpu", "--backend", "onnxruntime", "--spread-s", "-1"], "--spread-s -1 is negative"),
])
def test_adapt_bad_input_is_one_line_exit_2(tmp_path, args, expect):
    r = runner.invoke(app, ["calibrate", *args, "--name", "x", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


def test_adapt_bad_base_as_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "archpass", "calibrate", "--adapt", "tpu", "--backend", "onnxruntime",
                        "--name", "x", "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "measured with zigzag" in r.stderr


def test_inspect_notes_the_estimate_is_for_another_host(tiny):
    r = runner.invoke(app, ["inspect", str(tiny), "--target", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    notes = [n for n in doc["notes"] if "not on this host" in n]
    assert len(notes) == 1 and "archpass calibrate --adapt cpu" in notes[0]
    assert notes[0] in doc["estimate"]["notes"]
    r = runner.invoke(app, ["inspect", str(tiny), "--target", "cpu"])
    assert r.exit_code == 0 and "note: the estimate is for another host: target cpu was measured on" in r.stdout and "--adapt cpu" in r.stdout
    r = runner.invoke(app, ["inspect", str(tiny), "--target", "edgetpu", "--json"])
    assert not [n for n in json.loads(r.stdout)["notes"] if "host" in n]


def test_apply_notes_the_estimate_is_for_another_host(tiny, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rewrites": []}))
    r = runner.invoke(app, ["apply", str(tiny), str(recipe), "-o", str(tmp_path / "o.onnx"), "--target", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    notes = [n for n in json.loads(r.stdout)["notes"] if "not on this host" in n]
    assert len(notes) == 1 and "archpass calibrate --adapt cpu" in notes[0]
    r = runner.invoke(app, ["apply", str(tiny), str(recipe), "-o", str(tmp_path / "o.onnx"), "--target", "cpu"])
    assert r.exit_code == 0 and r.stdout.count("not on this host") == 1


def test_optimize_notes_the_estimate_is_for_another_host(tiny, tmp_path):
    args = ["optimize", str(tiny), "-o", str(tmp_path / "o.onnx"), "--target", "cpu", "--trials", "5", "--no-guard"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    notes = [n for n in json.loads(r.stdout)["notes"] if "not on this host" in n]
    assert len(notes) == 1 and "archpass calibrate --adapt cpu" in notes[0]
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0 and r.stdout.count("note: the estimate is for another host") == 1, r.output
    r = runner.invoke(app, ["optimize", str(tiny), "-o", str(tmp_path / "e.onnx"), "--trials", "5", "--no-guard", "--json"])
    assert r.exit_code == 0 and not [n for n in json.loads(r.stdout)["notes"] if "host" in n]  # edgetpu


def test_user_target_becomes_the_default_on_this_host(tiny, tmp_path, monkeypatch):
    user = tmp_path / "user"
    monkeypatch.setenv("ARCHPASS_TARGETS", str(user))
    cpu = load_target("cpu")
    here = replace(cpu, name="cpu-here", source={**cpu.source, "host": fingerprint("CPUExecutionProvider", 1)})
    save_target(here, user / "cpu-here")
    r = runner.invoke(app, ["targets", "--json"])
    by = {t["name"]: t for t in json.loads(r.stdout)["targets"]}
    assert by["cpu-here"]["origin"] == "user" and by["cpu-here"]["this_host"] is True and by["cpu"]["this_host"] is False
    r = runner.invoke(app, ["targets", "--set-default", "cpu=cpu-here", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["defaults_here"] == {"cpu": "cpu-here"}
    assert {t["name"]: t for t in doc["targets"]}["cpu-here"]["default_here_for"] == ["cpu"]
    assert load_target("cpu").name == "cpu-here"
    r = runner.invoke(app, ["inspect", str(tiny), "--target", "cpu", "--json"])
    assert not [n for n in json.loads(r.stdout)["notes"] if "not on this host" in n]
    r = runner.invoke(app, ["targets", "--unset-default", "cpu"])
    assert r.exit_code == 0 and load_target("cpu").name == "cpu"
    r = runner.invoke(app, ["targets", "--set-default", "cpu=nope"])
    assert r.exit_code == 2 and "no user target 'nope'" in r.stderr
    (user / "broken").mkdir()
    (user / "broken" / "target.json").write_text("{oops")
    r = runner.invoke(app, ["targets", "--json"])  # a broken user target does not hide the others
    assert r.exit_code == 0 and "warning: user target broken" in r.stderr
    assert "cpu-here" in {t["name"] for t in json.loads(r.stdout)["targets"]}


def test_adapt_install_makes_the_adapted_target_the_default_here(tiny, tmp_path, monkeypatch):
    """End to end: a (small) onnxruntime adaptation of cpu, installed: 'cpu' now means it on this
    host and its estimates carry no host note."""
    import functools

    from archpass.costmodel import adapt as ad

    user = tmp_path / "user"
    monkeypatch.setenv("ARCHPASS_TARGETS", str(user))
    monkeypatch.setattr(ad, "adapt_onnxruntime", functools.partial(ad.adapt_onnxruntime, pool=3, windows=2, runs=3))
    r = runner.invoke(app, ["calibrate", "--adapt", "cpu", "--backend", "onnxruntime", "--budget-s", "4",
                            "--models", str(tiny), "--name", "cpu-here", "--install", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    m = doc["accuracy"]["measurement"]
    assert doc["target"]["adapted_from"] == "cpu" and m["networks"] >= 2 and m["models"] == ["m.onnx"]
    # the window rounds are spread by default, at most 1.25x the budget (5 s for 4 s); how
    # long a round waited depends on how long the one before took, which a loaded machine
    # stretches (tests/costmodel/test_hoststate.py times the spreading itself)
    assert m["spread_s"] == pytest.approx(5.0)
    assert (user / "cpu-here" / "target.json").is_file() and (user / "cpu-here" / "prior" / "target.json").is_file()
    rounds = max(len(r["window_plain_ms"]) for r in Dataset(user / "cpu-here" / DATASET).records.values())
    assert 0 <= m["spread_waited_s"] <= 5.0 * (rounds - 1) + 0.1
    t = load_target("cpu")
    assert t.name == "cpu-here" and t.origin == "user"
    r = runner.invoke(app, ["inspect", str(tiny), "--target", "cpu", "--json"])
    assert r.exit_code == 0 and not [n for n in json.loads(r.stdout)["notes"] if "not on this host" in n]


def test_adapt_notes_a_measurement_taken_on_a_busy_host(tiny, tmp_path, monkeypatch, capsys):
    """Measurements kept while other processes kept a core busy: the adapted target says so,
    in the JSON's notes and in the human output."""
    import functools

    from archpass.cli.calibrate import _report
    from archpass.costmodel import adapt as ad

    real = ad.measure_networks

    def busy(*args, **kwargs):
        got = real(*args, **kwargs)
        got["seen"]["kept_busy"] = len(got["seen"]["other_cores"])  # as if every measurement had been kept busy
        return got

    monkeypatch.setattr(ad, "measure_networks", busy)
    monkeypatch.setattr(ad, "adapt_onnxruntime", functools.partial(ad.adapt_onnxruntime, pool=3, windows=2, runs=3))
    out = tmp_path / "busy"
    r = runner.invoke(app, ["calibrate", "--adapt", "cpu", "--backend", "onnxruntime", "--budget-s", "4",
                            "--spread-s", "0", "--name", "cpu-busy", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert len(notes) == 1 and "kept while other processes kept a needed core busy" in notes[0]
    t = load_target(out)
    assert t.accuracy["measurement"]["notes"] == notes  # recorded in the target
    capsys.readouterr()
    _report(t, out, False)
    printed = capsys.readouterr()
    assert f"note: {notes[0]}" in " ".join(printed.out.split())
    # the table's whole-network row counts the timed networks (it printed "None" before)
    assert "None" not in printed.out
    assert re.search(rf"whole networks\W+{t.accuracy['network_fit']['networks']}\b", printed.out)
    # a tie on the held-out networks is said, with what broke it
    tied = replace(t, accuracy={**t.accuracy, "method": "residual_trees",
                                "selection": {"tied_methods": ["class_scale", "residual_trees"]}})
    _report(tied, out, False)
    err = " ".join(capsys.readouterr().err.split())
    assert "could not tell class_scale, residual_trees apart; residual_trees had the lowest held-out kernel error" in err
    # networks timed only in the host's slow state (multi-threaded): what the fit did with them
    slow = replace(t, accuracy={**t.accuracy, "slow_state_scaling": {
        "r1": {"slow_over_fast": 1.2325, "networks_in_both_states": 4, "networks_scaled": 24}}})
    _report(slow, out, False)
    err = " ".join(capsys.readouterr().err.split())
    assert ("24 networks had no window in the host's fast state: their latency divided by 1.23, how much slower the "
            "slow state ran the 4 networks timed in both") in err


def test_adapt_add_pools_a_second_round(tiny, tmp_path, monkeypatch):
    """--add measures another round into the same directory (other networks: the next seed)
    and fits on both rounds' networks; a directory adapted otherwise, or none, is refused."""
    import functools

    from archpass.costmodel import adapt as ad

    monkeypatch.setattr(ad, "adapt_onnxruntime", functools.partial(ad.adapt_onnxruntime, pool=3, windows=2, runs=3))
    out = tmp_path / "here"
    common = ["calibrate", "--adapt", "cpu", "--backend", "onnxruntime", "--budget-s", "3", "--spread-s", "0",
              "--name", "cpu-here", "-o", str(out)]
    r = runner.invoke(app, [*common, "--json"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)["accuracy"]["measurement"]
    assert len(first["rounds"]) == 1 and first["rounds"][0]["keys"] and first["rounds"][0]["seed"] == 0
    r = runner.invoke(app, [*common, "--add", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["accuracy"]["measurement"]
    assert [x["seed"] for x in m["rounds"]] == [0, 1]
    assert m["rounds"][0]["keys"] == first["rounds"][0]["keys"]  # the first round is kept as it was
    second = m["rounds"][1]["keys"]
    assert second and all(k.startswith("r2/") for k in second)
    t = load_target(out)
    assert t.accuracy["network_fit"]["networks"] == len(first["rounds"][0]["keys"]) + len(second)
    records = Dataset(out / DATASET).records
    assert set(first["rounds"][0]["keys"]) | set(second) <= set(records)
    # another thread count, no target, or --add without --adapt: one line, exit 2
    r = runner.invoke(app, [*common, "--add", "--threads", "2"])
    assert r.exit_code == 2 and "was adapted otherwise (threads 1, not 2)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, [*common[:-1], str(tmp_path / "none"), "--add"])
    assert r.exit_code == 2 and "holds no adapted target" in r.stderr
    r = runner.invoke(app, ["calibrate", "--backend", "onnxruntime", "--name", "x", "-o", str(tmp_path / "x"), "--add"])
    assert r.exit_code == 2 and "--add needs --adapt" in r.stderr
