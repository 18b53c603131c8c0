"""A small MobileNetV2 trained on scikit-learn's digits, for post-training accuracy checks.

``digits_model()`` trains (once; cached on disk) a torchvision MobileNetV2 at width 0.5 on
the 8x8 ``load_digits`` images upsampled to 32x32 (grey replicated to 3 channels,
normalized to mean 0.5 / std 0.5), exports it to ONNX (opset 17, batch 1) and returns:

* ``onnx``: the model's path (input ``input`` 1x3x32x32, output ``output`` 1x10 logits);
* ``calib``: 512 calibration inputs made from 128 training images by shifting (up to
  2 px) and flipping them, as issue 8 describes its measurement;
* ``test_x``/``test_y``: the held-out test set (30% of the 1797 images, never trained on);
* ``accuracy``: the exported model's test accuracy measured with onnxruntime.

torch, torchvision and scikit-learn are needed only here (the ``bench`` extra).  The
cache lives in ``$ARCHPASS_BENCH_CACHE`` (default ``benchmarks/.cache``), keyed by the
seed and the torch version; files are written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
EPOCHS = 40
CALIB_BASE, CALIB_SAMPLES = 128, 512
SIZE = 32


@dataclass(frozen=True)
class Digits:
    onnx: Path
    calib: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    accuracy: float
    input_name: str = "input"


def cache_dir() -> Path:
    env = os.environ.get("ARCHPASS_BENCH_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent / ".cache"


def _images() -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x = zoom(x, (1, SIZE / 8, SIZE / 8), order=1).clip(0, 1)
    x = (x - 0.5) / 0.5
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32), d.target.astype(np.int64)


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(n)
    n_test = int(round(0.3 * n))
    return perm[n_test:], perm[:n_test]


def shift_flip(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` images from ``x`` (N,C,H,W): the originals, then random shifts of up to 2 px
    (background filled), half of them also flipped horizontally."""
    rng = np.random.default_rng(seed)
    bg = x.min()
    out = np.empty((count,) + x.shape[1:], np.float32)
    for i in range(count):
        img = x[i % len(x)]
        if i >= len(x):
            dy, dx = rng.integers(-2, 3, size=2)
            img = np.roll(img, (dy, dx), axis=(1, 2))
            if dy > 0:
                img[:, :dy] = bg
            elif dy < 0:
                img[:, dy:] = bg
            if dx > 0:
                img[:, :, :dx] = bg
            elif dx < 0:
                img[:, :, dx:] = bg
            if rng.random() < 0.5:
                img = img[:, :, ::-1]
        out[i] = img
    return out


def _train(x: np.ndarray, y: np.ndarray, log) -> object:
    import torch
    import torchvision

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # small tensors: more threads only spin (30x slower measured on a loaded host)
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5, num_classes=10)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=EPOCHS * ((len(x) + 63) // 64))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(SEED)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))  # shift augmentation
            xb = torch.roll(xb, (dy, dx), dims=(2, 3)).contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            log(f"digits: epoch {epoch + 1}/{EPOCHS} loss {total / len(x):.4f}")
    return model.to(memory_format=torch.contiguous_format).eval()


def _export(model, path: Path) -> None:
    import tempfile
    import warnings

    import torch

    fd, tmp = tempfile.mkstemp(prefix=".digits.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), tmp, opset_version=17, dynamo=False,
                              input_names=["input"], output_names=["output"])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def accuracy(model_path_or_proto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier (batch-1 input) on ``x``, with onnxruntime."""
    import onnx

    from archpass.search.runner import Runner

    proto = model_path_or_proto if isinstance(model_path_or_proto, onnx.ModelProto) else onnx.load(str(model_path_or_proto))
    out = Runner(proto).run({proto.graph.input[0].name: x})[0]
    return float((out.reshape(len(x), -1).argmax(1) == y).mean())


def digits_model(log=print) -> Digits:
    import torch

    root = cache_dir() / f"digits-seed{SEED}-e{EPOCHS}-torch{torch.__version__.replace('+', '_')}"
    path, data, meta = root / "model.onnx", root / "data.npz", root / "meta.json"
    if not (path.exists() and data.exists() and meta.exists()):
        root.mkdir(parents=True, exist_ok=True)
        x, y = _images()
        tr, te = _split(len(x))
        log(f"digits: training MobileNetV2 x0.5 on {len(tr)} images ({EPOCHS} epochs, CPU)")
        model = _train(x[tr], y[tr], log)
        _export(model, path)
        calib = shift_flip(x[tr[:CALIB_BASE]], CALIB_SAMPLES, SEED + 1)
        from archpass.model import atomic_write_text

        tmp = root / ".data.tmp.npz"
        np.savez(tmp, calib=calib, test_x=x[te], test_y=y[te])
        os.replace(tmp, data)
        acc = accuracy(path, x[te], y[te])
        atomic_write_text(meta, json.dumps({"test_accuracy": acc, "train": len(tr), "test": len(te)}) + "\n")
    d = np.load(data)
    acc = json.loads(meta.read_text())["test_accuracy"]
    return Digits(path, d["calib"], d["test_x"], d["test_y"], acc)


if __name__ == "__main__":
    m = digits_model()
    print(m.onnx, f"test accuracy {m.accuracy:.4f}", m.calib.shape, m.test_x.shape)
