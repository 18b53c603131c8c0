"""Shared plumbing for the command modules: error handling, output streams, common options."""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import contextmanager
from typing import Annotated, Iterator

import typer
from rich.console import Console
from rich.table import Table

from archpass.errors import ArchpassError

# Wide tables when piped (a pipeline log is not an 80-column terminal).
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True)

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Pin an input's dynamic dims: NAME:D0,D1,... (repeatable), e.g. input:1,3,224,224.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


@contextmanager
def handled(debug: bool = False) -> Iterator[None]:
    """Turn ArchpassError into one line on stderr and its exit code (2 for bad input)."""
    try:
        yield
    except ArchpassError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.line()}", file=sys.stderr)
        raise typer.Exit(exc.exit_code)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def format_shapes(d) -> str:
    """A rewrite's before/after shape summary (a dict in the record) as one cell of a table."""
    return ", ".join(f"{k}: {v}" for k, v in d.items()) if isinstance(d, dict) else str(d or "")


def rewrites_table(rewrites: list[dict], title: str) -> Table:
    """The applied rewrites (record entries) as a table: `apply` prints the ones it just
    applied, `inspect` the ones a model carries.  Sites are ids users copy: never cut."""
    t = Table(title=title, title_justify="left")
    for c in ("#", "pass", "site", "choice", "exact", "before", "after"):
        t.add_column(c, overflow="fold", no_wrap=False)
    for i, r in enumerate(rewrites):
        choice = ", ".join(f"{k}={v}" for k, v in (r.get("choice") or {}).items())
        t.add_row(str(i), r["pass"], str(r.get("site") or ""), choice, "exact" if r.get("exact") else "lossy",
                  format_shapes(r.get("before")), format_shapes(r.get("after")))
    return t
