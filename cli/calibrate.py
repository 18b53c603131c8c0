"""``archpass calibrate``: measure kernels on a ZigZag accelerator description or an
onnxruntime execution provider, fit the latency predictors, write a target.  With
``--adapt BASE``: adapt an existing target to a new device from a few measurements."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from archpass.cli.common import DebugOpt, JsonOpt, handled, print_json, stderr, stdout
from archpass.errors import TargetError


class Backend(str, Enum):
    zigzag = "zigzag"
    onnxruntime = "onnxruntime"


def calibrate(
    backend: Annotated[Backend, typer.Option("--backend", help="Measurement source.")],
    name: Annotated[str, typer.Option("--name", help="Name of the new target.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Target directory to write (reused to resume); with --install, defaults to the user target folder.", show_default=False)] = None,
    adapt: Annotated[str | None, typer.Option("--adapt", help="Adapt this target (a name or directory, same backend) from a few measurements instead of calibrating from scratch.", show_default=False)] = None,
    budget_s: Annotated[float, typer.Option("--budget-s", help="--adapt with onnxruntime: seconds of measurement at most.")] = 60.0,
    spread_s: Annotated[float | None, typer.Option("--spread-s", help="--adapt with onnxruntime: start the timing window rounds at least this many seconds apart, so that one slow phase of the host cannot cover them all (the pauses are not measurement); default 75, at most 1.25x --budget-s; 0 runs them back to back.", show_default=False)] = None,
    models: Annotated[str | None, typer.Option("--models", help="--adapt: comma-separated ONNX models whose dominant kernels are measured first.", show_default=False)] = None,
    install: Annotated[bool, typer.Option("--install", help="--adapt: copy the target into the user target folder and make it the default for BASE's name on this host.")] = False,
    graph_opt: Annotated[str, typer.Option("--graph-opt", help="onnxruntime graph optimization level: disabled, basic, extended, all.")] = "all",
    correction: Annotated[str | None, typer.Option("--correction", help="--adapt: force a correction method (scale, class_scale, loglinear_strong, loglinear, loglinear_weak, rebaseline, rebaseline_loglinear, and transfer_scale, transfer_class_scale, transfer_loglinear_strong, transfer_loglinear: the base's predictors on the new hardware; per_kind: the best of these per kernel class); default: the best cross-validated.", show_default=False)] = None,
    hardware: Annotated[Path | None, typer.Option("--hardware", help="ZigZag hardware YAML (zigzag backend).")] = None,
    mapping: Annotated[Path | None, typer.Option("--mapping", help="ZigZag mapping YAML (zigzag backend).")] = None,
    clock_hz: Annotated[float | None, typer.Option("--clock-hz", help="Accelerator clock, converts cycles to ms (zigzag) (default 500 MHz; with --adapt, the base's).", show_default=False)] = None,
    lpf_limit: Annotated[int | None, typer.Option("--lpf-limit", help="ZigZag temporal-mapping search size per layer (default 4; with --adapt, the base's).", show_default=False)] = None,
    provider: Annotated[str, typer.Option("--provider", help="onnxruntime execution provider (onnxruntime backend).")] = "CPUExecutionProvider",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    samples: Annotated[int | None, typer.Option("--samples", help="Layers (zigzag) or generated networks (onnxruntime) to measure (default 400; 50 layers with --adapt).", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Parallel measurement processes (default: 2 for zigzag, 1 for onnxruntime, whose timings would disturb each other).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (keep it to resume).")] = 0,
    add: Annotated[bool, typer.Option("--add", help="--adapt with onnxruntime: measure another round into the adapted target in -o (same base and settings, this host) and fit on every round's networks; on a host whose speed wanders, two rounds at different times average its level out.")] = False,
    max_wait: Annotated[float, typer.Option("--max-wait", help="onnxruntime: wait up to this many seconds per network for a core no other process uses.")] = 3.0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sample kernels, measure them (in parallel, cached in OUTPUT/dataset.jsonl so an interrupted run
    resumes), fit the predictors and write the target with a held-out accuracy summary.

    With --adapt BASE: measure a few kernels on the new device (the ones that dominate --models, then a
    spread of shapes; at most --samples ZigZag layers or --budget-s seconds of onnxruntime timing in
    interleaved windows, re-measured when other processes load the machine), fit a correction of BASE's
    predictions and write a target that keeps BASE as its prior."""
    from archpass.costmodel import calibrate as cal

    if add and (adapt is None or backend is not Backend.onnxruntime):
        with handled(debug):
            raise TargetError("--add needs --adapt with --backend onnxruntime",
                              "pass --adapt BASE --backend onnxruntime -o DIR with the directory of the first round")
    if adapt is not None:
        with handled(debug):
            target, out = _adapt(adapt, backend, name, output, hardware, mapping, clock_hz, lpf_limit, provider,
                                 threads, samples, workers, seed, budget_s, models, install, graph_opt, correction,
                                 spread_s, add)
        _report(target, out, json_out)
        return
    samples = 400 if samples is None else samples
    with handled(debug):
        if output is None:
            raise TargetError("no output directory", "pass -o DIR (--install is for --adapt)")
        from archpass.io import check_output_dir

        check_output_dir(output)  # before the progress bar: a file, a device or an unwritable folder is refused now
        if samples < 10:
            raise TargetError(f"--samples {samples} is too few to fit predictors", "use at least 10 (hundreds for accuracy)")
        if workers is None:
            workers = 2 if backend is Backend.zigzag else 1
        if workers < 1:
            raise TargetError(f"--workers {workers} is not positive", "use 1 or more")
        with Progress(TextColumn("[bold]calibrate[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=False) as bar:
            task = bar.add_task(name, total=samples)
            failed = {"n": 0}

            def progress(done: int, total: int, note: str) -> None:
                if note and note != "cached":
                    failed["n"] += 1
                bar.update(task, completed=done, total=total,
                           description=f"{name}" + (f" ({failed['n']} failed)" if failed["n"] else ""))

            if backend is Backend.zigzag:
                if hardware is None or mapping is None:
                    raise TargetError("the zigzag backend needs --hardware and --mapping", "pass both YAML files")
                target = cal.calibrate_zigzag(name=name, out_dir=output, hardware=hardware, mapping=mapping,
                                              clock_hz=clock_hz or 500e6, samples=samples, workers=workers, seed=seed,
                                              lpf_limit=lpf_limit or 4, progress=progress)
            else:
                target = cal.calibrate_onnxruntime(name=name, out_dir=output, provider=provider, threads=threads,
                                                   samples=samples, workers=workers, seed=seed, progress=progress,
                                                   max_wait=max_wait, graph_opt=graph_opt)
    _report(target, output, json_out)


def _adapt(base, backend, name, output, hardware, mapping, clock_hz, lpf_limit, provider, threads, samples, workers,
           seed, budget_s, models, install, graph_opt, correction, spread_s=None, add=False):
    from archpass.costmodel import adapt as ad
    from archpass.costmodel.target import install_target, set_default, user_dir

    prior = ad.load_base(base, backend.value)  # unknown base / other backend: one line before anything runs
    if correction is not None and correction not in (*ad.METHODS, ad.PER_KIND):
        raise TargetError(f"unknown --correction '{correction}'", f"use one of {', '.join((*ad.METHODS, ad.PER_KIND))}")
    model_paths = [m.strip() for m in (models or "").split(",") if m.strip()]
    for m in model_paths:
        if not Path(m).is_file():
            raise TargetError(f"--models file not found: {m}", "pass existing ONNX files, separated by commas")
    if output is None and not install:
        raise TargetError("no output directory", "pass -o DIR, or --install to write into the user target folder")
    from archpass.io import check_output_dir

    out = check_output_dir(output if output is not None else user_dir() / name)
    if backend is Backend.zigzag:
        if hardware is None or mapping is None:
            raise TargetError("adapting to ZigZag hardware needs --hardware and --mapping", "pass both YAML files")
        n = 50 if samples is None else samples
        if workers is not None and workers < 1:
            raise TargetError(f"--workers {workers} is not positive", "use 1 or more")
        with Progress(TextColumn("[bold]adapt[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=stderr, transient=False) as bar:
            task = bar.add_task(name, total=n)
            target = ad.adapt_zigzag(base=prior, name=name, out_dir=out, hardware=hardware, mapping=mapping,
                                     clock_hz=clock_hz, samples=n, workers=workers or 2, seed=seed,
                                     lpf_limit=lpf_limit, models=model_paths, method=correction,
                                     progress=lambda done, total, note: bar.update(task, completed=done, total=total))
    else:
        target = ad.adapt_onnxruntime(base=prior, name=name, out_dir=out, provider=provider, threads=threads,
                                      graph_opt=graph_opt, budget_s=budget_s, seed=seed, models=model_paths,
                                      method=correction, spread_s=spread_s, add=add,
                                      progress=lambda msg: stderr.print(f"adapt {name}: {msg}"))
    if install:
        if output is not None:
            out = install_target(target)
        if prior.origin in ("builtin", "user"):
            key = str(base)  # the name the user adapted: it now means the new target here
            set_default(key, target.name)
            stderr.print(f"installed {target.name} in {user_dir()}; '{key}' now means {target.name} on this host "
                         f"(undo: archpass targets --unset-default {key})")
        else:
            stderr.print(f"installed {target.name} in {user_dir()}")
    return target, out


def _report(target, output, json_out: bool) -> None:
    name = target.name
    acc = target.accuracy
    notes = list(acc.get("notes") or []) + list((acc.get("measurement") or {}).get("notes") or [])
    if json_out:
        print_json({"target": target.summary(), "path": str(output), "accuracy": acc, "notes": notes})
        return
    table = Table(title=f"Target {name} written to {output} (held-out accuracy)", title_justify="left")
    for c in ("kernel kind", "points", "held out", "within ±10%", "within ±20%", "MAPE"):
        table.add_column(c, justify="left" if c == "kernel kind" else "right")
    rows = dict(acc.get("kernels", {}))
    if acc.get("all_kernels"):
        rows["all"] = {**acc["all_kernels"], "n_points": acc.get("measured_points")}
    if acc.get("chains", {}).get("n"):
        # a full calibration's timed jobs; an adaptation's timed networks
        timed = acc.get("jobs") or (acc.get("network_fit") or {}).get("networks")
        rows["whole networks"] = {**acc["chains"], "n_points": timed if timed is not None else ""}
    for method, cv in (acc.get("cross_validation") or {}).items():
        for what, s in cv.items():
            if s.get("n") and "within_10pct" in s:
                rows[f"{method} ({what}){' <- chosen' if method == acc.get('method') else ''}"] = {**s, "n_points": ""}
    for kind, s in rows.items():
        has = "within_10pct" in s
        table.add_row(kind, str(s.get("n_points", "")), str(s.get("n", "-")),
                      f"{s['within_10pct']:.1f}%" if has else "-", f"{s['within_20pct']:.1f}%" if has else "-",
                      f"{s['mape_pct']:.1f}%" if has else "-")
    stdout.print(table)
    if acc.get("method"):
        chosen = (acc.get("cross_validation") or {}).get(acc["method"], {})
        weighted = (chosen.get("kernels") or {}).get("latency_weighted_mape_pct")
        stderr.print(f"correction: {acc['method']}, {acc.get('selected_by')}"
                     + (f" (latency-weighted kernel MAPE {weighted:.1f}%)" if weighted is not None else ""))
        tied = (acc.get("selection") or {}).get("tied_methods") or []
        if len(tied) > 1:
            stderr.print(f"the held-out networks could not tell {', '.join(tied)} apart; {acc['method']} had the lowest "
                         "held-out kernel error of them")
    m = acc.get("measurement") or {}
    if "other_cores_median" in m:
        stderr.print(f"measured {m.get('networks')} networks in {m.get('seconds')} s ({m.get('windows')} windows); other "
                     f"processes kept {m.get('other_cores_median') or 0:.2f} cores busy (median, max "
                     f"{m.get('other_cores_max') or 0:.2f}); {m.get('remeasured')} measurements repeated, "
                     f"{m.get('kept_busy')} kept busy"
                     + (f"; window rounds spread over {m['spread_waited_s']:.0f} s of pauses" if m.get("spread_waited_s")
                        else ""))
    rounds = m.get("rounds") or []
    if len(rounds) > 1:
        stderr.print(f"round {len(rounds)}: the fit pools {len(rounds)} rounds, "
                     f"{sum(len(r.get('keys') or []) for r in rounds)} networks ("
                     + ", ".join(f"{r.get('networks')} at {r.get('when', '?')}" for r in rounds) + ")")
    for rnd, sc in (acc.get("slow_state_scaling") or {}).items():
        stderr.print(f"{'round ' + rnd.lstrip('r') + ': ' if len(rounds) > 1 else ''}{sc['networks_scaled']} networks "
                     "had no window in the host's fast state: their latency divided by "
                     f"{sc['slow_over_fast']:.2f}, how much slower the slow state ran the "
                     f"{sc['networks_in_both_states']} networks timed in both")
    if acc.get("failed_jobs"):
        stderr.print(f"{acc['failed_jobs']} measurements failed and were skipped, e.g. {acc['failure_examples'][:2]}")
    for n in notes:
        stdout.print(f"note: {n}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
