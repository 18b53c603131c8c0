"""Choosing the few measurements that tell the most (step 1 of
:mod:`archpass.costmodel.adapt`): the kernels that dominate the models the user cares
about (``--models``), then a spread over the shapes the passes produce: the
representatives of a k-means partition of a large sample in a log-feature space on the
new hardware (:func:`select_layers`, ZigZag), or generated whole networks chosen greedily
to cover kernel shapes, groupings, alignments and resolutions within the budget's seconds
of measurement (:func:`select_networks`, onnxruntime).
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Callable

import numpy as np

from archpass.costmodel.adapt_measure import Network, planned_network
from archpass.costmodel.calibrate import point_key
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.features import layer_features
from archpass.costmodel.kernels import CONV_KINDS, LAYER_KINDS, LAYOUT_FLAGS, FusionRules, Kernel, decompose
from archpass.costmodel.target import Target
from archpass.errors import TargetError

PLAN_FACTOR = 1.5  # networks planned for this many times the budget (planned costs are pessimistic)
BATCH = 12  # generated candidate networks per batch
PICKS_PER_BATCH = 6  # networks planned per batch at most (the greedy choice has twice the candidates)


def descriptor(kernels: list[Kernel], target: Target) -> np.ndarray:
    """Where layer kernels lie among the shapes passes produce, on ``target``'s hardware:
    log MACs, log compute steps, log memory traffic, utilization, kernel size, stride, kind."""
    rows = []
    for k in kernels:
        f, b = layer_features(k, target.parallelism, target.unroll, target.elem_bits, target.mem_bits_per_step)
        rows.append([np.log1p(f["macs"]), np.log1p(b["ideal"]), np.log1p(b["mem"]), 3 * f["util"],
                     np.log2(f["k"] + 1), f["stride"], np.log1p(f["cin"]), np.log1p(f["cout"]), np.log1p(f["out_hw"]),
                     4.0 * (k.kind == "dwconv"), 4.0 * (k.kind == "gemm")])
    x = np.asarray(rows, dtype=np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def representatives(x: np.ndarray, k: int, fixed: int = 0, iters: int = 25) -> list[int]:
    """``k`` indices of rows of ``x`` that spread over it like a k-means partition: the
    first ``fixed`` rows are kept as centres, the others are seeded farthest-first and moved
    to their cluster's mean; each free centre is then the member nearest its mean (typical
    shapes, not the extremes a pure farthest-point choice would pick)."""
    n = len(x)
    if n == 0 or k <= 0:
        return []
    k = min(k, n)
    chosen = list(range(min(fixed, k))) or [int(np.argmin(np.linalg.norm(x, axis=1)))]
    d = np.min(np.linalg.norm(x[:, None, :] - x[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < k:
        i = int(np.argmax(d))
        if d[i] <= 0:
            break
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(x - x[i], axis=1))
    centres = x[chosen].copy()
    nfix = min(fixed, k)
    for _ in range(iters):
        assign = np.argmin(np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=2), axis=1)
        moved = centres.copy()
        for c in range(nfix, len(centres)):
            members = x[assign == c]
            if len(members):
                moved[c] = members.mean(axis=0)
        if np.allclose(moved, centres):
            break
        centres = moved
    assign = np.argmin(np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=2), axis=1)
    out = chosen[:nfix]
    for c in range(nfix, len(centres)):
        members = np.flatnonzero(assign == c)
        if len(members):
            out.append(int(members[np.argmin(np.linalg.norm(x[members] - centres[c], axis=1))]))
    return list(dict.fromkeys(out))


def model_kernels(paths, fusion: FusionRules) -> list[list[Kernel]]:
    """The kernels of each ``--models`` file."""
    from archpass.analysis import analyze
    from archpass.model import load_model

    return [decompose(analyze(load_model(p)), fusion) for p in paths]


def dominant(kernels: list[Kernel], base: Target, share: float = 0.8) -> list[Kernel]:
    """The layer kernels that make up ``share`` of a model's predicted latency on ``base``."""
    lat, _ = predict_kernels(kernels, base)
    order = np.argsort(-lat)
    out, acc, total = [], 0.0, float(lat.sum()) or 1.0
    for i in order:
        if kernels[i].kind in LAYER_KINDS:
            out.append(kernels[i])
        acc += lat[i]
        if acc >= share * total:
            break
    return out


