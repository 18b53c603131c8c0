"""``archpass report``: write the report of a stored study (one any number of workers ran)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from archpass.cli.common import DebugOpt, JsonOpt, handled, print_json, stderr, stdout


def report(
    storage: Annotated[str, typer.Option("--storage", help="The study's storage: a database URL "
                                         "(postgresql+psycopg://USER@HOST/DB) or the embedded study file.",
                                         show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the report into.", show_default=False)],
    study_name: Annotated[str | None, typer.Option("--study-name", help="The study's name (optional when the "
                                                   "storage holds one study).", show_default=False)] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write report.json, report.md, PNG plots and a self-contained report.html for a stored study."""
    from archpass import api

    with handled(debug):
        stderr.print(f"reading the study from {api.storage_display(storage)} ...")
        doc = api.report(storage, output, study_name=study_name)
    if json_out:
        print_json(doc)
        return
    h = doc["headline"]
    lat = h["latency_ms"]
    stdout.print(f"study {doc['study']}: {sum(h['trials'].values())} trials ({h['feasible_trials']} feasible); "
                 f"latency {lat[0]:.3f} -> {lat[1]:.3f} ms ({h['latency_change_pct']:+.1f}%)")
    for name, path in doc["files"].items():
        stdout.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
