"""Estimate a model's latency and memory on a target from its shapes alone."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from archpass.costmodel.extrapolation import FAR, extrapolation_notes
from archpass.costmodel.features import correction_rows, feature_rows, network_context, residual_rows
from archpass.costmodel.host import host_notes
from archpass.costmodel.kernels import GENERIC_OP, LAYER_KINDS, Kernel, decompose
from archpass.costmodel.memory import memory
from archpass.costmodel.target import Target, load_target
from archpass.structure import Structure, macs_text

#: the least share of a kernel's time that taking out profiler bookkeeping leaves it
MIN_KERNEL_SHARE = 0.2


@dataclass(frozen=True)
class KernelEstimate:
    kernel: Kernel
    latency_ms: float
    predictor: str | None

    def to_json(self) -> dict:
        d = self.kernel.to_json()
        d["latency_ms"] = self.latency_ms
        d["predictor"] = self.predictor
        return d


@dataclass(frozen=True)
class Estimate:
    target: str
    latency_ms: float
    params_bytes: int
    peak_activation_bytes: int
    best_order_peak_activation_bytes: int | None
    macs: int
    kernels: tuple[KernelEstimate, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "latency_ms": self.latency_ms,
            "params_bytes": self.params_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "best_order_peak_activation_bytes": self.best_order_peak_activation_bytes,
            "macs": self.macs,
            "kernels": [k.to_json() for k in self.kernels],
            "notes": list(self.notes),
        }


def predictor_for(kind: str, target: Target) -> str | None:
    """Layer kinds have their own predictor (a missing one falls back to ``conv``);
    standalone ops share one (their op type is a feature)."""
    if target.prior is not None:
        return predictor_for(kind, target.prior)
    if kind in LAYER_KINDS:
        if kind in target.predictors:
            return kind
        return "conv" if "conv" in target.predictors else None
    if kind in target.predictors:
        return kind
    return GENERIC_OP if GENERIC_OP in target.predictors else None


def correction_for(kind: str, target: Target):
    """An adapted target's correction for a kernel kind: its own, else the one pooled over
    layer kinds (``layer``) or standalone ops (``op``); None leaves the prior's prediction."""
    c = target.corrections
    if kind in LAYER_KINDS:
        return c.get(kind) or c.get("layer")
    return c.get(GENERIC_OP)


def transferred_prior(target: Target) -> Target:
    """An adapted target's prior with the adapted target's hardware (array, unroll,
    memory width, element size): the prior's model of a device, applied to the new one."""
    return replace(target.prior, parallelism=target.parallelism, unroll=target.unroll,
                   mem_bits_per_step=target.mem_bits_per_step, bytes_per_element=target.bytes_per_element,
                   dtype=target.dtype)


def corrected(kernels: list[Kernel], target: Target, prior_ms: np.ndarray,
              transfer_ms: np.ndarray | None = None) -> np.ndarray:
    """The prior's per-kernel latencies with the adapted target's corrections applied
    (``transfer_ms``: the prior's predictions on the adapted hardware, which corrections
    with ``transfer`` correct)."""
    prior = np.asarray(prior_ms, dtype=np.float64)
    out = prior.copy()
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, k in enumerate(kernels):
        c = correction_for(k.kind, target)
        if c is not None:
            groups.setdefault(id(c), (c, []))[1].append(i)
    for c, idx in groups.values():
        ks = [kernels[i] for i in idx]
        ref_ms = prior[idx]
        if c.transfer:
            if transfer_ms is None:
                transfer_ms = _predict(kernels, transferred_prior(target))[0]
            ref_ms = np.asarray(transfer_ms, dtype=np.float64)[idx]
        z = correction_rows(ks, target, ref_ms)
        ref = c.reference(ref_ms, feature_rows(ks, target)[1] if c.baseline else None)
        trees = c.tree_factor(residual_rows(ks, target, ref_ms)) if c.trees else 1.0
        v = ref * c.factor(z) * trees
        out[idx] = np.maximum(v + c.add_ms, MIN_KERNEL_SHARE * v)  # add_ms < 0: profiler bookkeeping taken out
    return out


def _root(target: Target) -> Target:
    """The target an adapted target was first calibrated as (its predictors' ranges)."""
    while target.prior is not None:
        target = target.prior
    return target


