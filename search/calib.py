"""Calibration data: the inputs fidelity is measured and weights are recovered on.

Sources (``load_calibration``):

* ``None``: seeded standard-normal inputs of the model's input shapes (``random=True``;
  every report then says fidelity was measured on random data, a weak proxy);
* an ``.npy`` file (models with one input) or an ``.npz`` file with one array per input
  name; samples are stacked along axis 0, so an array for an input of shape
  ``(B, C, H, W)`` has shape ``(N, C, H, W)`` (a single sample may drop the batch axis);
* a folder of images (or one image), read with Pillow, converted to RGB (or grey for a
  one-channel input), resized to ``image_size`` (default: the model input's H x W),
  scaled to [0, 1], normalized by ``mean``/``std`` (per channel, in the order given by
  ``channel_order``) and laid out as ``nchw`` or ``nhwc``.

Every problem (missing file, unreadable image, empty folder, missing input name, wrong
shapes, data meant for another model) raises :class:`~archpass.errors.CalibrationError`
with one line naming the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from archpass.errors import CalibrationError
from archpass.model import Model

DEFAULT_RANDOM_SAMPLES = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class CalibData:
    """Calibration inputs keyed by model input name (samples along axis 0)."""

    arrays: Mapping[str, np.ndarray]
    random: bool
    source: str  # a description for reports

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, self.samples, max(1, size)):
            yield {k: v[i:i + size] for k, v in self.arrays.items()}

    def take(self, indices) -> "CalibData":
        return CalibData({k: v[indices] for k, v in self.arrays.items()}, self.random, self.source)


def _shapes(model: Model) -> dict[str, tuple[int, ...]]:
    return dict(model.input_shapes)


def _fit(name: str, arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """``arr`` as float32 samples of an input of ``shape``, or a CalibrationError."""
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CalibrationError(f"{where}: array for input '{name}' has dtype {arr.dtype}",
                               "store real numbers (float32)")
    if arr.ndim == len(shape) - 1 and tuple(arr.shape) == tuple(shape[1:]):
        arr = arr[None]
    if arr.ndim != len(shape) or tuple(arr.shape[1:]) != tuple(shape[1:]):
        want = "(N, " + ", ".join(str(d) for d in shape[1:]) + ")"
        raise CalibrationError(f"{where}: array for input '{name}' has shape {tuple(arr.shape)}, the model expects {want}",
                               "pass calibration data made for this model (samples along axis 0)")
    if arr.shape[0] == 0:
        raise CalibrationError(f"{where}: array for input '{name}' has no samples", "pass at least one sample")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise CalibrationError(f"{where}: array for input '{name}' has NaN or infinite values", "clean the data")
    return arr


def _from_arrays(path: Path, model: Model) -> tuple[dict[str, np.ndarray], str]:
    shapes = _shapes(model)
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, OSError, zipfile errors...
        raise CalibrationError(f"cannot read calibration file {path} ({type(exc).__name__})",
                               "pass an .npy or .npz file written by numpy") from None
    if isinstance(loaded, np.ndarray):
        if len(shapes) != 1:
            raise CalibrationError(f"{path} holds one array but the model has inputs {', '.join(shapes)}",
                                   "use an .npz file with one array per input name")
        name = next(iter(shapes))
        return {name: _fit(name, loaded, shapes[name], str(path))}, f"{path.name} ({len(loaded)} samples)"
    with loaded:
        keys = list(loaded.keys())
        missing = [n for n in shapes if n not in keys]
        if missing:
            raise CalibrationError(f"{path} has no array for input '{missing[0]}' (it has {', '.join(keys) or 'none'})",
                                   f"save one array per input name: {', '.join(shapes)}")
        arrays = {n: _fit(n, loaded[n], shapes[n], str(path)) for n in shapes}
    return arrays, path.name


def _pair(value, n: int, what: str) -> np.ndarray | None:
    if value is None:
        return None
    v = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if v.size == 1:
        v = np.repeat(v, n)
    if v.size != n:
        raise CalibrationError(f"--{what} has {v.size} values but the images have {n} channels", f"give 1 or {n} values")
    if what == "std" and np.any(v == 0):
        raise CalibrationError("--std has a zero", "use positive standard deviations")
    return v


def image_layout(shape: Sequence[int]) -> str:
    """The layout of an image batch ``shape`` (N, C, H, W or N, H, W, C) from where its 1 or
    3 channels are: ``nhwc`` only when the last axis alone has them (a TensorFlow/Keras
    export), else ``nchw``."""
    return "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"


def _from_images(path: Path, model: Model, image_size, mean, std, channel_order: str, layout: str) -> tuple[dict[str, np.ndarray], str]:
    from PIL import Image, UnidentifiedImageError

    shapes = _shapes(model)
    if len(shapes) != 1:
        raise CalibrationError(f"images can only feed a model with one input; this one has {', '.join(shapes)}",
                               "pass an .npz file with one array per input name")
    name, shape = next(iter(shapes.items()))
    if layout not in ("auto", "nchw", "nhwc"):
        raise CalibrationError(f"unknown layout '{layout}'", "use auto, nchw or nhwc")
    if channel_order not in ("rgb", "bgr"):
        raise CalibrationError(f"unknown channel order '{channel_order}'", "use rgb or bgr")
    if len(shape) != 4:
        raise CalibrationError(f"input '{name}' has shape {shape}, not an image batch", "pass an .npy/.npz file instead")
    if layout == "auto":
        layout = image_layout(shape)
    c = shape[1] if layout == "nchw" else shape[3]
    hw = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    if c not in (1, 3):
        raise CalibrationError(f"input '{name}' has {c} channels in {layout} layout, not 1 or 3",
                               "check --layout, or pass an .npy/.npz file")
    size = tuple(image_size) if image_size else hw
    if size != hw:
        raise CalibrationError(f"--image-size {size[0]}x{size[1]} differs from the model's input {hw[0]}x{hw[1]}",
                               "use the model's input size (or pin it with --input-shape)")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(f"no images in {path}", f"put {', '.join(sorted(IMAGE_SUFFIXES))} files there")
    m, s = _pair(mean, c, "mean"), _pair(std, c, "std")
    out = np.empty((len(files), c, *hw), np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((hw[1], hw[0]), Image.BILINEAR)
                a = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read image {f} ({type(exc).__name__})", "remove or replace the file") from None
        a = a[None] if c == 1 else a.transpose(2, 0, 1)
        if c == 3 and channel_order == "bgr":
            a = a[::-1]
        if m is not None:
            a = a - m[:, None, None]
        if s is not None:
            a = a / s[:, None, None]
        out[i] = a
    if layout == "nhwc":
        out = np.ascontiguousarray(out.transpose(0, 2, 3, 1))
    return {name: out}, f"{len(files)} images from {path}"


def load_calibration(source: str | os.PathLike | None, model: Model, *, samples: int | None = None, seed: int = 0,
                     image_size: tuple[int, int] | None = None, mean: float | Sequence[float] | None = None,
                     std: float | Sequence[float] | None = None, channel_order: str = "rgb",
                     layout: str = "auto") -> CalibData:
    """Calibration inputs for ``model`` (see the module doc); ``samples`` keeps the first N."""
    if samples is not None and samples < 1:
        raise CalibrationError(f"--samples must be at least 1, got {samples}", "pass a positive number")
    if source is None:
        from archpass.model import random_inputs

        n = samples or DEFAULT_RANDOM_SAMPLES
        arrays = random_inputs(model.proto, model.input_shapes, n, np.random.default_rng(seed))
        return CalibData(arrays, True, f"{n} random samples (seed {seed}: standard normal, "
                                       f"ids within the tables they index)")
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}", "check the path")
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        arrays, desc = _from_arrays(path, model)
    elif path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        arrays, desc = _from_images(path, model, image_size, mean, std, channel_order, layout)
    else:
        raise CalibrationError(f"unknown calibration data format: {path}",
                               "pass an .npy/.npz file, an image, or a folder of images")
    counts = {len(a) for a in arrays.values()}
    if len(counts) > 1:
        raise CalibrationError(f"{path}: inputs have different sample counts {sorted(counts)}", "give every input N samples")
    if samples is not None:
        arrays = {k: v[:samples] for k, v in arrays.items()}
    return CalibData(arrays, False, desc)
