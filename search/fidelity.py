"""Fidelity: how close a rewritten model stays to the original on calibration data.

Post-training mode (the user deploys the rewritten weights) uses fidelity as the
accuracy proxy, after weight recovery (:mod:`archpass.search.recover`); retrain mode
uses the zero-shot trainability score (:mod:`archpass.search.zeroshot`).

Per output (samples along axis 0):

* ``cosine``: cosine similarity of each sample's flattened output, averaged over samples;
* ``snr_db``: ``10 log10(sum ref^2 / sum (cand - ref)^2)`` over all samples (capped at
  ``SNR_CAP_DB`` for identical outputs);
* ``max_abs_error``;
* ``top1_agreement`` for classifier-shaped outputs (one non-batch axis of length >= 2):
  the share of samples whose arg-max class is the same.

**The fidelity score** is the worst output's share of signal energy,
``1 / (1 + 10^(-snr_db/10)) = sum ref^2 / (sum ref^2 + sum err^2)``: 1.0 for identical
outputs (exact rewrites score 1 to float tolerance), 0.5 when the error is as large as
the signal, 0.99 at 20 dB, 0.999 at 30 dB.  It is continuous (a lossy rewrite scores
below 1 even when every top-1 class survives) and in [0, 1], so the search can bound it.

:class:`FidelityEvaluator` is what the search calls for every candidate: it runs the
original once, keeps its outputs and (lazily) the activation rows recovery needs,
materializes each candidate's ONNX once and recovers only the layers the recipe touched.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import onnx

from archpass.model import Model
from archpass.recipe import Recipe
from archpass.search.calib import CalibData, load_calibration
from archpass.search.recover import LayerFit, ReferenceRows, recover
from archpass.search.runner import Runner
from archpass.search.zeroshot import trainability
from archpass.structure import Structure

__all__ = ["CalibData", "load_calibration", "OutputFidelity", "Fidelity", "fidelity", "compare",
           "FidelityEvaluator", "Evaluation", "trainability", "RANDOM_DATA_NOTE",
           "split_calibration", "IN_SAMPLE_NOTE"]

SNR_CAP_DB = 300.0
RANDOM_DATA_NOTE = ("fidelity was measured on random inputs, a weak proxy for accuracy; "
                    "pass --calib with real samples")


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    snr_db: float
    max_abs_error: float
    top1_agreement: float | None

    @property
    def score(self) -> float:
        return 1.0 / (1.0 + 10.0 ** (-self.snr_db / 10.0))

    def to_json(self) -> dict:
        return {"name": self.name, "score": self.score, "cosine": self.cosine, "snr_db": self.snr_db,
                "max_abs_error": self.max_abs_error, "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class Fidelity:
    score: float
    outputs: tuple[OutputFidelity, ...]
    random_data: bool
    samples: int
    notes: tuple[str, ...] = ()  # e.g. the reference does not depend on its inputs (constant_output_notes)

    def to_json(self) -> dict:
        return {"score": self.score, "samples": self.samples, "random_data": self.random_data,
                "outputs": [o.to_json() for o in self.outputs]}


def output_fidelity(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputFidelity:
    """The metrics of one output (see the module doc)."""
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"output '{name}': shapes {ref.shape} and {cand.shape} differ")
    n = ref.shape[0] if ref.ndim else 1
    r, c = ref.reshape(n, -1), cand.reshape(n, -1)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    dots = np.sum(r * c, axis=1)
    cos = np.where((nr == 0) & (nc == 0), 1.0, dots / np.maximum(nr * nc, 1e-300))
    err = float(np.sum((c - r) ** 2))
    sig = float(np.sum(r ** 2))
    if err == 0.0:
        snr = SNR_CAP_DB
    elif sig == 0.0:
        snr = -SNR_CAP_DB
    else:
        snr = float(np.clip(10.0 * math.log10(sig / err), -SNR_CAP_DB, SNR_CAP_DB))
    classes = [d for d in ref.shape[1:] if d > 1]
    top1 = float(np.mean(r.argmax(1) == c.argmax(1))) if len(classes) == 1 and classes[0] >= 2 else None
    return OutputFidelity(name, float(np.mean(cos)), snr, float(np.max(np.abs(c - r))) if r.size else 0.0, top1)


#: an output whose spread across samples is below this share of its size barely depends on
#: them: fidelity, which compares whole outputs, is then near 1 for any candidate that keeps
#: the constant part (a random-weight keyword-spotting net varied by 2e-4 of its size, and a
#: candidate that kept none of the varying part scored 0.99999995)
CONSTANT_OUTPUT_SPREAD = 0.01


#: a tensor the post-processing reads with at most this many values per sample is a size
SIZE_ELEMENTS = 16


def constant_output_notes(reference: Sequence[np.ndarray], names: Sequence[str]) -> tuple[str, ...]:
    """A note for each reference output that (nearly) does not depend on the calibration
    samples (a broken export, weights that were never trained, inputs all alike): fidelity
    to it cannot tell a candidate that keeps the model's function from one that loses it."""
    notes = []
    for name, r in zip(names, reference):
        r = np.asarray(r, np.float64)
        if r.ndim == 0 or r.shape[0] < 2 or not r.size:
            continue
        spread = float(np.mean(np.std(r, axis=0)))
        size = float(np.mean(np.abs(r)))
        if size == 0.0 or spread <= 1e-6 * size:
            how = "is the same for all" if size else "is all zeros for all"
            notes.append(f"the original model's output '{name}' {how} {r.shape[0]} calibration samples, so fidelity "
                         "cannot tell candidates apart: check the calibration data (are the samples alike?) and the "
                         "model's weights (trained?)")
        elif spread < CONSTANT_OUTPUT_SPREAD * size:
            notes.append(f"the original model's output '{name}' varies across the {r.shape[0]} calibration samples by "
                         f"only {spread / size:.1g} of its size, so fidelity, which compares whole outputs, is near 1 "
                         "for any candidate that keeps the constant part: check the calibration data (are the samples "
                         "alike?) and the model's weights (trained?)")
    return tuple(notes)


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str] | None = None,
            *, random_data: bool = False) -> Fidelity:
    """Fidelity of ``candidate`` outputs to ``reference`` outputs (same order)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidate outputs")
    names = list(names) if names is not None else [f"output{i}" for i in range(len(reference))]
    outs = tuple(output_fidelity(nm, r, c) for nm, r, c in zip(names, reference, candidate))
    score = min((o.score for o in outs), default=1.0)
    return Fidelity(score, outs, random_data, int(len(reference[0])) if reference else 0)


# ---------------------------------------------------------------------------- running models
def _proto(m) -> onnx.ModelProto:
    if isinstance(m, Model):
        return m.proto
    if isinstance(m, onnx.ModelProto):
        return m
    if isinstance(m, (str, os.PathLike)):
        from archpass.model import load_model

        return load_model(m).proto
    raise TypeError(f"expected a Model, ModelProto or path, got {type(m).__name__}")


def input_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {t.name for t in proto.graph.initializer}
    return {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in proto.graph.input if i.name not in inits}


def feeds_for(proto: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` fitted to ``proto``'s inputs: an image batch whose model input has another
    height/width (a ``resolution`` rewrite) is resized bilinearly, and each array is cast to
    its input's dtype (float16 for a half-precision export)."""
    from scipy.ndimage import zoom

    from archpass.errors import CalibrationError
    from archpass.model import typed_feeds

    out = {}
    for name, shape in input_shapes(proto).items():
        if name not in arrays:
            raise CalibrationError(f"no calibration data for input '{name}' (have {', '.join(arrays)})",
                                   "pass data with one array per input name")
        a = arrays[name]
        if tuple(a.shape[1:]) != tuple(shape[1:]):
            # a resolution rewrite changed two axes, height and width, wherever the layout puts them
            # (NCHW, or NHWC where a Transpose makes it NCHW), and kept the channels
            if a.ndim == 4 and len(shape) == 4 and sum(x != y for x, y in zip(a.shape[1:], shape[1:])) <= 2:
                a = zoom(a, (1, *(t / x for x, t in zip(a.shape[1:], shape[1:]))), order=1).astype(np.float32)
                a = a[:, :shape[1], :shape[2], :shape[3]]
            else:
                raise CalibrationError(f"calibration array for input '{name}' has shape {a.shape[1:]} per sample, "
                                       f"the model expects {tuple(shape[1:])}", "pass data made for this model")
        out[name] = a
    return typed_feeds(proto, out)


