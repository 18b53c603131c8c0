"""The Python API: what the CLI calls, usable directly from a notebook or pipeline.

This facade sits above the core and the subsystems and imports the subsystems lazily,
so ``import archpass`` stays light and the core keeps no dependency on them.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from archpass.analysis import analyze
from archpass.model import Model, load_model
from archpass.structure import Structure

InputShapes = Mapping[str, Sequence[int]] | Sequence[str] | None


def inspect(path: str | os.PathLike, input_shapes: InputShapes = None, target: str | None = None, *,
            measure: bool = False, windows: int | None = None, progress=None) -> dict:
    """The document ``archpass inspect --json`` prints.  With ``measure`` (an onnxruntime
    ``target``), the model is also timed on this host as the target runs it
    (:func:`archpass.costmodel.measure.measure_latency`, ``windows`` windows): the
    estimate gets ``measured`` (with ``error_pct``, the prediction's), and a note when the
    prediction is more than 10% off."""
    from archpass.errors import TargetError

    if measure and target is None:
        raise TargetError("--measure times the model as a target runs it, and no --target was given",
                          "pass --target (cpu, or a target `calibrate --adapt` wrote)")
    if measure and windows is not None and windows < 1:
        raise TargetError(f"--windows {windows} is not positive", "pass 1 or more (5 is the default)")
    model = load_model(path, input_shapes)
    structure = analyze(model)
    if not measure:
        return inspect_document(model, structure, target)
    from archpass.costmodel import load_target
    from archpass.costmodel.measure import WINDOWS, runtime_settings

    runtime_settings(load_target(target))  # refused before any work when it is not an onnxruntime target
    return inspect_document(model, structure, target, measure=WINDOWS if windows is None else windows,
                            progress=progress)


def inspect_document(model: Model, structure: Structure, target: str | None = None, measure: int = 0,
                     progress=None) -> dict:
    """The inspect document; ``measure`` > 0 times the model in that many windows on this
    host (``target`` must be an onnxruntime one)."""
    from archpass.record import read_record

    doc = {
        "model": {"path": str(model.path) if model.path else None, "sha256": model.sha256},
        **structure.to_json(),
    }
    doc["notes"] = list(model.notes) + doc["notes"]
    record = read_record(model.proto)
    doc["rewrites"] = record["rewrites"] if record else []
    doc["sites"] = sites(structure)
    if record:
        doc["record"] = {k: v for k, v in record.items() if k != "rewrites"}
    if target is not None:
        from archpass.costmodel import estimate, load_target

        t = load_target(target)
        doc["estimate"] = estimate(structure, t).to_json()
        if measure:
            from archpass.costmodel.measure import check_note, measure_latency, slow_host_note

            m = measure_latency(model.proto, t, windows=measure, progress=progress)
            pred = doc["estimate"]["latency_ms"]
            doc["estimate"]["measured"] = {**m, "error_pct": round((pred / m["ms"] - 1.0) * 100.0, 2)}
            for note in (slow_host_note(m), check_note(t, pred, m)):
                if note:
                    doc["estimate"]["notes"].append(note)
        doc["notes"] += [n for n in doc["estimate"]["notes"] if n not in doc["notes"]]  # e.g. the host note
        doc["target"] = target
    return doc


def apply(
    path: str | os.PathLike,
    recipe,
    output: str | os.PathLike,
    input_shapes: InputShapes = None,
    *,
    allow_growth: bool = False,
    target: str | None = None,
    calib: str | os.PathLike | None = None,
    recover: bool = True,
    calib_options: Mapping | None = None,
) -> dict:
    """Apply ``recipe`` (a Recipe, a path to a JSON/YAML file, or its JSON form) to the model
    at ``path`` and write the result atomically to ``output`` (the null device validates
    without writing).  The input is never modified; nothing is written when the recipe or
    the calibration data is invalid or the output out of proportion (``allow_growth``
    lifts the growth and 2 GB limits, see :mod:`archpass.limits`).  With ``target``, the
    summary gets an ``estimate`` {before, after} on that target.  Returns the summary
    ``archpass apply --json`` prints.

    With ``calib`` (a path, or ``"random"`` for seeded random inputs) the fidelity to the
    original is measured on that data, and lossy rewrites get their weights recovered
    from it unless ``recover`` is False; the summary then has a ``fidelity`` entry
    (``before``/``after`` recovery).  ``calib_options`` are the keyword arguments of
    :func:`archpass.search.calib.load_calibration` (samples, image_size, mean, std,
    channel_order, layout, seed)."""
    from pathlib import Path

    from archpass.errors import RecipeError
    from archpass.io import check_output
    from archpass.model import save_model, source_form
    from archpass.passes.engine import apply_recipe
    from archpass.recipe import Recipe

    src, dest = Path(path), Path(output)
    if dest.exists() and src.exists() and dest.resolve() == src.resolve():
        raise RecipeError(f"output {dest} is the input model", "write the rewritten model to another file")
    check_output(dest)  # before any work: a directory, a device or an unwritable folder is refused now
    if isinstance(recipe, Recipe):
        rec = recipe
    elif isinstance(recipe, (str, os.PathLike)):
        rec = Recipe.load(recipe)
    else:
        rec = Recipe.from_json(recipe)
    tgt = None
    if target is not None:
        from archpass.costmodel import load_target

        tgt = load_target(target)
    model = load_model(src, input_shapes)
    structure = analyze(model)
    fid = None
    if calib is not None:
        from archpass.search.fidelity import FidelityEvaluator, load_calibration

        data = load_calibration(None if str(calib) == "random" else calib, model, **dict(calib_options or {}))
        evaluator = FidelityEvaluator(model, data, structure=structure)
        evaluation = evaluator.evaluate(rec, recover=recover, verify=True, allow_growth=allow_growth)
        applied = evaluation.applied
        proto = evaluation.proto
        fid = fidelity_document(evaluation, data, recover)
        fid["notes"] += list(evaluator.notes)  # e.g. the original's outputs do not depend on the data
    else:
        applied = apply_recipe(model, rec, structure=structure, allow_growth=allow_growth)
        proto = applied.proto
    notes = list(model.notes)  # e.g. the post-processing set aside
    proto = source_form(proto, model)  # the post-processing set aside, inputs without a batch axis
    if model.symbolic:  # keep what --input-shape pinned only for the analysis dynamic (archpass.dynamic)
        from archpass.dynamic import restore_dynamic_dims

        proto, restored = restore_dynamic_dims(proto, model.symbolic, model.source_inputs, model.computed_shapes,
                                               model.shape_data)
        notes += restored
    written = save_model(proto, dest)
    after = applied.structure
    doc = {
        "input": str(src),
        "output": str(dest),
        "written": written is not None,
        "source_sha256": model.sha256,
        "rewrites": list(applied.rewrites),
        "exact": all(r["exact"] for r in applied.rewrites),
        "before": {"macs": structure.macs, "params": structure.params},
        "after": {"macs": after.macs, "params": after.params},
        "notes": notes,
    }
    if tgt is not None:
        from archpass.costmodel import estimate

        doc["target"] = tgt.name
        doc["estimate"] = {"before": estimate(structure, tgt).to_json(), "after": estimate(after, tgt).to_json()}
        est_notes = doc["estimate"]["before"]["notes"] + doc["estimate"]["after"]["notes"]
        doc["notes"] += [n for n in dict.fromkeys(est_notes) if n not in doc["notes"]]  # e.g. the host note
    if fid is not None:
        doc["fidelity"] = fid
        doc["notes"] = doc["notes"] + fid.pop("notes")
    return doc


def fidelity_document(evaluation, data, recover: bool = True) -> dict:
    """The ``fidelity`` entry of ``apply --json``: before/after recovery, the data, notes."""
    from archpass.search.fidelity import IN_SAMPLE_NOTE, MIN_SPLIT_SAMPLES, RANDOM_DATA_NOTE

    notes = [RANDOM_DATA_NOTE] if data.random else []
    held_out = data.samples >= MIN_SPLIT_SAMPLES
    if held_out:
        notes.append("fidelity is measured on a quarter of the calibration samples held out from weight recovery")
    elif evaluation.after is not None:
        notes.append(IN_SAMPLE_NOTE)
    if evaluation.after is None and not recover:
        notes.append("weight recovery was skipped (--no-recover)")
    return {
        "calibration": {"source": data.source, "samples": data.samples, "random": data.random},
        "before": evaluation.before.to_json(),
        "after": evaluation.after.to_json() if evaluation.after is not None else None,
        "recovered_layers": [f.to_json() for f in evaluation.fits],
        "seconds": evaluation.seconds,
        "notes": notes,
    }


def verify(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    input_shapes: InputShapes = None,
    *,
    calib: str | os.PathLike | None = None,
    calib_options: Mapping | None = None,
    min_fidelity: float | None = None,
) -> dict:
    """Fidelity of ``candidate`` to ``original`` on calibration data (random inputs when
    ``calib`` is None): the document ``archpass verify --json`` prints.  ``passed`` is
    False when the score is below ``min_fidelity``; raising is left to the caller."""
    from archpass.errors import ArchpassError
    from archpass.search.fidelity import RANDOM_DATA_NOTE, fidelity, load_calibration

    ref = load_model(original, input_shapes)
    try:
        cand = load_model(candidate)
    except ArchpassError:
        cand = load_model(candidate, input_shapes)
    data = load_calibration(None if calib is None or str(calib) == "random" else calib, ref, **dict(calib_options or {}))
    fid = fidelity(ref, cand, data)
    from archpass.record import read_record

    record = read_record(cand.proto)
    doc = {
        "original": str(original),
        "candidate": str(candidate),
        "calibration": {"source": data.source, "samples": data.samples, "random": data.random},
        "fidelity": fid.score,
        "outputs": [o.to_json() for o in fid.outputs],
        "random_data": data.random,
        "samples": data.samples,
        "rewrites": record["rewrites"] if record else [],
        "min_fidelity": min_fidelity,
        "passed": min_fidelity is None or fid.score >= min_fidelity,
        "notes": ([RANDOM_DATA_NOTE] if data.random else []) + list(fid.notes),
    }
    return doc


def sites(structure: Structure) -> list[dict]:
    """Where every registered pass applies in ``structure`` and what it may choose there:
    ``{"pass", "kind", "site", "domains": {key: typed domain}, "note"}`` per site (the
    ``sites`` list of ``archpass inspect --json``)."""
    from archpass.passes.base import registry

    return [site.to_json() for p in registry().values() for site in p.sites(structure)]


def passes() -> list[dict]:
    """The registered rewrite passes, as ``archpass passes --json`` lists them."""
    from archpass.passes.engine import describe_passes

    return describe_passes()


def optimize(
    path: str | os.PathLike,
    output: str | os.PathLike,
    target: str = "edgetpu",
    *,
    objective: str | Sequence[str] = "latency",
    trials: int = 300,
    input_shapes: InputShapes = None,
    passes: Sequence[str] | None = None,
    freeze: Sequence[str] = (),
    resolutions: Sequence[int] = (),
    granularity: str | None = None,
    max_latency_ms: float | None = None,
    max_params_mb: float | None = None,
    max_peak_mb: float | None = None,
    mode: str | None = None,
    calib: str | os.PathLike | None = None,
    calib_options: Mapping | None = None,
    min_fidelity: float = 0.99,
    min_proxy: float | None = None,
    guard: bool = True,
    finalists: int = 12,
    sampler: str = "auto",
    seed: int | None = 0,
    workers: int = 1,
    resume: bool = False,
    storage: str | os.PathLike | None = None,
    progress=None,
    guard_factory=None,
    study_name: str | None = None,
    heartbeat: int | None = None,
    evaluator: str | None = None,
    evaluator_timeout: float | None = None,
    min_metrics: Sequence[str] = (),
    evaluate_top: int = 5,
    seed_recipes: Sequence[str | os.PathLike] = (),
    seed_model: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
) -> dict:
    """Search the rewrites that make the model at ``path`` fastest (or smallest) on
    ``target`` and write the result to ``output`` (atomically, with its record) and its
    recipe to ``<output stem>.recipe.json``.  Returns the document ``archpass optimize
    --json`` prints.  ``progress(study, trial)`` is called after each trial.

    ``storage`` (a database URL, a ``.db`` file or a journal file) holds the study
    ``study_name`` (default ``archpass-optimize``), created or joined: any number of
    processes on any machines running the same command share it (``heartbeat``: seconds
    between a database worker's heartbeats).  Without it the study lives in
    ``<output stem>.study.jsonl``.  ``evaluator`` ("CMD {model}") runs on the candidates
    whose cost ranks among the ``evaluate_top`` best so far, ``min_metrics``
    ("NAME=VALUE") bound its metrics.  ``seed_recipes`` (recipe files, found on
    ``seed_model`` when given, resolved onto this model by position) are the first
    trials.  ``report``: a folder for report.json/.md/.html and the plots."""
    from pathlib import Path

    from archpass.errors import ArchpassError
    from archpass.model import atomic_write_text, parse_input_shapes, save_model, source_form
    from archpass.search import run, study as st
    from archpass.search.objective import parse_objectives

    src, dest = Path(path), Path(output)
    if dest.suffix.lower() != ".onnx":
        raise ArchpassError(f"output {dest} does not end in .onnx", "name the optimized model OUT.onnx")
    if study_name is not None and storage is None:
        raise ArchpassError("--study-name names a study in a --storage, and none was given",
                            "add --storage URL_OR_FILE (the default study file holds one study)")
    shared = storage is not None  # an explicit storage is created or joined, never replaced
    if shared:
        from archpass.search.storage import parse_storage

        location = parse_storage(storage)  # a malformed URL is one line now, before any work
    if report is not None:
        from archpass.io import check_output_dir

        check_output_dir(report, what="report folder")
    if dest.exists() and src.exists() and dest.resolve() == src.resolve():
        raise ArchpassError(f"output {dest} is the input model", "write the optimized model to another file")
    if isinstance(input_shapes, Mapping):
        shapes = tuple(f"{k}:{','.join(str(d) for d in v)}" for k, v in input_shapes.items())
    else:
        shapes = tuple(input_shapes or ())
    model = load_model(src, parse_input_shapes(list(shapes)) if shapes else None)
    job = run.Job(
        model=str(src.resolve()), target=str(target), model_sha256=model.sha256, input_shapes=shapes,
        objectives=parse_objectives(objective),
        budgets={k: v for k, v in (("max_latency_ms", max_latency_ms), ("max_params_mb", max_params_mb),
                                   ("max_peak_mb", max_peak_mb)) if v is not None},
        passes=tuple(passes) if passes is not None else None, freeze=tuple(freeze),
        resolutions=tuple(int(r) for r in resolutions), mode=mode or ("post-training" if calib else "retrain"),
        # per stage by default; per group in post-training mode, whose ladder probes single group cuts
        granularity=granularity or ("group" if (mode or ("post-training" if calib else "retrain")) == "post-training"
                                    else "stage"),
        guard=guard, calib=str(Path(calib).resolve()) if calib is not None and Path(calib).exists() else
        (str(calib) if calib is not None else None), calib_options=dict(calib_options or {}),
        min_fidelity=float(min_fidelity), min_proxy=min_proxy, finalists=int(finalists), sampler=sampler, seed=seed, trials=int(trials),
        workers=int(workers), evaluator=evaluator, evaluator_timeout=evaluator_timeout,
        min_metrics=tuple(min_metrics), evaluate_top=int(evaluate_top))
    prep = run.prepare(job, model=model, guard_factory=guard_factory)
    seeds = _seeds(seed_recipes, seed_model, prep.structure)
    if shared:
        store, name = str(storage), study_name or st.STUDY_NAME
        shown = location.display
    else:
        store, name = st.storage_path(dest), None
        shown = str(store)
    out = run.search(prep, store, resume=resume, progress=progress, study_name=name, heartbeat=heartbeat, seeds=seeds)
    applied, recovered, out, emit_notes = run.emit(prep, out)  # a candidate that cannot be emitted gives way
    recipe = out.best.recipe
    proto = recovered if recovered is not None else applied.proto  # post-training: recovered weights
    notes = list(model.notes) + emit_notes
    proto = source_form(proto, model)  # the post-processing set aside, inputs without a batch axis
    if model.symbolic:  # a dynamic batch pinned by --input-shape stays dynamic, as with apply
        from archpass.dynamic import restore_dynamic_dims

        proto, restored = restore_dynamic_dims(proto, model.symbolic, model.source_inputs, model.computed_shapes,
                                               model.shape_data)
        notes += restored
    save_model(proto, dest)
    recipe_path = dest.with_name(dest.stem + ".recipe.json")
    atomic_write_text(recipe_path, recipe.dumps())
    doc = {
        "input": str(src),
        "output": str(dest),
        "recipe_file": str(recipe_path),
        "storage": shown,
        "study_name": out.study.study_name if out.study is not None else None,
        "target": prep.target.name,
        "objectives": list(job.objectives),
        "mode": job.mode,
        "baseline": dict(out.baseline.metrics),
        "optimized": dict(out.best.metrics),
        "recipe": recipe.to_json(),
        "rewrites": list(applied.rewrites),
        "trials": out.trials,
        "interrupted": out.interrupted,
        "improved": out.improved,
        "message": out.message,
        "budgets": prep.objective.budgets.describe(),
        "weights": "recovered on the calibration data" if recovered is not None else
                   ("unchanged (exact rewrites only)" if all(r["exact"] for r in applied.rewrites) else
                    "initialized from the original by the passes: retrain or recover them"),
    }
    from archpass.costmodel import host_notes
    from archpass.costmodel.estimate import other_compute_note

    # e.g. compute the latency leaves out (a video network's 3-D convs), the estimate is for
    # another host (an onnxruntime target measured elsewhere), random calibration data
    notes += [n for n in (other_compute_note(prep.structure, prep.target),) if n]
    notes += host_notes(prep.target) + list(getattr(prep.guard, "notes", ()))
    doc["notes"] = list(dict.fromkeys(notes))
    if out.guard_info is not None:
        g = dict(out.guard or {})
        g.setdefault("threshold", out.guard_info["threshold"])
        g["baseline"] = out.guard_info["baseline"]
        g["evaluations"] = out.guard_info["evaluations"]
        doc["fidelity" if out.guard_info["kind"] == "fidelity" else "proxy"] = g
        doc["finalists"] = list(out.checked)
    if out.front:
        doc["pareto_front"] = list(out.front)
    if out.explored is not None:
        doc["ladder"] = dict(out.explored)  # the post-training guard's exploration (search/ladder.py)
    if seed_recipes:
        doc["seeds"] = [{"file": str(f), **res.to_json()} for f, res in zip(seed_recipes, seeds)]
    if evaluator is not None:
        doc["evaluator"] = _evaluator_summary(out, evaluator)
    if report is not None:
        from archpass.search.report import report_from_study, write_report

        data = report_from_study(out.study, storage=shown, structure=prep.structure, target=prep.target)
        doc["report"] = {k: str(v) for k, v in write_report(data, report).items()}
    return doc


def _seeds(paths, seed_model, structure) -> list:
    """``--seed-recipe`` files resolved onto ``structure`` (from ``seed_model``'s ids by
    position, or checked as written without it)."""
    if not paths:
        if seed_model is not None:
            from archpass.errors import ArchpassError

            raise ArchpassError("--seed-model names the model the --seed-recipe files were found on, and none was given",
                                "add --seed-recipe R.json, or drop --seed-model")
        return []
    from archpass.search.seed import load_seeds

    source = analyze(load_model(seed_model)) if seed_model is not None else None
    return load_seeds(list(paths), structure, source)


def _evaluator_summary(out, command: str) -> dict:
    """How the user's evaluator went: runs, failures (with their reason), and the metrics of
    the model written (the chosen trial's, or the unchanged model's when the original is kept)."""
    import optuna

    evaluated, failed, chosen = 0, [], None
    for t in out.study.get_trials(deepcopy=False) if out.study is not None else ():
        ev = t.user_attrs.get("evaluator") or {}
        if ev.get("ok") is None:
            continue
        evaluated += 1
        if ev.get("ok") is False:
            failed.append({"number": t.number, "reason": ev.get("reason"), "stderr_tail": ev.get("stderr_tail")})
        emitted = (t.number == out.best_trial if out.best_trial is not None  # else the original: an unchanged trial
                   else not (t.user_attrs.get("recipe") or {}).get("rewrites", [1]))
        if emitted and t.state == optuna.trial.TrialState.COMPLETE and ev.get("ok"):
            chosen = ev.get("metrics")
    return {"command": command, "evaluated": evaluated, "failed": failed, "metrics": chosen}


def storage_display(storage: str | os.PathLike) -> str:
    """A study storage as it is safe to print (a database password masked)."""
    from archpass.search.storage import parse_storage

    return parse_storage(storage).display


def report(storage: str | os.PathLike, output: str | os.PathLike, *, study_name: str | None = None) -> dict:
    """Write the report of the study in ``storage`` (a database URL or the embedded study
    file) into the folder ``output``; returns the headline, the files written and the
    study's name (what ``archpass report --json`` prints)."""
    from archpass.io import check_output_dir
    from archpass.search.report import report_from_study, write_report
    from archpass.search.storage import load_existing_study, parse_storage

    check_output_dir(output, what="report folder")  # before reading the study
    loc = parse_storage(storage)
    study = load_existing_study(storage, study_name)
    data = report_from_study(study, storage=loc.display)
    files = write_report(data, output)
    return {"study": study.study_name, "storage": loc.display, "headline": data.headline(),
            "best_trial": data.best_trial, "recipe": dict(data.recipe), "files": {k: str(v) for k, v in files.items()}}
