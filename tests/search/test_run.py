"""The run through the Python facade: never slower, budgets, the guard's choice, Pareto fronts."""

import json

import numpy as np
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


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test: a suite started as a background job
    without job control inherits SIGINT ignored, and Python then installs none (archpass
    then leaves SIGINT alone, as for an embedding program that handles it)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


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


# ---------------------------------------------------------------------------- issue 10: evaluator, seeds, reports, shared storage
def _evaluator(*args: str) -> str:
    import shlex
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("eval_cmd.py")
    return " ".join([shlex.quote(sys.executable), shlex.quote(str(script)), "{model}", *args])


def test_failing_hanging_and_malformed_evaluator_runs_fail_their_trial_only(small_model, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from archpass.search import study as st

    doc = _run(small_model, tmp_path, trials=8, evaluator=_evaluator("--fail-on=1", "--hang-on=2", "--garbage-on=3"),
               evaluator_timeout=2, evaluate_top=100, report=tmp_path / "report")
    study = st.load_study(tmp_path / "out.study.jsonl", sampler=None)
    trials = {t.number: t for t in study.get_trials()}
    assert {n for n, t in trials.items() if t.state == TrialState.FAIL} == {1, 2, 3}
    reasons = {n: trials[n].user_attrs["evaluator"]["reason"] for n in (1, 2, 3)}
    assert "exited with code 3" in reasons[1] and "timed out after 2 s" in reasons[2] and "not JSON" in reasons[3]
    # the study went on: 8 finished trials, the 3 failed evaluations among them
    assert st.n_finished(study) == 8 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 5
    ev = doc["evaluator"]
    assert ev["evaluated"] == 8 and [f["number"] for f in ev["failed"]] == [1, 2, 3]
    assert "out of memory" in ev["failed"][0]["stderr_tail"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "RuntimeError: out of memory while evaluating trial 1" in md and "waiting for a GPU" in md
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in trials.values()}


def test_min_metric_keeps_only_candidates_that_meet_it(small_model, tmp_path):
    """convs >= N: fusing an IBN block removes a conv, so at most (convs - N) blocks may be fused."""
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(small_model)).graph.node)
    doc = _run(small_model, tmp_path, trials=20, passes=["fuse_ibn"], evaluator=_evaluator(),
               min_metrics=[f"convs={convs - 2}"], evaluate_top=3)
    fused = [r for r in doc["recipe"]["rewrites"] if r["pass"] == "fuse_ibn"]
    assert 0 < len(fused) <= 2 and doc["evaluator"]["metrics"]["convs"] == convs - len(fused)
    assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
    assert doc["evaluator"]["evaluated"] < 20  # the first few, then only candidates that could rank


def test_seed_recipes_are_the_first_trials(small_model, tmp_path):
    from archpass.search import study as st
    from archpass.search.objective import SEED_RECIPE_ATTR

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"rewrites": [{"pass": "fuse_ibn", "site": "block2"},
                                             {"pass": "fuse_ibn", "site": "block9"}]}))
    bad.write_text(json.dumps({"rewrites": [{"pass": "fuse_ibn", "site": "block42"}]}))
    doc = _run(small_model, tmp_path, trials=6, seed_recipes=[good, bad], report=tmp_path / "report")
    s1, s2 = doc["seeds"]
    assert (s1["resolved"], s1["unresolved"], s2["resolved"], s2["unresolved"]) == (1, 1, 0, 1)
    assert s1["recipe"] == {"rewrites": [{"pass": "fuse_ibn", "site": "block2"}]}
    assert "not a block" in s1["entries"][1]["note"] and "block42" in s2["entries"][0]["note"]
    study = st.load_study(tmp_path / "out.study.jsonl", sampler=None)
    t = study.trials[1]  # after the unchanged model; the unresolved recipe enqueues nothing
    assert t.user_attrs[SEED_RECIPE_ATTR] == s1["recipe"] and t.user_attrs["recipe"] == s1["recipe"]
    assert not any(SEED_RECIPE_ATTR in x.user_attrs for x in study.trials[2:])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(e["file"], e["index"], e["ok"]) for e in report["seed"]] == [(0, 0, True), (0, 1, False), (1, 0, False)]


def test_no_descent_when_the_seeds_fill_the_trials(small_model, tmp_path, monkeypatch):
    """--trials 2 with one seed recipe: the unchanged model and the seed are the two trials,
    so the warm start's descent (hundreds of scores) is not run, and nothing is left WAITING."""
    from optuna.trial import TrialState

    from archpass.search import study as st
    from archpass.search import warmstart

    calls = []
    real = warmstart.warm_start
    monkeypatch.setattr(warmstart, "warm_start", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"rewrites": [{"pass": "fuse_ibn", "site": "block2"}]}))
    _run(small_model, tmp_path, trials=2, seed_recipes=[seed])
    assert calls == []
    states = [t.state for t in st.load_study(tmp_path / "out.study.jsonl", sampler=None).trials]
    assert states == [TrialState.COMPLETE] * 2
    _run(small_model, tmp_path / "more", trials=3, seed_recipes=[seed])
    assert calls == [1]  # one trial left for the descent's points: it runs


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_ctrl_c_lost_in_a_finalizer_still_stops_the_search(small_model, tmp_path, python_sigint):
    """Python prints and drops a KeyboardInterrupt raised inside a ``__del__`` (LightGBM
    frees a predictor after every prediction): the search still stops after that trial."""
    import os
    import signal

    class Dies:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10000):  # the handler runs here, inside the finalizer
                pass

    def progress(study, trial):
        if trial.number == 3:
            Dies()

    doc = _run(small_model, tmp_path, trials=60, progress=progress)
    assert doc["interrupted"] and doc["trials"] <= 5


