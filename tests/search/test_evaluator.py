"""search/evaluator.py: the user's evaluator command and --min-metric bounds."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from archpass.search.evaluator import (
    Evaluator,
    EvaluatorError,
    EvaluatorFailure,
    MinMetric,
    parse_metrics,
    parse_min_metric,
    parse_min_metrics,
    shortfalls,
    unmet,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mobilenet_v2.onnx"
PY = shlex.quote(sys.executable)


def _py(code: str) -> str:
    """An --evaluator string running ``code`` with {model} as sys.argv[1]."""
    return f"{PY} -c {shlex.quote(code)} {{model}}"


def test_min_metric_parsing():
    assert parse_min_metric("map=0.4") == MinMetric("map", 0.4)
    assert parse_min_metric(" top1 = 71.5 ") == MinMetric("top1", 71.5)
    for bad, words in [("map", "no '='"), ("=0.4", "no metric name"), ("map=high", "not a number"),
                       ("map=nan", "not a finite")]:
        with pytest.raises(EvaluatorError, match=words) as err:
            parse_min_metric(bad)
        assert err.value.exit_code == 2 and "\n" not in str(err.value)
    with pytest.raises(EvaluatorError, match="more than once"):
        parse_min_metrics(["a=1", "a=2"])


def test_shortfalls_and_unmet():
    bounds = parse_min_metrics(["acc=0.9", "map=0.3"])
    assert shortfalls({"acc": 0.95, "map": 0.2}, bounds) == pytest.approx((-0.05, 0.1))
    assert shortfalls({"acc": 0.95}, bounds)[1] == math.inf
    assert unmet({"acc": 0.95, "map": 0.31}, bounds) == []
    assert unmet({"acc": 0.5}, bounds) == ["acc 0.5 < 0.9", "metric map not reported (reported: acc)"]


def test_metrics_come_from_the_last_line():
    assert parse_metrics('epoch 1 loss 3.2\n{"map": 0.41, "note": "x", "ok": true}\n\n') == {"map": 0.41}
    for bad, words in [("", "nothing"), ("done\n", "not JSON"), ("[1, 2]", "not an object"),
                       ('{"a": "b"}', "no finite numeric")]:
        with pytest.raises(ValueError, match=words):
            parse_metrics(bad)


def test_command_is_checked_up_front(tmp_path):
    with pytest.raises(EvaluatorError, match="not found on PATH") as err:
        Evaluator.parse("no-such-evaluator-cmd {model}")
    assert err.value.exit_code == 2
    with pytest.raises(EvaluatorError, match="does not exist"):
        Evaluator.parse(f"{tmp_path}/missing.sh {{model}}")
    script = tmp_path / "eval.sh"
    script.write_text("#!/bin/sh\necho '{}'\n")
    with pytest.raises(EvaluatorError, match="not executable"):
        Evaluator.parse(f"{script} {{model}}")
    with pytest.raises(EvaluatorError, match="placeholder"):
        Evaluator.parse(f"{PY} eval.py")
    with pytest.raises(EvaluatorError, match="quotes"):
        Evaluator.parse("python 'eval.py {model}")
    with pytest.raises(EvaluatorError, match="not positive"):
        Evaluator.parse(_py("print(1)"), timeout_s=0)


def test_model_path_is_substituted_without_a_shell(tmp_path):
    model = tmp_path / "my model; rm -rf x.onnx"  # a shell would split or run this
    model.write_text("")
    ev = Evaluator.parse(_py("import sys, json; print(json.dumps({'n': len(sys.argv), 'exists': "
                             "int(__import__('os').path.exists(sys.argv[1]))}))"))
    assert ev.run(model).metrics == {"n": 2.0, "exists": 1.0}


def test_failing_run_keeps_stderr_tail(tmp_path):
    code = "import sys\nfor i in range(100): print(f'line {i}', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(EvaluatorFailure) as err:
        Evaluator.parse(_py(code)).run(tmp_path / "m.onnx")
    f = err.value
    assert f.returncode == 3 and "exited with code 3" in f.reason
    assert f.stderr_tail.splitlines()[-1] == "line 99" and "line 0\n" not in f.stderr_tail
    assert json.loads(json.dumps(f.to_json()))["ok"] is False


def test_malformed_output_fails_the_run(tmp_path):
    with pytest.raises(EvaluatorFailure, match="not JSON"):
        Evaluator.parse(_py("print('accuracy: 0.9')")).run(tmp_path / "m.onnx")


def test_hanging_run_is_killed_with_its_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the evaluator starts a grandchild and waits on it: both must die at the timeout
    code = (f"import subprocess, sys, time\n"
            f"p = subprocess.Popen(['sleep', '60'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            f"print('working', file=sys.stderr, flush=True)\n"
            f"p.wait()")
    t = time.monotonic()
    with pytest.raises(EvaluatorFailure, match="timed out after 1 s") as err:
        Evaluator.parse(_py(code), timeout_s=1).run(tmp_path / "m.onnx")
    assert time.monotonic() - t < 10
    assert "working" in err.value.stderr_tail
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.mark.slow
def test_example_evaluator_measures_agreement(tmp_path):
    """examples/evaluate_agreement.py: an exact rewrite agrees on every input, a lossy one does not."""
    from archpass import api

    ev = Evaluator.parse(f"{PY} {ROOT / 'examples' / 'evaluate_agreement.py'} {{model}} --samples 16", timeout_s=120)
    exact, lossy = tmp_path / "exact.onnx", tmp_path / "lossy.onnx"
    api.apply(EXAMPLE, {"rewrites": [{"pass": "channels", "site": "group3", "channels": 56}]}, exact)
    api.apply(EXAMPLE, {"rewrites": [{"pass": "width_multiplier", "multiplier": 0.75, "parallelism": 8}]}, lossy)
    assert ev.run(EXAMPLE).metrics["agreement"] == 1.0
    assert ev.run(exact).metrics["agreement"] == 1.0
    result = ev.run(lossy)
    assert result.metrics["agreement"] < 0.5 and result.metrics["samples"] == 16
    assert unmet(result.metrics, parse_min_metrics(["agreement=0.9"]))


def test_evaluation_step_runs_only_on_promising_trials(tmp_path):
    """In a real study: the evaluator runs on trials ranking in the top k so far, stores its
    metrics, turns --min-metric into constraints; a failing run fails its trial only."""
    import optuna
    from optuna.trial import TrialState

    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker
    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.model import load_model
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe, Rewrite
    from archpass.search.evaluator import EvaluationStep

    model = load_model(dist_worker.small_model_path(tmp_path))
    s, target = analyze(model), load_target("edgetpu")
    # a real metric of the candidate ONNX: its conv count; trial 3's run fails on purpose
    code = ("import json, sys, onnx\nm = onnx.load(sys.argv[1])\n"
            "if 'trial3.' in sys.argv[1]: sys.exit('cannot evaluate ' + sys.argv[1])\n"
            "print(json.dumps({'convs': sum(n.op_type == 'Conv' for n in m.graph.node)}))")
    step = EvaluationStep(Evaluator.parse(_py(code), timeout_s=60), model, parse_min_metrics(["convs=12"]), top_k=3,
                          workdir=tmp_path)
    evaluated = []

    def objective(trial):
        fuse = [b.id for b in s.blocks if b.kind == "ibn" and trial.suggest_categorical(f"f:{b.id}", [0, 1])]
        recipe = Recipe(tuple(Rewrite("fuse_ibn", b) for b in fuse))
        value = estimate(apply_recipe_shapes(s, recipe), target, best_order=False).latency_ms
        cons = [0.0]
        if step.promising(trial.study, value):
            evaluated.append(trial.number)
            cons = list(step(trial, recipe))
        trial.set_user_attr("constraints", cons)
        return value

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=14, catch=(EvaluatorFailure,))
    trials = study.get_trials()
    assert evaluated[:3] == [0, 1, 2] and len(evaluated) < 14  # the first k always; later only contenders
    for t in trials:
        ev = t.user_attrs.get("evaluator")
        assert (ev is not None) == (t.number in evaluated)
        if t.number == 3:
            assert t.state == TrialState.FAIL and not ev["ok"] and "cannot evaluate" in ev["stderr_tail"]
        elif ev:
            convs = ev["metrics"]["convs"]
            # a stem conv and 5 IBN blocks of 3 convs (the head is a Gemm): fusing removes one per block
            assert convs == 16 - sum(t.params.values())
            assert t.user_attrs["constraints"] == [12 - convs]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 13


def test_the_evaluator_gets_the_whole_model_with_its_post_processing(tmp_path):
    """A detector's metric needs its detections: the candidate it scores has the
    post-processing loading set aside, and the source's input without a batch axis."""
    import onnx
    import optuna

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import detector_model

    from archpass.model import load_model
    from archpass.recipe import Recipe, Rewrite
    from archpass.search.evaluator import EvaluationStep

    src = tmp_path / "det.onnx"
    onnx.save(detector_model(batched=False), str(src))
    model = load_model(src)
    code = ("import json, sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)\n"
            "boxes, scores, summary = s.run(None, {'image': x})\n"
            "print(json.dumps({'detections': len(scores), 'outputs': len(s.get_outputs())}))")
    step = EvaluationStep(Evaluator.parse(_py(code), timeout_s=60), model, parse_min_metrics(["detections=1"]),
                          workdir=tmp_path)
    trial = optuna.create_study().ask()
    assert step(trial, Recipe((Rewrite("dw_to_dense", "ibn0_dw"),))) == (1.0 - trial.user_attrs["evaluator"]["metrics"]["detections"],)
    assert trial.user_attrs["evaluator"]["metrics"]["outputs"] == 3.0
    assert trial.user_attrs["evaluator"]["metrics"]["detections"] > 0
