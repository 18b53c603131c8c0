"""``archpass calibrate``: measure kernels on a ZigZag accelerator description or an
onnxruntime execution provider, fit the latency predictors, write a target."""

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
    output: Annotated[Path, typer.Option("-o", "--output", help="Target directory to write (reused to resume).")],
    hardware: Annotated[Path | None, typer.Option("--hardware", help="ZigZag hardware YAML (zigzag backend).")] = None,
    mapping: Annotated[Path | None, typer.Option("--mapping", help="ZigZag mapping YAML (zigzag backend).")] = None,
    clock_hz: Annotated[float, typer.Option("--clock-hz", help="Accelerator clock, converts cycles to ms (zigzag).")] = 500e6,
    lpf_limit: Annotated[int, typer.Option("--lpf-limit", help="ZigZag temporal-mapping search size per layer.")] = 4,
    provider: Annotated[str, typer.Option("--provider", help="onnxruntime execution provider (onnxruntime backend).")] = "CPUExecutionProvider",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    samples: Annotated[int, typer.Option("--samples", help="Layers (zigzag) or generated networks (onnxruntime) to measure.")] = 400,
    workers: Annotated[int | None, typer.Option("--workers", help="Parallel measurement processes (default: 2 for zigzag, 1 for onnxruntime, whose timings would disturb each other).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (keep it to resume).")] = 0,
    max_wait: Annotated[float, typer.Option("--max-wait", help="onnxruntime: wait up to this many seconds per network for a core no other process uses.")] = 3.0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sample kernels, measure them (in parallel, cached in OUTPUT/dataset.jsonl so an interrupted run
    resumes), fit the predictors and write the target with a held-out accuracy summary."""
    from archpass.costmodel import calibrate as cal

    with handled(debug):
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
                                              clock_hz=clock_hz, samples=samples, workers=workers, seed=seed,
                                              lpf_limit=lpf_limit, progress=progress)
            else:
                target = cal.calibrate_onnxruntime(name=name, out_dir=output, provider=provider, threads=threads,
                                                   samples=samples, workers=workers, seed=seed, progress=progress,
                                                   max_wait=max_wait)
    acc = target.accuracy
    if json_out:
        print_json({"target": target.summary(), "path": str(output), "accuracy": acc})
        return
    table = Table(title=f"Target {name} written to {output} (held-out accuracy)", title_justify="left")
    for c in ("kernel kind", "points", "held out", "within ±10%", "within ±20%", "MAPE"):
        table.add_column(c, justify="left" if c == "kernel kind" else "right")
    rows = dict(acc.get("kernels", {}))
    if acc.get("all_kernels"):
        rows["all"] = {**acc["all_kernels"], "n_points": acc.get("measured_points")}
    if acc.get("chains", {}).get("n"):
        rows["whole networks"] = {**acc["chains"], "n_points": acc.get("jobs")}
    for kind, s in rows.items():
        has = "within_10pct" in s
        table.add_row(kind, str(s.get("n_points", "")), str(s.get("n", "-")),
                      f"{s['within_10pct']:.1f}%" if has else "-", f"{s['within_20pct']:.1f}%" if has else "-",
                      f"{s['mape_pct']:.1f}%" if has else "-")
    stdout.print(table)
    if acc.get("failed_jobs"):
        stderr.print(f"{acc['failed_jobs']} measurements failed and were skipped, e.g. {acc['failure_examples'][:2]}")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