def fidelity(reference, candidate, data: CalibData) -> Fidelity:
    """Compare two models on ``data``: ``reference`` is a Model, ModelProto, path, or the
    reference outputs already computed (a list of arrays); ``candidate`` a model."""
    cand = _proto(candidate)
    names = [o.name for o in cand.graph.output]
    given = isinstance(reference, (list, tuple)) and all(isinstance(r, np.ndarray) for r in reference)
    if given:
        ref_out = list(reference)
    else:
        ref = _proto(reference)
        ref_out = Runner(ref).run(feeds_for(ref, data.arrays))
        names = [o.name for o in ref.graph.output]
    cand_out = Runner(cand).run(feeds_for(cand, data.arrays))
    if len(cand_out) != len(ref_out) or any(a.shape != b.shape for a, b in zip(cand_out, ref_out)):
        from archpass.errors import ArchpassError

        raise ArchpassError(f"the models' outputs differ: {[tuple(a.shape[1:]) for a in ref_out]} vs "
                            f"{[tuple(b.shape[1:]) for b in cand_out]} per sample",
                            "compare a model with a rewrite of it")
    fid = compare(ref_out, cand_out, names, random_data=data.random)
    # a caller that passes the reference outputs made them once, and their notes with them
    # (FidelityEvaluator.notes); here only when the reference was run here
    return fid if given else replace(fid, notes=constant_output_notes(ref_out, names))


