"""Calibration-data options shared by ``verify`` and ``apply`` (see archpass.search.calib)."""

from __future__ import annotations

from typing import Annotated

import typer

from archpass.errors import CalibrationError

CalibOpt = Annotated[str | None, typer.Option(
    "--calib", help="Calibration data: an .npy/.npz file (arrays keyed by input name), an image or a folder of "
                    "images, or 'random' (seeded random inputs: a weak proxy).", show_default=False)]
SamplesOpt = Annotated[int | None, typer.Option("--samples", help="Use at most this many samples.", show_default=False)]
ImageSizeOpt = Annotated[str | None, typer.Option(
    "--image-size", help="Resize images to HxW (default: the model's input size), e.g. 224x224.", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", help="Subtract from images scaled to [0,1]: one value or one per channel, e.g. 0.485,0.456,0.406.",
    show_default=False)]
StdOpt = Annotated[str | None, typer.Option(
    "--std", help="Divide images by: one value or one per channel, e.g. 0.229,0.224,0.225.", show_default=False)]
ChannelOrderOpt = Annotated[str, typer.Option("--channel-order", help="Image channel order: rgb or bgr.")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="Image batch layout: nchw, nhwc, or auto (nhwc when only the input's last axis has 1 or 3 channels).")]


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CalibrationError(f"{flag} '{text}' is not a list of numbers", f"write e.g. {flag} 0.5 or {flag} 0.485,0.456,0.406") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise CalibrationError(f"--image-size '{text}' is not HxW", "write e.g. --image-size 224x224") from None
    if h < 1 or w < 1:
        raise CalibrationError(f"--image-size '{text}' has a non-positive side", "use positive sizes")
    return h, w


def calib_options(samples: int | None, image_size: str | None, mean: str | None, std: str | None,
                  channel_order: str, layout: str) -> dict:
    """The keyword arguments of load_calibration for the parsed command-line options."""
    return {"samples": samples, "image_size": _size(image_size), "mean": _floats(mean, "--mean"),
            "std": _floats(std, "--std"), "channel_order": channel_order.lower(), "layout": layout.lower()}


def fidelity_line(f: dict) -> str:
    """One human line for a Fidelity document (score, worst SNR, top-1 agreement)."""
    worst = min(f["outputs"], key=lambda o: o["score"]) if f["outputs"] else None
    text = f"{f['score']:.4f}"
    if worst:
        text += f" (SNR {worst['snr_db']:.1f} dB, cosine {worst['cosine']:.4f}"
        if worst.get("top1_agreement") is not None:
            text += f", top-1 agreement {100 * worst['top1_agreement']:.1f}%"
        text += ")"
    return text