def test_report_of_the_run_is_the_report_of_its_storage(small_model, tmp_path):
    doc = _run(small_model, tmp_path, trials=15, guard=True, finalists=3, report=tmp_path / "run")
    again = api.report(doc["storage"], tmp_path / "later")
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "later" / name).read_bytes(), name
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["best_trial"] == again["best_trial"] and report["score_kind"] == "proxy"
    assert report["baseline_score"] == doc["proxy"]["baseline"]
    assert set(doc["report"]) == {"report.json", "report.md", "trials.png", "blocks.png", "history.png", "report.html"}


def test_an_explicit_storage_is_created_or_joined(small_model, tmp_path):
    """--storage FILE --study-name N: a second run of the same command joins the study (the
    unchanged model is enqueued once); another command is refused; --resume needs the study."""
    from optuna.trial import TrialState

    from archpass.search.storage import load_existing_study
    from archpass.search.study import StudyError

    store = tmp_path / "shared.db"
    a = _run(small_model, tmp_path / "a", trials=8, storage=store, study_name="team")
    b = _run(small_model, tmp_path / "b", trials=14, storage=store, study_name="team")
    study = load_existing_study(store, "team")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert a["trials"] == 8 and b["trials"] == len(done) == 14 and b["study_name"] == "team"
    assert sum(not t.user_attrs["recipe"]["rewrites"] for t in done[:8]) >= 1
    assert [t.params for t in done].count(done[0].params) == 1  # the unchanged model's trial, once
    assert not (tmp_path / "a" / "out.study.jsonl").exists()
    with pytest.raises(StudyError, match="differs in objectives"):
        _run(small_model, tmp_path / "c", trials=3, storage=store, study_name="team", objective="memory")
    with pytest.raises(StudyError, match="nothing to resume: no study 'other'"):
        _run(small_model, tmp_path / "c", trials=3, storage=store, study_name="other", resume=True)


def test_local_workers_on_an_explicit_journal_storage(small_model, tmp_path):
    from optuna.trial import TrialState

    from archpass.search.storage import load_existing_study

    doc = _run(small_model, tmp_path, trials=60, workers=2, storage=tmp_path / "team.jsonl", study_name="j")
    done = load_existing_study(tmp_path / "team.jsonl", "j").get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 60 and doc["trials"] == len(done)
    assert len({t.user_attrs["worker"] for t in done}) == 2  # host:pid of each process


def test_ctrl_c_while_optuna_stores_a_result_is_an_interruption(small_model, tmp_path, monkeypatch):
    """Optuna 5.0 turns a KeyboardInterrupt inside its tell (here: the sampler's after_trial, where
    a real Ctrl-C landed once in the suite) into an UnboundLocalError; the run still stops cleanly
    and writes the best model so far."""
    import optuna

    from archpass.search import run

    class Interrupting(optuna.samplers.RandomSampler):
        def after_trial(self, study, trial, state, values):
            if trial.number == 5:
                raise KeyboardInterrupt

    monkeypatch.setattr(run, "_sampler", lambda job, worker=0: Interrupting(seed=0))
    doc = _run(small_model, tmp_path, trials=50)
    assert doc["interrupted"] and 5 <= doc["trials"] < 50 and (tmp_path / "out.onnx").is_file()


def test_ctrl_c_inside_the_journal_lock_raises_once_it_is_released(tmp_path, python_sigint):
    """A KeyboardInterrupt between the journal's flock and the `try` that releases it left
    the lock held, and the process's next write waited on itself: inside the lock, Ctrl-C
    asks the study to stop and raises when the lock is released; outside it raises at once."""
    import signal

    from archpass.search import run
    from archpass.search import study as st

    class Study:
        stops = 0

        def stop(self):
            Study.stops += 1

    lock = st._lock(tmp_path / "j.jsonl")
    with run._ctrl_c_stops(Study()) as seen:
        lock.acquire()
        assert st.in_locked_region()
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt while the lock is held
        with pytest.raises(KeyboardInterrupt):
            lock.release()
        assert not st.in_locked_region()
        lock.acquire()
        lock.release()  # raised once, not again
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert seen["n"] == 2 and Study.stops == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    lock.acquire()  # not left held: a second acquire in this process does not wait
    lock.release()


