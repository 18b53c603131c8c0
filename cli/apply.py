"""``archpass apply``: rewrite a model by a recipe and write the result with its record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from archpass.cli.calibopts import (CalibOpt, ChannelOrderOpt, ImageSizeOpt, LayoutOpt, MeanOpt, SamplesOpt, StdOpt,
                                    calib_options, fidelity_line)
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
    fid = doc.get("fidelity")
    if fid:
        cal = fid["calibration"]
        stdout.print(f"fidelity on {cal['samples']} samples ({cal['source']}): before recovery {fidelity_line(fid['before'])}")
        if fid["after"]:
            n = sum(1 for f in fid["recovered_layers"] if f["kept"] == "refit")
            stdout.print(f"  after recovery ({n} layers refitted): {fidelity_line(fid['after'])}")
        for note in doc.get("notes", []):
            stdout.print(f"[yellow]note:[/yellow] {note}")
    stdout.print(f"wrote {doc['output']}")


def apply(
    model: Annotated[Path, typer.Argument(help="The ONNX model to rewrite (never modified).", show_default=False)],
    recipe: Annotated[Path, typer.Argument(help="Recipe file, JSON or YAML: {\"rewrites\": [...]}.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the rewritten model.", show_default=False)],
    input_shape: InputShapeOpt = None,
    calib: CalibOpt = None,
    no_recover: Annotated[bool, typer.Option(
        "--no-recover", help="With --calib: measure fidelity but keep the naive weights of lossy rewrites.")] = False,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    layout: LayoutOpt = "nchw",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Apply the rewrites of RECIPE to MODEL and write the result (with a record of what was applied) to OUTPUT.

    With --calib, fidelity to MODEL is measured on that data and the weights of lossy rewrites are recovered from it."""
    from archpass import api

    with handled(debug):
        opts = calib_options(samples, image_size, mean, std, channel_order, layout)
        doc = api.apply(model, recipe, output, input_shape, calib=calib, recover=not no_recover, calib_options=opts)
    if json_out:
        print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
