"""Shared plumbing for the command modules: error handling, output streams, common options."""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Annotated, Iterator

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from archpass.errors import ArchpassError

# Wide tables when piped (a pipeline log is not an 80-column terminal) unless COLUMNS says otherwise.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
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


def table(title: str) -> Table:
    """A results table in the compact style every command uses (fits 80 columns more often)."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def id_column(t: Table, header: str, ids: list[str], justify: str = "left") -> None:
    """A column of ids users copy into recipes (or of short values that must not be cut):
    never wrapped, folded or cut.  Print its table with :func:`print_table`: a row longer
    than the terminal is soft-wrapped by the terminal, every id still whole in the text."""
    t.add_column(header, no_wrap=True, justify=justify,  # type: ignore[arg-type]
                 min_width=max([len(header), *(len(x) for i in ids for x in str(i).splitlines() or [""])]))


def print_table(t: Table) -> None:
    """Print ``t`` at the terminal's width, or wider when its id columns need more: ids are
    never cut (the terminal soft-wraps the longer rows instead).  Console.print caps its
    ``width`` argument at the console's width, so the console is widened for this table."""
    from rich.measure import Measurement

    need = Measurement.get(stdout, stdout.options.update(width=10_000), t).minimum
    if need <= stdout.width:
        stdout.print(t)
        return
    saved = stdout._width  # None (follow the terminal) or a fixed width
    stdout.width = need
    try:
        stdout.print(t, crop=False)
    finally:
        stdout._width = saved


def rewrites_table(rewrites: list[dict], title: str) -> Table:
    """The applied rewrites (record entries) as a table: `apply` prints the ones it just
    applied, `inspect` the ones a model carries.  Sites are ids users copy: never cut."""
    t = table(title)
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("pass", no_wrap=True)
    id_column(t, "site", [str(r.get("site") or "") for r in rewrites])
    for c in ("choice", "exact", "before", "after"):
        t.add_column(c, overflow="fold")  # shape summaries wrap; nothing is cut
    for i, r in enumerate(rewrites):
        choice = ", ".join(f"{k}={v}" for k, v in (r.get("choice") or {}).items())
        t.add_row(str(i), r["pass"], str(r.get("site") or ""), choice, "exact" if r.get("exact") else "lossy",
                  format_shapes(r.get("before")), format_shapes(r.get("after")))
    return t
