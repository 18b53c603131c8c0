"""``archpass optimize``: search the rewrites that make a model fastest (or smallest) on a target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from archpass.cli.calibopts import (CalibOpt, ChannelOrderOpt, ImageSizeOpt, LayoutOpt, MeanOpt, SamplesOpt, StdOpt,
                                    calib_options)
from archpass.cli.common import (DebugOpt, InputShapeOpt, JsonOpt, handled, id_column, print_json, print_table,
                                 stderr, stdout)

_UNITS = {"latency_ms": ("latency", 1.0, "ms", ".3f"), "params_bytes": ("params", 1e-6, "MB", ".3f"),
          "peak_activation_bytes": ("peak activation", 1e-6, "MB", ".3f"), "macs": ("MACs", 1e-6, "M", ".1f")}


def _csv(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def _ints(values: list[str] | None, flag: str) -> list[int]:
    from archpass.errors import ArchpassError

    out = []
    for x in _csv(values):
        try:
            out.append(int(x))
        except ValueError:
            raise ArchpassError(f"{flag} takes integers, got '{x}'", f"e.g. {flag} 160,192,224") from None
    return out


def _rewrites(recipe: dict) -> str:
    counts: dict[str, int] = {}
    for r in recipe["rewrites"]:
        counts[r["pass"]] = counts.get(r["pass"], 0) + 1
    return ", ".join(f"{p} ×{n}" if n > 1 else p for p, n in counts.items()) or "none"


def _guard_value(x: float) -> str:
    """A guard's score with four significant digits, but never rounded up to a bound it
    does not reach: a fidelity of 0.9999973 is not 1 (six digits, then as it is)."""
    for digits in (4, 6):
        text = f"{x:.{digits}g}"
        if float(text) == x or not float(text).is_integer():
            return text
    return repr(x)


def render(doc: dict) -> None:
    t = Table(title=f"{doc['input']} on {doc['target']} ({', '.join(doc['objectives'])}, {doc['trials']} trials)",
              title_justify="left")
    for c in ("", "before", "after", "change"):
        t.add_column(c, justify="right" if c else "left")
    for key, (label, scale, unit, fmt) in _UNITS.items():
        b, a = doc["baseline"][key], doc["optimized"][key]
        t.add_row(f"{label} ({unit})", format(b * scale, fmt), format(a * scale, fmt),
                  f"{(a - b) / b * 100:+.1f}%" if b else "")
    for kind in ("fidelity", "proxy"):
        g = doc.get(kind)
        if g:
            base, score = g.get("baseline"), g.get("score")
            t.add_row(f"{kind} (≥ {_guard_value(g['threshold'])})", "" if base is None else _guard_value(base),
                      "" if score is None else _guard_value(score), "")
    stdout.print(t)
    stdout.print(f"rewrites: {_rewrites(doc['recipe'])}")
    for note in doc.get("notes", []):
        stdout.print(f"note: {note}")
    for seed in doc.get("seeds", []):
        _render_seed(seed)
    ev = doc.get("evaluator")
    if ev:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in (ev["metrics"] or {}).items()) or "not evaluated"
        stdout.print(f"evaluator: {ev['evaluated']} runs, {len(ev['failed'])} failed; result: {metrics}")
    study = f"study {doc['study_name']} in {doc['storage']}" if doc.get("study_name") else f"study: {doc['storage']}"
    stdout.print(f"wrote {doc['output']} and {doc['recipe_file']} ({study})")
    if doc.get("report"):
        stdout.print(f"report: {doc['report']['report.html']}")


def _render_seed(seed: dict) -> None:
    """Which rewrites of a --seed-recipe resolved onto this model, and why the others did not."""
    def text(rw: dict | None) -> str:
        if rw is None:
            return "not resolved"
        return " ".join([rw["pass"], str(rw.get("site") or "")] + [f"{k}={v}" for k, v in rw.items()
                                                                  if k not in ("pass", "site")]).replace("  ", " ")

    entries = seed["entries"]
    t = Table(title=f"seed {seed['file']}: {seed['resolved']} of {len(entries)} rewrites resolved", title_justify="left")
    t.add_column("#", justify="right")
    id_column(t, "rewrite", [text(e["source"]) for e in entries])
    t.add_column("where")
    moved = [("as written" if e["resolved"] == e["source"] else text(e["resolved"])) for e in entries]
    id_column(t, "resolved as", moved)
    t.add_column("note")
    for e, m in zip(entries, moved):
        note = "" if e["note"] in ("same id", "whole model") else e["note"].removeprefix("same id; ")
        t.add_row(str(e["index"]), text(e["source"]), e["address"], m, note)
    print_table(t)


class _Progress:
    """A rich progress bar on stderr with the best value so far (an Optuna callback)."""

    def __init__(self, total: int, unit: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]optimize"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[best]}"), TimeRemainingColumn(), console=stderr,
                                 transient=True)
        self.task = self.progress.add_task("optimize", total=total, best="")
        self.best: float | None = None
        self.unit = unit

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        if trial.state == TrialState.COMPLETE and trial.values and all(c <= 0 for c in trial.user_attrs.get("constraints", ())):
            v = trial.values[0]
            if self.best is None or v < self.best:
                self.best = v
        n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        self.progress.update(self.task, completed=n, best=f"best {self.best:.4g} {self.unit}" if self.best is not None else "")


def optimize(
    model: Annotated[Path, typer.Argument(help="The ONNX model to optimize (never modified).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the optimized model (.onnx); its recipe goes to OUT.recipe.json, the study to OUT.study.jsonl (or --storage).", show_default=False)],
    target: Annotated[str, typer.Option("--target", "-t", help="Target name (`archpass targets`) or target folder.")] = "edgetpu",
    objective: Annotated[str, typer.Option("--objective", help="latency, memory (params + peak activation) or macs; several comma-separated for a Pareto front (NSGA-II).")] = "latency",
    trials: Annotated[int, typer.Option("--trials", "-n", help="Finished trials to reach (counted across --resume, --workers and every process on a shared --storage; a trial the evaluator failed counts).")] = 300,
    passes: Annotated[Optional[list[str]], typer.Option("--passes", help="Restrict the search to these passes (comma-separated): fuse_ibn, channels, width_multiplier, dw_to_dense, resolution.", show_default=False)] = None,
    freeze: Annotated[Optional[list[str]], typer.Option("--freeze", help="Sites to leave alone (comma-separated block/group/layer/stage ids, PASS:SITE, or a pass name).", show_default=False)] = None,
    resolutions: Annotated[Optional[list[str]], typer.Option("--resolutions", help="Input sizes to try, e.g. 160,192,224.", show_default=False)] = None,
    granularity: Annotated[Optional[str], typer.Option("--granularity", help="Channel counts chosen per 'stage' (default) or per adjustable channel 'group' (default in post-training mode and for models without stages, such as transformers).", show_default=False)] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Latency budget.", show_default=False)] = None,
    max_params_mb: Annotated[Optional[float], typer.Option("--max-params-mb", help="Parameter memory budget (MB = 1e6 bytes).", show_default=False)] = None,
    max_peak_mb: Annotated[Optional[float], typer.Option("--max-peak-mb", help="Peak activation memory budget (MB).", show_default=False)] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="post-training (default with --calib: recovered candidates keep --min-fidelity) or retrain (default without: zero-shot trainability no lower than the original's, within its noise).", show_default=False)] = None,
    calib: CalibOpt = None,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    layout: LayoutOpt = "auto",
    min_fidelity: Annotated[float, typer.Option("--min-fidelity", help="Post-training guard: lowest fidelity to the original.")] = 0.99,
    min_proxy: Annotated[Optional[float], typer.Option("--min-proxy", help="Retrain guard: lowest zero-shot score (default: the original's minus 0.15, its seed noise).", show_default=False)] = None,
    finalists: Annotated[int, typer.Option("--finalists", help="Guard evaluations spent choosing the result, at most.")] = 12,
    no_guard: Annotated[bool, typer.Option("--no-guard", help="Search cost only, without an accuracy guard.")] = False,
    sampler: Annotated[str, typer.Option("--sampler", help="auto (TPE, or NSGA-II for several objectives), tpe, nsga2 or random.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Makes a run repeatable.")] = 0,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Local processes sharing the study.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run of this same command.")] = False,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Where the study lives, shared by every process that runs the same command: a database URL (postgresql+psycopg://USER[:PASSWORD]@HOST/DB), a .db SQLite file or a journal file. Default: OUT.study.jsonl, replaced by a fresh run.", show_default=False)] = None,
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="The study's name in --storage (created, or joined when it exists).", show_default=False)] = None,
    heartbeat: Annotated[Optional[int], typer.Option("--heartbeat", help="Seconds between a database worker's heartbeats; a trial silent for twice that is failed and retried (default 30).", show_default=False)] = None,
    evaluator: Annotated[Optional[str], typer.Option("--evaluator", help='Your command, run on promising candidates: "CMD ARGS {model}"; its last stdout line is a JSON object of metrics.', show_default=False)] = None,
    evaluator_timeout: Annotated[float, typer.Option("--evaluator-timeout", help="Seconds one evaluator run may take (its process group is then killed and the trial fails).")] = 3600.0,
    min_metric: Annotated[Optional[list[str]], typer.Option("--min-metric", help="NAME=VALUE: the evaluator's metric NAME must be at least VALUE (repeatable).", show_default=False)] = None,
    evaluate_top: Annotated[int, typer.Option("--evaluate-top", help="Run the evaluator on a candidate only when its cost ranks among the K best so far.")] = 5,
    seed_recipe: Annotated[Optional[list[Path]], typer.Option("--seed-recipe", help="A recipe to try first (repeatable); with --seed-model, found on that model and resolved onto MODEL by position.", show_default=False)] = None,
    seed_model: Annotated[Optional[Path], typer.Option("--seed-model", help="The model the --seed-recipe files were found on (same family as MODEL).", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write report.json, report.md, PNG plots and a self-contained report.html into this folder.", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Search the rewrites that make MODEL fastest (or smallest) on a target within budgets, and write the optimized model."""
    from archpass import api

    with handled(debug):
        objectives = objective
        bar = _Progress(trials, "ms" if objective.split(",")[0].strip() == "latency" else "")
        with bar.progress:
            doc = api.optimize(
                model, output, target, objective=objectives, trials=trials, input_shapes=input_shape,
                passes=_csv(passes) if passes else None, freeze=_csv(freeze),
                resolutions=_ints(resolutions, "--resolutions"), granularity=granularity,
                max_latency_ms=max_latency_ms, max_params_mb=max_params_mb, max_peak_mb=max_peak_mb, mode=mode,
                calib=calib, calib_options=calib_options(samples, image_size, mean, std, channel_order, layout),
                min_fidelity=min_fidelity, min_proxy=min_proxy, guard=not no_guard, finalists=finalists, sampler=sampler,
                seed=seed, workers=workers, resume=resume, progress=bar, storage=storage, study_name=study_name,
                heartbeat=heartbeat, evaluator=evaluator, evaluator_timeout=evaluator_timeout,
                min_metrics=min_metric or (), evaluate_top=evaluate_top, seed_recipes=seed_recipe or (),
                seed_model=seed_model, report=report)
    if doc.get("interrupted"):
        stderr.print(f"interrupted after {doc['trials']} trials: wrote the best model found so far "
                     "(repeat the command with --resume to continue)")
    if doc.get("message"):
        stderr.print(doc["message"])
    if json_out:
        print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize)