def select_layers(target: Target, base: Target, samples: int, seed: int = 0, models=()) -> list[dict]:
    """``samples`` layer specs: up to half from the layers that dominate ``models``, the rest
    representatives (:func:`representatives` on ``target``'s hardware) of a large sample
    of the shapes passes produce."""
    from archpass.costmodel.sampling import sample_layers

    picked: dict[str, dict] = {}
    for ks in model_kernels(models, base.fusion):
        for k in dominant(ks, base):
            spec = {**{f: v for f, v in k.spec().items() if f not in LAYOUT_FLAGS}, "in_from_op": False, "out_to_op": False}
            picked.setdefault(point_key(spec), spec)
    mine = list(picked.values())
    if len(mine) > samples // 2:  # spread the user's layers too
        x = descriptor([Kernel.from_spec(s) for s in mine], target)
        mine = [mine[i] for i in representatives(x, samples // 2)]
    pool = sample_layers(900, seed + 104729) + sample_layers(300, seed + 104729, any_size=True)
    everything = mine + pool
    x = descriptor([Kernel.from_spec(s) for s in everything], target)
    return [everything[i] for i in representatives(x, samples, fixed=len(mine))][:samples]


#: the rotation of generator styles (costmodel/chains.py ``BUILDERS``) the candidate
#: networks follow: families' stage plans (``template2``: SE blocks may start in the first,
#: expansion-1 block), freely drawn networks, and one in six each of
#: RegNet/ResNeXt-like grouped networks (grouped convs with many groups, which onnxruntime
#: runs group by group, are rare in the other styles) and ShuffleNetV2-like networks
#: (splits, concats and channel shuffles between most convs: a network of mostly small
#: data-movement kernels, which the other styles have a few of at most)
STYLES = ("template2", "network", "grouped", "template2", "network", "shuffle")


def group_bucket(k: Kernel) -> int:
    """Which grouping a conv kernel has, for the plan's coverage cells: 0 dense (and every
    other kernel), then one bucket per factor 4 of groups (2-3, 4-15, 16-63, 64-255...)."""
    if k.kind != "conv" or k.groups <= 1:
        return 0
    return 1 + int(math.log2(k.groups)) // 2


#: output heights where a conv's resolution class starts (below 8 px, 8-27, 28-55, 56-111, 112 and more)
RESOLUTION_CLASSES = (8, 28, 56, 112)


def coverage_cell(k: Kernel, parallelism: int) -> tuple:
    """The coverage cell of a kernel in the adaptation's plan: kind, kernel size (or op),
    stride, grouping (:func:`group_bucket`), log2 MACs (or output elements), and for convs
    whether the channels are multiples of the target's parallelism (a CPU runs unaligned
    ones outside its blocked layout, up to 9x slower for a depthwise conv), the output
    resolution class (:data:`RESOLUTION_CLASSES`: how a conv splits over threads) and
    whether the blocked layout converts its output (``out_reorder``: it feeds an op, as a
    depthwise conv before a squeeze-excitation gate does).
    Rewritten networks (channel changes, IBN fusion, resolution) reach cells the families
    alone do not."""
    cell = (k.kind, k.op if k.kind not in LAYER_KINDS else k.kernel[0], k.stride[0], group_bucket(k),
            int(math.log2(max(k.macs if k.kind in LAYER_KINDS else k.out_elems, 1)) // 1))
    if k.kind not in CONV_KINDS:
        return cell
    aligned = k.cin % parallelism == 0 and k.cout % parallelism == 0
    return (*cell, aligned, bisect.bisect_right(RESOLUTION_CLASSES, k.out_hw[0]), k.out_reorder)


def select_networks(base: Target, budget_s: float, windows: int, runs: int, threads: int, seed: int = 0,
                    models=(), pool: int = 96, progress: Callable[[str], None] | None = None) -> list[Network]:
    """The networks to time within ``budget_s``: the ``--models`` first, then generated
    networks (in the rotation of :data:`STYLES`) chosen greedily by how many kernel shapes
    (kind, kernel size, stride, grouping, log MACs) not yet covered they add per second of
    measurement."""
    from archpass.costmodel.chains import BUILDERS
    from archpass.model import load_model

    nets: list[Network] = []
    for p in models:
        m = load_model(p)
        nets.append(planned_network(point_key({"model": m.sha256}), Path(p).name, m.proto, base, windows, runs, threads))
    planned = sum(n.cost_s for n in nets)
    if planned > budget_s:
        raise TargetError(f"--budget-s {budget_s:g} is too small to time the --models (about {planned:.0f} s)",
                          "raise --budget-s or pass fewer models")

    def cells(n: Network) -> set:
        return {coverage_cell(k, base.parallelism) for k in n.kernels}

    # the plan may exceed the budget by half: planned costs are pessimistic, and
    # measure_networks admits networks by the time they really take
    plan_s = PLAN_FACTOR * budget_s
    covered = set().union(*(cells(n) for n in nets)) if nets else set()
    left: list[Network] = []
    made = 0
    while made < pool:  # candidates in batches, until the plan fills the budget
        for _ in range(min(BATCH, pool - made)):
            style = STYLES[made % len(STYLES)]
            s = seed * 100003 + 700001 + made
            left.append(planned_network(point_key({"adapt_net": s, "style": style}), f"{style}-{s}", BUILDERS[style](s), base,
                                 windows, runs, threads))
            made += 1
        if made <= BATCH and planned + min(c.cost_s for c in left) > budget_s and not nets:
            raise TargetError(f"--budget-s {budget_s:g} is too small to measure anything: the smallest network needs "
                              f"about {min(c.cost_s for c in left):.1f} s", "raise --budget-s (60 s is the default)")
        picks = 0
        while left and (made >= pool or picks < PICKS_PER_BATCH):
            fits = [c for c in left if planned + c.cost_s <= plan_s]
            if not fits:
                break
            picks += 1
            best = max(fits, key=lambda c: (len(cells(c) - covered) + 0.1) / c.cost_s)
            nets.append(best)
            left.remove(best)
            covered |= cells(best)
            planned += best.cost_s
        if planned + min((c.cost_s for c in left), default=0.0) > plan_s:
            break
    if progress:
        progress(f"{len(nets)} networks planned, about {planned:.0f} s of measurement")
    return nets


__all__ = ["select_layers", "select_networks", "descriptor", "representatives", "model_kernels", "dominant",
           "coverage_cell", "group_bucket", "STYLES"]
