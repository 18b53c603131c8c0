"""``archpass apply``: rewrite a model by a recipe and write the result with its record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from archpass.cli.calibopts import (CalibOpt, ChannelOrderOpt, ImageSizeOpt, LayoutOpt, MeanOpt, SamplesOpt, StdOpt,
                                    calib_options, fidelity_line)
from archpass.cli.common import (DebugOpt, InputShapeOpt, JsonOpt, handled, print_json, print_table,
                                 rewrites_table, stdout)
from archpass.limits import GROWTH_LIMIT
from archpass.structure import macs_text


def _estimate_line(doc: dict) -> str | None:
    est = doc.get("estimate")
    if not est:
        return None
    b, a = est["before"], est["after"]
    return (f"on {doc['target']}: latency {b['latency_ms']:.3f} ms -> {a['latency_ms']:.3f} ms   "
            f"peak activations {b['peak_activation_bytes'] / 1e6:.2f} MB -> {a['peak_activation_bytes'] / 1e6:.2f} MB   "
            f"params {b['params_bytes'] / 1e6:.2f} MB -> {a['params_bytes'] / 1e6:.2f} MB")


def render(doc: dict) -> None:
    print_table(rewrites_table(doc["rewrites"], f"Applied to {doc['input']}"))
    b, a = doc["before"], doc["after"]
    stdout.print(f"MACs {macs_text(b['macs'])} -> {macs_text(a['macs'])}   params {b['params'] / 1e6:.3f} M -> "
                 f"{a['params'] / 1e6:.3f} M   {'exact' if doc['exact'] else 'lossy: recover or fine-tune the weights'}")
    fid = doc.get("fidelity")
    if fid:
        cal = fid["calibration"]
        stdout.print(f"fidelity on {cal['samples']} samples ({cal['source']}): before recovery {fidelity_line(fid['before'])}")
        if fid["after"]:
            n = sum(1 for f in fid["recovered_layers"] if f["kept"] == "refit")
            stdout.print(f"  after recovery ({n} layers refitted): {fidelity_line(fid['after'])}")
    line = _estimate_line(doc)
    if line:
        stdout.print(line)
        for note in dict.fromkeys(doc["estimate"]["before"]["notes"] + doc["estimate"]["after"]["notes"]):
            if note not in doc.get("notes", []):  # printed below
                stdout.print(f"note: {note}")
    for note in doc.get("notes", []):
        stdout.print(f"note: {note}")
    if doc.get("written", True):
        stdout.print(f"wrote {doc['output']}")
    else:
        stdout.print(f"validated; nothing written ({doc['output']} is the null device)")


def apply(
    model: Annotated[Path, typer.Argument(help="The ONNX model to rewrite (never modified).", show_default=False)],
    recipe: Annotated[Path, typer.Argument(help="Recipe file, JSON or YAML: {\"rewrites\": [...]}.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the rewritten model: a regular file or a new path (/dev/null validates the recipe without writing).", show_default=False)],
    input_shape: InputShapeOpt = None,
    target: Annotated[str | None, typer.Option("--target", help="Also estimate latency and memory before and after on this target (see `archpass targets`).")] = None,
    allow_growth: Annotated[bool, typer.Option("--allow-growth", help=f"Write outputs with more than {GROWTH_LIMIT}x the input's parameters, or above the 2 GB protobuf limit (then with external data).")] = False,
    calib: CalibOpt = None,
    no_recover: Annotated[bool, typer.Option(
        "--no-recover", help="With --calib: measure fidelity but keep the naive weights of lossy rewrites.")] = False,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    layout: LayoutOpt = "auto",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Apply the rewrites of RECIPE to MODEL and write the result (with a record of what was applied) to OUTPUT.

    With --calib, fidelity to MODEL is measured on that data and the weights of lossy rewrites are recovered from it."""
    from archpass import api

    with handled(debug):
        opts = calib_options(samples, image_size, mean, std, channel_order, layout)
        doc = api.apply(model, recipe, output, input_shape, allow_growth=allow_growth, target=target,
                        calib=calib, recover=not no_recover, calib_options=opts)
    if json_out:
        print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
