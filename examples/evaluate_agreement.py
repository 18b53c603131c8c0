"""An evaluator for ``archpass optimize --evaluator``: top-1 agreement with the original.

    python examples/evaluate_agreement.py CANDIDATE.onnx [--reference examples/mobilenet_v2.onnx]
                                          [--samples 64] [--seed 0]

Runs the candidate and the reference model in onnxruntime on the same seeded inputs
(standard-normal images; a candidate at another input resolution gets each image resized
bilinearly to its size) and prints, as its last line of stdout, a JSON object::

    {"agreement": 0.953, "raw_agreement": 1.0, "samples": 64}

``agreement`` is the share of inputs on which both models pick the same class: a real
metric of how much a rewrite changed the model, with no data set needed.  The class is
the argmax after each class's logit is standardized over the batch (the class an input
raises most above its usual level): the bundled example has random weights, and its raw
logits are nearly the same for every input (the raw argmax picks one class for all of
them, so ``raw_agreement``, the plain argmax, is kept only for trained models).  Replace it
with your own fine-tune and evaluation; archpass only reads the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _resize(batch: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an NCHW batch (align_corners=False), numpy only."""
    n, c, h, w = batch.shape
    if (h, w) == hw:
        return batch

    def axis(src: int, dst: int):
        x = (np.arange(dst) + 0.5) * src / dst - 0.5
        x = np.clip(x, 0, src - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (x - lo).astype(batch.dtype)

    y0, y1, fy = axis(h, hw[0])
    x0, x1, fx = axis(w, hw[1])
    top = batch[:, :, y0][:, :, :, x0] * (1 - fx) + batch[:, :, y0][:, :, :, x1] * fx
    bot = batch[:, :, y1][:, :, :, x0] * (1 - fx) + batch[:, :, y1][:, :, :, x1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


def _logits(session, images: np.ndarray) -> np.ndarray:
    inp = session.get_inputs()[0]
    shape = inp.shape
    hw = (int(shape[2]), int(shape[3]))
    images = _resize(images, hw).astype(np.float32)
    batch = shape[0] if isinstance(shape[0], int) else None
    outs = []
    step = batch or len(images)
    for i in range(0, len(images), step):
        out = session.run(None, {inp.name: images[i:i + step]})[0]
        outs.append(out.reshape(out.shape[0], -1).astype(np.float64))
    return np.concatenate(outs)


def _standardized_top1(logits: np.ndarray) -> np.ndarray:
    """Argmax after z-scoring each class's logit over the batch: the class this input
    raises most above its usual level."""
    z = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-30)
    return z.argmax(axis=1)


def agreement(candidate: Path, reference: Path, samples: int = 64, seed: int = 0) -> dict[str, float]:
    """``agreement`` (standardized top-1) and ``raw_agreement`` (plain argmax) of the two models."""
    ref = _session(reference)
    shape = ref.get_inputs()[0].shape
    images = np.random.default_rng(seed).standard_normal((samples, int(shape[1]), int(shape[2]), int(shape[3])),
                                                         dtype=np.float32)
    a, b = _logits(_session(candidate), images), _logits(ref, images)
    return {"agreement": float(np.mean(_standardized_top1(a) == _standardized_top1(b))),
            "raw_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--reference", type=Path, default=HERE / "mobilenet_v2.onnx")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in (args.candidate, args.reference):
        if not p.is_file():
            print(f"evaluate_agreement: no such model: {p}", file=sys.stderr)
            return 2
    values = agreement(args.candidate, args.reference, args.samples, args.seed)
    print(f"candidate {args.candidate.name}: top-1 agreement {values['agreement']:.3f} "
          f"(raw argmax {values['raw_agreement']:.3f}) on {args.samples} seeded inputs", file=sys.stderr)
    print(json.dumps({**{k: round(v, 6) for k, v in values.items()}, "samples": args.samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