# ---------------------------------------------------------------------------- per-candidate evaluation
@dataclass(frozen=True)
class Evaluation:
    recipe: Recipe
    before: Fidelity
    after: Fidelity | None  # None when nothing was recovered (exact recipe, or recover=False)
    proto: onnx.ModelProto = field(repr=False)  # the (recovered) candidate, with the archpass record
    fits: tuple[LayerFit, ...] = ()
    seconds: float = 0.0
    applied: object = field(default=None, repr=False, compare=False)  # the engine's Applied (plan, record entries)

    @property
    def fidelity(self) -> Fidelity:
        return self.after or self.before

    def to_json(self) -> dict:
        return {"before": self.before.to_json(), "after": self.after.to_json() if self.after else None,
                "recovered_layers": [f.to_json() for f in self.fits], "seconds": self.seconds}


RECOVERY_KEY = "archpass.recovery"
#: Share of the calibration samples held out from recovery to score candidates, and the
#: fewest samples for which a split is made (below it, recovery and scoring share every
#: sample and the score after recovery is optimistic: reports say so).
HOLDOUT_SHARE = 0.25
MIN_SPLIT_SAMPLES = 16
IN_SAMPLE_NOTE = (f"fewer than {MIN_SPLIT_SAMPLES} calibration samples: fidelity after recovery was measured on the "
                  "samples the weights were fitted to and is optimistic; pass more samples")


def split_calibration(data: CalibData, seed: int = 0) -> tuple[CalibData, CalibData]:
    """(fit, score): a seeded ``HOLDOUT_SHARE`` of the samples is kept for scoring only, so
    the fidelity after recovery measures generalization, not the fit.  With fewer than
    ``MIN_SPLIT_SAMPLES`` samples both are ``data`` itself."""
    n = data.samples
    if n < MIN_SPLIT_SAMPLES:
        return data, data
    k = max(1, int(round(n * HOLDOUT_SHARE)))
    perm = np.random.default_rng(seed).permutation(n)
    return data.take(np.sort(perm[k:])), data.take(np.sort(perm[:k]))