def test_nothing_to_optimize_builds_no_guard_but_still_reads_the_calibration_data(tmp_path):
    """A model no pass applies to (a 3-D conv and a 2-D conv, as in a video network) is written back
    at once: the guard's reference (the zero-shot score ran a video network for a minute)
    is not made, and bad calibration data is still an error."""
    from archpass.errors import CalibrationError
    from builders import video_net

    src = tmp_path / "video.onnx"
    onnx.save(video_net(), str(src))
    made = []
    doc = api.optimize(src, tmp_path / "out.onnx", "edgetpu", trials=5,
                       guard_factory=lambda *a: made.append(a) or FakeGuard(threshold=0.0).guard)
    assert doc["message"].startswith("nothing to optimize") and doc["recipe"] == {"rewrites": []}
    assert not made and "proxy" not in doc and "fidelity" not in doc
    # the 3-D conv the edgetpu latency leaves out is named
    assert any("3-D Conv x1" in n and "leaves them out of its latency" in n for n in doc["notes"])
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(CalibrationError):
        api.optimize(src, tmp_path / "out2.onnx", "edgetpu", trials=5, calib=tmp_path / "bad.npy")
    assert not (tmp_path / "out2.onnx").exists()


def test_a_candidate_that_cannot_be_emitted_gives_way_to_the_next(small_model, tmp_path, monkeypatch):
    """The search scores shapes; the chosen recipe is first applied to the graph at the end.
    If that fails (an archpass bug), the search is not lost: the next best candidate is
    written, a note names the trial that failed, and the study's result says which was chosen."""
    from archpass.passes import engine
    from archpass.search.report import RESULT_ATTR
    from archpass.search.study import load_study, records

    real, failed = engine.apply_recipe, []

    def flaky(model, recipe, **kw):
        if len(recipe) and len(failed) < 2:  # the two best candidates fail their final check
            failed.append(recipe)
            raise AssertionError("layer 'x': emitted ONNX has (1,), shape-only structure (2,)")
        return real(model, recipe, **kw)

    monkeypatch.setattr(engine, "apply_recipe", flaky)
    doc = _run(small_model, tmp_path, trials=30)
    assert len(failed) == 2 and doc["improved"] and Recipe.from_json(doc["recipe"]) not in failed
    notes = [n for n in doc["notes"] if "could not be emitted" in n]
    assert len(notes) == 2 and all("AssertionError: layer 'x'" in n and "archpass bug" in n for n in notes)
    assert doc["trials"] == 30
    assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
    study = load_study(tmp_path / "out.study.jsonl", sampler=None)  # what `archpass report` reads
    chosen = {r.number: r.recipe for r in records(study)}[study.user_attrs[RESULT_ATTR]["best_trial"]]
    assert chosen.to_json() == doc["recipe"]


def test_a_candidate_refused_when_emitted_is_not_called_a_bug(small_model, tmp_path, monkeypatch):
    from archpass.errors import RecipeError
    from archpass.passes import engine

    real, failed = engine.apply_recipe, []

    def refusing(model, recipe, **kw):
        if len(recipe) and not failed:
            failed.append(recipe)
            raise RecipeError("the output would be 5x the input's, above the limit", "use --allow-growth")
        return real(model, recipe, **kw)

    monkeypatch.setattr(engine, "apply_recipe", refusing)
    doc = _run(small_model, tmp_path, trials=30)
    (note,) = [n for n in doc["notes"] if "could not be emitted" in n]
    assert "the output would be 5x the input" in note and "bug" not in note and doc["improved"]


def test_optimize_gives_up_after_a_few_candidates_fail_to_emit(small_model, tmp_path, monkeypatch):
    from archpass.passes import engine
    from archpass.search import run

    calls = []

    def broken(model, recipe, **kw):
        calls.append(recipe)
        raise AssertionError("broken")

    monkeypatch.setattr(engine, "apply_recipe", broken)
    with pytest.raises(AssertionError, match="broken"):
        _run(small_model, tmp_path, trials=30)
    assert len(calls) == run.EMIT_ATTEMPTS + 1 and not (tmp_path / "out.onnx").exists()


def test_a_1d_network_optimizes_in_both_modes(tmp_path):
    """Keyword spotting and time-series networks (1-D convs) get the same search."""
    from builders import conv1d_net, run_ort

    src = tmp_path / "net1d.onnx"
    onnx.save(conv1d_net(length=64), str(src))
    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)
    for mode, kw in (("retrain", {}), ("post-training", {"calib": "random", "calib_options": {"samples": 32}})):
        out = tmp_path / f"{mode}.onnx"
        doc = api.optimize(src, out, "edgetpu", trials=20, **kw)
        assert doc["mode"] == mode and doc["improved"], doc["message"]
        assert doc["optimized"]["latency_ms"] < doc["baseline"]["latency_ms"]
        onnx.checker.check_model(str(out), full_check=True)
        assert run_ort(onnx.load(str(out)), {"x": x})[0].shape == (1, 4)
