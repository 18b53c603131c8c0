"""``archpass verify``: how close a rewritten model stays to the original, on calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from archpass.cli.calibopts import (CalibOpt, ChannelOrderOpt, ImageSizeOpt, LayoutOpt, MeanOpt, SamplesOpt, StdOpt,
                                    calib_options)
from archpass.cli.common import DebugOpt, InputShapeOpt, JsonOpt, handled, print_json, stdout
from archpass.errors import CheckFailed


def render(doc: dict) -> None:
    t = Table(title=f"Fidelity of {doc['candidate']} to {doc['original']}", title_justify="left")
    for c in ("output", "score", "cosine", "SNR dB", "max abs error", "top-1 agreement"):
        t.add_column(c, justify="left" if c == "output" else "right")
    for o in doc["outputs"]:
        top1 = "" if o["top1_agreement"] is None else f"{100 * o['top1_agreement']:.1f}%"
        t.add_row(o["name"], f"{o['score']:.4f}", f"{o['cosine']:.5f}", f"{o['snr_db']:.1f}", f"{o['max_abs_error']:.4g}", top1)
    stdout.print(t)
    cal = doc["calibration"]
    stdout.print(f"fidelity {doc['fidelity']:.4f} on {cal['samples']} samples ({cal['source']})")
    for n in doc["notes"]:
        stdout.print(f"[yellow]note:[/yellow] {n}")


def verify(
    original: Annotated[Path, typer.Argument(help="The original ONNX model.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The rewritten ONNX model to compare with it.", show_default=False)],
    calib: CalibOpt = None,
    input_shape: InputShapeOpt = None,
    min_fidelity: Annotated[float | None, typer.Option(
        "--min-fidelity", help="Exit with code 1 when the fidelity score is below this (0..1).", show_default=False)] = None,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    layout: LayoutOpt = "auto",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure the fidelity of CANDIDATE to ORIGINAL: per output cosine, SNR, max abs error, top-1 agreement, and one score in [0, 1]."""
    from archpass import api

    with handled(debug):
        if min_fidelity is not None and not 0.0 <= min_fidelity <= 1.0:
            from archpass.errors import ArchpassError

            raise ArchpassError(f"--min-fidelity {min_fidelity} is outside [0, 1]", "pass a score such as 0.99")
        opts = calib_options(samples, image_size, mean, std, channel_order, layout)
        doc = api.verify(original, candidate, input_shape, calib=calib, calib_options=opts, min_fidelity=min_fidelity)
    if json_out:
        print_json(doc)
    else:
        render(doc)
    if not doc["passed"]:
        with handled(debug):
            raise CheckFailed(f"fidelity {doc['fidelity']:.4f} is below --min-fidelity {min_fidelity}",
                              "recover the weights (apply --calib), drop lossy rewrites, or lower the bound")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
