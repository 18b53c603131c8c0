"""``archpass passes``: the rewrite passes recipes can name."""

from __future__ import annotations

import typer
from rich.table import Table

from archpass.cli.common import JsonOpt, print_json, stdout


def passes(json_out: JsonOpt = False) -> None:
    """List the rewrite passes: what each does, whether it keeps the function, and what a site is."""
    from archpass import api

    doc = api.passes()
    if json_out:
        print_json({"passes": doc})
        return
    t = Table(title="Rewrite passes", title_justify="left")
    for c in ("pass", "what it does", "exactness", "site", "choice keys"):
        t.add_column(c)
    for p in doc:
        t.add_row(p["name"], p["summary"], p["exactness"], p["site_kind"], ", ".join(p["choice_keys"]))
    stdout.print(t)


def register(app: typer.Typer) -> None:
    app.command("passes")(passes)