def _near_square(n: int) -> tuple[int, int]:
    h = int(np.sqrt(n))
    while n % h:
        h -= 1
    return (n // h, h)


def pointwise_equivalents(kernels: list[Kernel], target: Target) -> list[Kernel]:
    """``kernels`` with each Gemm/MatMul over many positions (a Linear over the H x W
    positions of an image, or over tokens) replaced by the 1x1 conv over those positions,
    the same matrix product, wherever the target's gemm predictor was fitted on far fewer
    rows (calibration samples classifier Gemms: one row) and a conv predictor exists.  A
    gemm predictor asked for 3136 rows extrapolates from one-row, weight-bound products
    (ConvNeXt-T on ``cpu``: 970 ms predicted, 110 ms measured); pointwise convs over
    thousands of positions are what calibration measured most."""
    root = _root(target)
    if "conv" not in root.predictors:
        return kernels
    gemm = root.predictors.get("gemm")
    hi = (((gemm.stats or {}).get("range") or {}).get("out_pixels") or [1, 1])[1] if gemm is not None else 1
    out = []
    for k in kernels:
        rows = k.out_hw[0] * k.out_hw[1]
        if k.kind == "gemm" and rows > FAR * max(hi, 1):
            hw = k.out_hw if min(k.out_hw) > 1 else _near_square(rows)
            k = replace(k, kind="conv", op="Conv", kernel=(1, 1), stride=(1, 1), groups=1, in_hw=hw, out_hw=hw)
        out.append(k)
    return out


def predict_kernels(kernels: list[Kernel], target: Target) -> tuple[np.ndarray, list[str | None]]:
    """Predicted latency (ms) of each kernel, and the predictor that scored it.

    ``kernels`` is a whole network: predictors of runtime targets read its size.  An
    adapted target corrects its prior's predictions (:func:`corrected`).  A Gemm over
    many positions is predicted as its pointwise conv (:func:`pointwise_equivalents`)."""
    return _predict(pointwise_equivalents(kernels, target), target)


def _predict(kernels: list[Kernel], target: Target) -> tuple[np.ndarray, list[str | None]]:
    """:func:`predict_kernels` of kernels already mapped by :func:`pointwise_equivalents`."""
    if target.prior is not None:
        prior_ms, used = _predict(kernels, target.prior)
        return corrected(kernels, target, prior_ms), used
    out = np.zeros(len(kernels))
    context = None
    used: list[str | None] = [None] * len(kernels)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kernels):
        p = predictor_for(k.kind, target)
        used[i] = p
        if p is not None:
            groups.setdefault(p, []).append(i)
    for p, idx in groups.items():
        ks = [kernels[i] for i in idx]
        pred = target.predictors[p]
        if pred.layer != (ks[0].kind in LAYER_KINDS):
            continue
        if pred.context and context is None:
            context = network_context(kernels, target.bytes_per_element, target.parallelism)
        x, base = feature_rows(ks, target, context if pred.context else None)
        out[idx] = pred.predict(x, base)
    return out, used


#: the share of a model's MACs outside layers from which an estimate says so
OTHER_COMPUTE_NOTE_SHARE = 0.01


def other_compute_note(structure: Structure, t: Target) -> str | None:
    """What an estimate leaves out: the MACs of nodes that are not layers (a video
    network's 3-D convs, attention's MatMuls or Einsums; ``Structure.other_compute``)
    once they are at least 1% of the model's, and how ``t`` counts them."""
    other = structure.other_compute
    total = structure.macs
    if not other or total <= 0 or structure.other_macs < OTHER_COMPUTE_NOTE_SHARE * total:
        return None
    kinds: dict[str, int] = {}
    for c in other:
        kinds[c.what] = kinds.get(c.what, 0) + 1
    what = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    how = ("leaves them out of its latency (it times conv and gemm layers only)" if t.fusion.layers_only else
           "predicts them as generic ops from their tensor sizes, not their MACs, so its latency for them is rough")
    n = structure.other_macs
    return (f"{100 * n / total:.1f}% of the model's MACs ({macs_text(n)}) are "
            f"in nodes that are not layers ({what}): target {t.name} {how}; no pass rewrites them")


def estimate(structure: Structure, target: Target | str, *, best_order: bool = True) -> Estimate:
    """Latency (sum of predicted kernel latencies), parameter and peak activation memory.

    ``best_order`` also searches execution orders for a lower activation peak (a few ms
    on large graphs; the search can turn it off)."""
    t = load_target(target) if not isinstance(target, Target) else target
    kernels = pointwise_equivalents(decompose(structure, t.fusion), t)
    lat, used = _predict(kernels, t)
    notes = []
    missing = sorted({k.kind for k, u in zip(kernels, used) if u is None})
    if missing:
        notes.append(f"no predictor for kernel kinds {', '.join(missing)} on target {t.name}: counted as 0 ms")
    fallback = sorted({k.kind for k, u in zip(kernels, used) if k.kind in LAYER_KINDS and u is not None and u != k.kind})
    if fallback:
        notes.append(f"kernel kinds {', '.join(fallback)} were never measured on {t.name}; scored by a generic predictor")
    notes += extrapolation_notes(kernels, used, _root(t))  # an adapted target was calibrated where its first prior was
    note = other_compute_note(structure, t)
    if note:
        notes.append(note)
    notes += host_notes(t)
    mem = memory(structure, t.bytes_per_element, best_order=best_order)
    return Estimate(
        target=t.name,
        latency_ms=float(lat.sum()),
        params_bytes=mem.params_bytes,
        peak_activation_bytes=mem.peak_activation_bytes,
        best_order_peak_activation_bytes=mem.best_order_peak_bytes,
        macs=int(structure.macs),
        kernels=tuple(KernelEstimate(k, float(v), u) for k, v, u in zip(kernels, lat, used)),
        notes=tuple(notes),
    )
