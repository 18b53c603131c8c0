"""Estimate a model's latency and memory on a target from its shapes alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from archpass.costmodel.extrapolation import extrapolation_notes
from archpass.costmodel.features import feature_rows, network_context
from archpass.costmodel.kernels import LAYER_KINDS, Kernel, decompose
from archpass.costmodel.memory import memory
from archpass.costmodel.target import Target, load_target
from archpass.structure import Structure

GENERIC_OP = "op"  # predictor fitted on every standalone op: used for kinds never measured


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
    if kind in LAYER_KINDS:
        if kind in target.predictors:
            return kind
        return "conv" if "conv" in target.predictors else None
    if kind in target.predictors:
        return kind
    return GENERIC_OP if GENERIC_OP in target.predictors else None


def predict_kernels(kernels: list[Kernel], target: Target) -> tuple[np.ndarray, list[str | None]]:
    """Predicted latency (ms) of each kernel, and the predictor that scored it.

    ``kernels`` is a whole network: predictors of runtime targets read its size."""
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


def estimate(structure: Structure, target: Target | str, *, best_order: bool = True) -> Estimate:
    """Latency (sum of predicted kernel latencies), parameter and peak activation memory.

    ``best_order`` also searches execution orders for a lower activation peak (a few ms
    on large graphs; the search can turn it off)."""
    t = load_target(target) if not isinstance(target, Target) else target
    kernels = decompose(structure, t.fusion)
    lat, used = predict_kernels(kernels, t)
    notes = []
    missing = sorted({k.kind for k, u in zip(kernels, used) if u is None})
    if missing:
        notes.append(f"no predictor for kernel kinds {', '.join(missing)} on target {t.name}: counted as 0 ms")
    fallback = sorted({k.kind for k, u in zip(kernels, used) if k.kind in LAYER_KINDS and u is not None and u != k.kind})
    if fallback:
        notes.append(f"kernel kinds {', '.join(fallback)} were never measured on {t.name}; scored by a generic predictor")
    notes += extrapolation_notes(kernels, used, t)
    mem = memory(structure, t.bytes_per_element, best_order=best_order)
    return Estimate(
        target=t.name,
        latency_ms=float(lat.sum()),
        params_bytes=mem.params_bytes,
        peak_activation_bytes=mem.peak_activation_bytes,
        best_order_peak_activation_bytes=mem.best_order_peak_bytes,
        macs=int(sum(l.macs for l in structure.layers)),
        kernels=tuple(KernelEstimate(k, float(v), u) for k, v, u in zip(kernels, lat, used)),
        notes=tuple(notes),
    )
