"""The run through the Python facade: never slower, budgets, the guard's choice, Pareto fronts."""

import json

import onnx
import pytest

from archpass import api
from archpass.analysis import analyze
from archpass.costmodel import estimate, load_target
from archpass.model import load_model
from archpass.search.run import BudgetError, Job, choose, prepare
from archpass.search.study import TrialRecord
from archpass.recipe import Recipe
from builders import random_input, run_ort
from search_helpers import FakeGuard


def _run(small_model, tmp_path, **kw):
    kw.setdefault("trials", 25)
    kw.setdefault("guard", False)
    return api.optimize(small_model, tmp_path / "out.onnx", "edgetpu", **kw)


def test_optimize_writes_a_faster_valid_model_and_its_recipe(small_model, tmp_path):
    before = small_model.read_bytes()
    doc = _run(small_model, tmp_path)
    assert small_model.read_bytes() == before
    out = tmp_path / "out.onnx"
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    run_ort(proto, {"input": random_input((1, 3, 32, 32))})
    assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
    # the reported figures are the estimate of the written model
    e = estimate(analyze(load_model(out)), load_target("edgetpu"), best_order=False)
    assert e.latency_ms == pytest.approx(doc["optimized"]["latency_ms"], rel=1e-9)
    assert json.loads((tmp_path / "out.recipe.json").read_text()) == doc["recipe"]
    assert set(doc) >= {"baseline", "optimized", "recipe", "trials", "output", "storage"}
    assert doc["trials"] == 25 and (tmp_path / "out.study.jsonl").is_file()
    for k in ("latency_ms", "params_bytes", "peak_activation_bytes", "macs"):
        assert k in doc["baseline"] and k in doc["optimized"]


def test_same_seed_same_result(small_model, tmp_path):
    a = _run(small_model, tmp_path / "a", trials=15, seed=3)
    b = _run(small_model, tmp_path / "b", trials=15, seed=3)
    assert a["recipe"] == b["recipe"]


def test_never_slower_emits_the_original_when_nothing_passes(small_model, tmp_path):
    fake = FakeGuard(threshold=2.0)  # no recipe can reach it
    doc = _run(small_model, tmp_path, guard=True, guard_factory=fake.factory)
    assert doc["recipe"] == {"rewrites": []} and not doc["improved"]
    assert doc["optimized"]["latency_ms"] == doc["baseline"]["latency_ms"]
    assert "passed the fidelity guard" in doc["message"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_choose_keeps_the_original_when_no_trial_beats_it(small_model):
    job = Job(model=str(small_model), target="edgetpu", guard=False)
    prep = prepare(job)
    base = prep.objective.baseline
    worse = {k: v * 2 for k, v in base.metrics.items()}
    rec = TrialRecord(1, (worse["latency_ms"],), Recipe(), worse, (0.0,), None)
    out = choose(prep, [rec], storage=small_model)
    assert out.best is base and out.best_trial is None and "no candidate beat" in out.message


def test_the_guard_picks_the_best_candidate_that_passes_and_caches(small_model, tmp_path):
    fake = FakeGuard(threshold=0.9)  # at most ten rewrites
    doc = _run(small_model, tmp_path, trials=40, guard=True, guard_factory=fake.factory, finalists=8)
    assert doc["improved"] and len(doc["recipe"]["rewrites"]) <= 10
    assert doc["fidelity"]["ok"] and doc["fidelity"]["score"] >= 0.9
    keys = [json.dumps(r.to_json(), sort_keys=True) for r in fake.calls]
    assert len(keys) == len(set(keys)), "a recipe was evaluated twice"
    assert 1 <= len(doc["finalists"]) <= 8 and doc["fidelity"]["evaluations"] == len(doc["finalists"])
    # every finalist checked could beat the one chosen
    chosen = doc["optimized"]["latency_ms"]
    assert all(f["values"][0] <= chosen for f in doc["finalists"])


def test_finalists_binary_search_then_refine():
    """Candidates sorted best first; the guard passes from index 6 on: found in a few evaluations."""
    from archpass.search.guard import Guard
    from archpass.search.run import finalists
    from archpass.recipe import Rewrite

    cands = [TrialRecord(i, (float(i),), Recipe((Rewrite("channels", f"group{i}", {"channels": 8}),)), {}, (0.0,), None)
             for i in range(40)]
    calls = []
    guard = Guard("proxy", 0.0, lambda r: calls.append(r) or (1.0 if int(r.rewrites[0].site[5:]) >= 6 else -1.0))
    chosen, checked = finalists(guard, cands, budget=12)
    assert chosen.number == 6 and len(calls) <= 12
    assert all(c["values"][0] <= 6 or c["ok"] for c in checked)
    chosen, checked = finalists(guard, cands, budget=3)  # cached: no new evaluation for those seen
    assert chosen is not None and chosen.number >= 6


def test_an_impossible_budget_names_the_best_reachable_value(small_model, tmp_path):
    with pytest.raises(BudgetError, match=r"--max-latency-ms 1e-06 \(best reachable [0-9.e-]+ ms\)"):
        _run(small_model, tmp_path, trials=10, max_latency_ms=1e-6)
    assert not (tmp_path / "out.onnx").exists()


def test_a_budget_is_met(small_model, tmp_path):
    full = _run(small_model, tmp_path / "a", trials=10)
    budget = full["baseline"]["params_bytes"] / 1e6 * 0.6
    doc = _run(small_model, tmp_path / "b", trials=30, max_params_mb=budget)
    assert doc["optimized"]["params_bytes"] / 1e6 <= budget


def test_several_objectives_give_a_pareto_front(small_model, tmp_path):
    doc = _run(small_model, tmp_path, trials=30, objective="latency,memory")
    front = doc["pareto_front"]
    assert front and doc["optimized"]["latency_ms"] <= doc["baseline"]["latency_ms"]
    vals = [tuple(f["values"]) for f in front]
    for a in vals:
        assert not any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in vals)
