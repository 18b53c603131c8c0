"""``archpass apply``: rewrite a model by a recipe and write the result with its record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from archpass.cli.common import DebugOpt, InputShapeOpt, JsonOpt, format_shapes, handled, print_json, stdout


def _choice(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (r.get("choice") or {}).items())


def render(doc: dict) -> None:
    t = Table(title=f"Applied to {doc['input']}", title_justify="left")
    for c in ("#", "pass", "site", "choice", "exact", "before", "after"):
        t.add_column(c)
    for i, r in enumerate(doc["rewrites"]):
        t.add_row(str(i), r["pass"], str(r.get("site") or ""), _choice(r), "exact" if r["exact"] else "lossy",
                  format_shapes(r["before"]), format_shapes(r["after"]))
    stdout.print(t)
    b, a = doc["before"], doc["after"]
    stdout.print(f"MACs {b['macs'] / 1e6:.1f} M -> {a['macs'] / 1e6:.1f} M   params {b['params'] / 1e6:.3f} M -> "
                 f"{a['params'] / 1e6:.3f} M   {'exact' if doc['exact'] else 'lossy: recover or fine-tune the weights'}")
    stdout.print(f"wrote {doc['output']}")


def apply(
    model: Annotated[Path, typer.Argument(help="The ONNX model to rewrite (never modified).", show_default=False)],
    recipe: Annotated[Path, typer.Argument(help="Recipe file, JSON or YAML: {\"rewrites\": [...]}.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the rewritten model.", show_default=False)],
    input_shape: InputShapeOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Apply the rewrites of RECIPE to MODEL and write the result (with a record of what was applied) to OUTPUT."""
    from archpass import api

    with handled(debug):
        doc = api.apply(model, recipe, output, input_shape)
    if json_out:
        print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