class FidelityEvaluator:
    """Built once per search (or per ``apply --calib``), reused for every candidate."""

    def __init__(self, model: Model, data: CalibData, *, structure: Structure | None = None, seed: int = 0):
        from archpass.analysis import analyze

        self.model = model
        self.data = data
        self.structure = structure if structure is not None else analyze(model)
        self.seed = seed
        self.names = [o.name for o in model.proto.graph.output]
        self.fit_data, self.score_data = split_calibration(data, seed)
        self.held_out = self.score_data is not self.fit_data
        self.feeds = feeds_for(model.proto, self.score_data.arrays)
        runner = Runner(model.proto)
        self.reference = runner.run(self.feeds)
        # sizes the network computes for a post-processing set aside (archpass.tail: a scale
        # factor, an image size) are the same for every sample by design: no note for them
        frontier = set(model.tail.frontier) if getattr(model, "tail", None) is not None else set()
        sizes = {n for n, r in zip(self.names, self.reference) if n in frontier and r[:1].size <= SIZE_ELEMENTS}
        self.notes = constant_output_notes([r for r, n in zip(self.reference, self.names) if n not in sizes],
                                           [n for n in self.names if n not in sizes])
        self.dynamic = runner.dynamic
        self._rows: dict[tuple, ReferenceRows] = {}

    def score(self, proto: onnx.ModelProto) -> Fidelity:
        """Fidelity of ``proto`` on the scoring samples (held out from recovery when there are enough)."""
        out = Runner(proto, dynamic=self.dynamic).run(feeds_for(proto, self.score_data.arrays))
        return compare(self.reference, out, self.names, random_data=self.data.random)

    def _reference_rows(self, recipe: Recipe, data: CalibData) -> ReferenceRows:
        """Recovery targets on ``data``: the original, or the original at the recipe's resolution."""
        res = tuple(r for r in recipe if r.pass_name == "resolution")
        key = (data is self.fit_data,) + tuple((r.site, tuple(r.choice.items())) for r in res)
        if key not in self._rows:
            if res:
                from archpass.passes.engine import apply_recipe

                proto = apply_recipe(self.model, Recipe(res), structure=self.structure).proto
            else:
                proto = self.model.proto
            self._rows[key] = ReferenceRows(proto, feeds_for(proto, data.arrays), dynamic=self.dynamic)
        return self._rows[key]

    def evaluate(self, recipe: Recipe, *, recover: bool = True, verify: bool = False,
                 allow_growth: bool = False, emit: bool = True) -> Evaluation:
        """Materialize ``recipe`` once, score it, recover the layers it touched (lossy
        rewrites only) and score again.  ``verify`` re-checks the emitted shapes (the
        engine's post-condition; ``apply`` keeps it, the search skips it).  ``emit=False``
        skips the refit on every sample when samples are held out (the score does not
        need it): the proto then carries the weights fitted without the held-out quarter,
        and its record says so (the search's guard, which refits only the candidate it emits)."""
        from archpass.passes.engine import apply_recipe

        t0 = time.perf_counter()
        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_json(recipe) if isinstance(recipe, dict) else Recipe.of(recipe)
        applied = apply_recipe(self.model, recipe, structure=self.structure, verify=verify, allow_growth=allow_growth)
        before = self.score(applied.proto)
        lossy = not all(r["exact"] for r in applied.rewrites)
        if not (recover and lossy):
            return Evaluation(recipe, before, None, applied.proto, (), time.perf_counter() - t0, applied)
        with _one_blas_thread():
            rec = _recover(applied, self._reference_rows(recipe, self.fit_data),
                           feeds_for(applied.proto, self.fit_data.arrays),
                           source=self.structure, seed=self.seed, dynamic=self.dynamic, with_outputs=not self.held_out)
            refit = any(f.kept == "refit" for f in rec.fits)
            if refit and self.held_out:
                # the score comes from the fit that never saw the scoring samples (a conservative
                # estimate, as cross-validation gives); the weights emitted are refitted on every sample
                after = self.score(rec.proto)
            if refit and self.held_out and emit:
                rec = _recover(applied, self._reference_rows(recipe, self.data),
                               feeds_for(applied.proto, self.data.arrays),
                               source=self.structure, seed=self.seed, dynamic=self.dynamic, with_outputs=False)
        proto = rec.proto
        if not refit:
            after = before
        elif not self.held_out:
            after = compare(self.reference, list(rec.outputs), self.names, random_data=self.data.random)
        entry = proto.metadata_props.add()
        entry.key, entry.value = RECOVERY_KEY, json.dumps({
            "calibration": self.data.source, "samples": self.data.samples, "random_data": self.data.random,
            "scored_samples": self.score_data.samples, "held_out": self.held_out,
            "fitted_on": "every sample" if emit or not self.held_out else "the samples not held out",
            "fidelity_before": before.score, "fidelity_after": after.score,
            "layers": [f.to_json() for f in rec.fits]}, separators=(",", ":"), default=_json_default)
        return Evaluation(recipe, before, after if refit else None, proto, rec.fits, time.perf_counter() - t0, applied)


def _one_blas_thread():
    """BLAS on one thread for the many small solves of recovery: on a loaded machine,
    OpenBLAS's worker threads spin against each other (ten times slower, measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


_recover = recover
