"""Adapting a target to a new device from a few measurements (``archpass calibrate --adapt``).

A full calibration costs hundreds of measurements.  A new device is usually close to one
archpass already knows (another accelerator array, the same CPU with more threads or
another onnxruntime setting, another host), so adaptation keeps a known target as the
*prior* and learns only how the new device differs:

1. **Choose the measurements that tell the most** (:func:`select_layers`,
   :func:`select_networks`): the kernels that dominate the models the user cares about
   (``--models``), then a spread over the shapes the passes produce (the representatives
   of a k-means partition of a large sample in a log-feature space on the new hardware), within ``--samples`` (ZigZag) or
   ``--budget-s`` seconds of measurement (onnxruntime).
2. **Measure robustly** (onnxruntime, :func:`measure_networks`): every network is timed in
   several interleaved windows (all networks once, then again...), the mean of the faster
   half of the windows counts (:func:`window_level`); the load other processes put on the machine is sampled around every
   measurement from ``/proc/stat`` and a measurement taken while the cores the timing needs
   were busy is repeated; with several threads a probe detects the host's slow state (a
   virtual core kept busy by the host, invisible to the guest's load accounting,
   :mod:`~archpass.costmodel.hoststate`), such windows are repeated after waiting for the
   fast state and left out.  What was seen is recorded in the target (``accuracy.measurement``).
3. **Fit a correction on top of the prior** (:func:`fit_corrections`): per kernel kind,
   ``log(measured / prior) ≈ θ · (1, log prior, log compute steps, log memory traffic)`` on
   the new hardware, with θ shrunk towards the prior (θ = 0).  Candidates: one ``scale``
   for everything, a ``class_scale`` per kernel kind shrunk towards it, and ``loglinear``
   at three ridge strengths; the one with the lowest cross-validated error (networks or
   layers held out by group) is kept, and its held-out figures are the target's accuracy
   summary.  Runtime targets then get one network-level factor so that the kernels of a
   network sum to its latency measured without the profiler.

The result is a normal target directory: ``target.json`` with the corrections and
``prior/`` (the base target), plus the adaptation's ``dataset.jsonl``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from archpass.costmodel.calibrate import DATASET, Dataset, Job, Progress, accuracy_stats, point_key, run_jobs
from archpass.costmodel.estimate import MIN_KERNEL_SHARE, predict_kernels
from archpass.costmodel.features import blocked_layout, correction_rows, layer_features
from archpass.costmodel.hoststate import SETTLE_S as PROBE_SETTLE_S
from archpass.costmodel.hoststate import slow_state
from archpass.costmodel.kernels import CONV_KINDS, GENERIC_OP, LAYER_KINDS, LAYOUT_FLAGS, FusionRules, Kernel, decompose
from archpass.costmodel.measure import window_level
from archpass.costmodel.predictor import LAYER_TERMS, OP_TERMS, Correction, lightgbm
from archpass.costmodel.target import Target, load_target, save_target
from archpass.errors import TargetError

#: corrections of the prior's prediction on its own hardware (and of a new analytic baseline)
OWN_METHODS = ("scale", "class_scale", "loglinear_strong", "loglinear", "loglinear_weak", "rebaseline",
               "rebaseline_loglinear", "residual_trees")
#: residual trees (LightGBM on the kernels' features and log prior, over a pooled scale)
#: need this many points in a pool (layer kinds, standalone ops); fewer keep the scale
TREES = "residual_trees"
MIN_POINTS_TREES = 200
TREE_PARAMS = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
               "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "verbose": -1,
               "num_threads": 1, "seed": 0, "deterministic": True}
#: boosting rounds: at 200 the trees underfit.  Refitting eight stored adaptations (four
#: at 2 threads, four with basic optimizations), the held-out network MAPE fell with each
#: doubling to 800 rounds on all eight and again at 1500 on six (2 threads 9.0% -> 8.5% on
#: average, basic 5.8% -> 5.2%), and to 8.1% / 5.15% with the kernels' work per group
#: among the features
TREE_ROUNDS = 1500
#: corrections of the prior's predictors evaluated on the new hardware (its array, unroll,
#: memory width): the base's model of how such a device behaves, transferred; candidates
#: only when the adapted hardware differs from the base's
TRANSFER = "transfer_"
TRANSFER_METHODS = tuple(TRANSFER + m for m in ("scale", "class_scale", "loglinear_strong", "loglinear"))
METHODS = OWN_METHODS + TRANSFER_METHODS
RIDGE = {"loglinear_strong": 30.0, "loglinear": 5.0, "loglinear_weak": 1.0, "rebaseline_loglinear": 5.0}
#: methods whose reference is a new analytic baseline fitted on the adaptation points
REBASELINE = ("rebaseline", "rebaseline_loglinear")
MIN_POINTS_BASELINE = 4
MIN_POINTS_LOGLINEAR = 6
FOLDS = 5
MIN_NETWORK_S = 0.5  # building two sessions and timing the smallest network in three windows
PLAN_FACTOR = 1.5  # networks planned for this many times the budget (planned costs are pessimistic)
BATCH = 12  # generated candidate networks per batch
PICKS_PER_BATCH = 6  # networks planned per batch at most (the greedy choice has twice the candidates)
MAX_WAIT_S = 5.0  # longest wait for a quiet host before one measurement is taken again
#: longest wait, before the first window, for the host to run the probe's threads in
#: parallel (:meth:`~archpass.costmodel.hoststate.ParallelProbe.anchor`)
ANCHOR_WAIT_S = 60.0
#: waits for a quiet host (or the fast state) in all: at most this many times the budget
#: (on a virtual machine whose host ran multi-threaded work slowly half of the time, a
#: 60 s budget waited 64 s with one budget of waits allowed, and then had to keep
#: slow-state windows)
WAIT_FACTOR = 3.0
#: window rounds start at least this many seconds apart (the pause is a wait, not
#: measurement), and at most SPREAD_FACTOR x the budget: the host has slow phases of a
#: minute or more in which everything runs 10-20% slow, and three rounds back to back (a
#: 60 s budget's) can all fall into one (one-thread adaptations of the same plan came out
#: +11.4, -0.9 and -2.8% on average; basic -0.1, +6.4 and +2.2%).  Spread 75 s apart,
#: eight adaptations of three scenarios in one hour came out -3.1..+0.9% (-1.2% on
#: average), each with at least 90% of the held-out models within ±10%; two 2-thread ones
#: later, next to truth measurements of a slow period, 80 and 55%; three 2-thread ones an
#: hour after those 85, 80 and 75%, two more later 90 and 75% (their misses per-model:
#: small models high).
SPREAD_S = 75.0
SPREAD_FACTOR = 1.25
#: a measurement with more than this share of its windows in the host's slow state, or
#: kept while other processes kept a needed core busy, makes a note in the adapted target:
#: its level is less sure (a 2-thread adaptation here with half of its windows in the slow
#: state, its allowance for waiting used up, predicted the held-out models 8.5% high on
#: average; ten with 3-14% of their windows slow, -2% to +4%)
UNSTABLE_SHARE = 0.25
#: with several threads, onnxruntime's idle workers spin for some milliseconds after a run:
#: a session timed right after another one shares the cores with the other's spinning
#: workers (2-thread window medians of one network then differed up to 5x).  Each timed
#: block is preceded by this pause and :data:`WARMUP_RUNS_MT` untimed runs (counted as
#: measurement time).
SPIN_SETTLE_S = 0.03
#: with several threads each timed block runs ``runs`` times and at least this long: a
#: window's latency is a low percentile of its runs (``hoststate.run_statistic``), and a
#: small network's five runs (2 ms) often fall entirely into a short slow state
MIN_BLOCK_S = 0.03
#: timed runs per block and window (each block with the profiler and again without)
RUNS = 5
#: with one thread each timed block is preceded by this many untimed runs of its session:
#: a network timed right after others starts slower (in three interleaved comparisons
#: here five runs, their median, came out a median 7.5% and up to 17% slower than long
#: windows for small generated networks, 0.5% for real models; after three untimed runs,
#: 1% and at most 10%)
WARMUP_RUNS_1T = 2
#: with several threads, the untimed runs after the pause (:data:`SPIN_SETTLE_S`): three
#: 2-thread adaptations here with four got 75, 70 and 80% of the held-out models within
#: ±10% of the truths taken around them (8-channel features), where six with one got 60-75%
WARMUP_RUNS_MT = 4


def load_base(base: str | Path | Target, backend: str) -> Target:
    """The prior of an adaptation: a target of the same measurement backend."""
    t = load_target(base)
    if t.backend != backend:
        raise TargetError(f"base target '{t.name}' was measured with {t.backend}, not {backend}",
                          f"adapt a target measured with {backend} (see 'archpass targets') or pass --backend {t.backend}")
    return t


# ====================================================================== fitting
def _kind_key(k: Kernel) -> str:
    return k.kind if k.kind in LAYER_KINDS else GENERIC_OP


#: the prefix of a later round's records (``calibrate --adapt --add``: ``r2/<key>``)
ROUND_PREFIX = re.compile(r"^r\d+/")


def round_key(key: str, round_no: int) -> str:
    """A record's key in round ``round_no`` (1: the key itself) of an adaptation."""
    return key if round_no <= 1 else f"r{round_no}/{key}"


def _fold(group: str) -> int:
    """A group's cross-validation fold.  A network timed in two rounds (the same key after
    the round prefix, e.g. a ``--models`` model) stays in one fold: with its twin on the
    training side a held-out network would not be held out."""
    return int(hashlib.sha1(ROUND_PREFIX.sub("", group).encode()).hexdigest()[:8], 16) % FOLDS


def _scale(y: np.ndarray) -> float:
    return float(np.median(y)) if len(y) else 0.0


def _shrink_points(y: np.ndarray, kinds: np.ndarray) -> float:
    """Empirical-Bayes weight of the pooled scale against a kind's own mean: within-kind
    variance over between-kind variance (0 when every kind's ratio is exact)."""
    groups = [y[kinds == k] for k in sorted(set(kinds))]
    n = sum(len(g) for g in groups)
    if len(groups) < 2 or n <= len(groups):
        return 0.0
    within = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (n - len(groups))
    means = np.array([g.mean() for g in groups])
    between = max(float(means.var(ddof=1)) - float(np.mean([within / len(g) for g in groups])), 1e-4)
    return float(np.clip(within / between, 0.0, 20.0))


def _baseline(bt: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Non-negative relative least squares of latencies on analytic terms (as :meth:`Predictor.fit`)."""
    from archpass.costmodel.predictor import nnls

    w = 1.0 / np.maximum(ms, 1e-12)
    coef = nnls(bt * w[:, None], ms * w)
    if not np.any(coef > 0):
        coef = np.zeros(bt.shape[1])
        coef[0] = float(np.median(ms))
    return coef


def _fit_trees(kernels: list[Kernel], z: np.ndarray, y: np.ndarray, rows: "Rows") -> dict[str, Correction]:
    """Residual trees over a pooled scale, per pool (layer kinds, standalone ops): the log
    ratio less its median, learnt from the residual rows (weights: the square root of the
    measured latency, between counting kernels and counting time)."""
    lgb = lightgbm()
    layer = np.array([k.kind in LAYER_KINDS for k in kernels])
    out: dict[str, Correction] = {}
    for key, mask, x in (("layer", layer, rows.layer), (GENERIC_OP, ~layer, rows.op)):
        if not mask.any():
            continue
        terms = LAYER_TERMS if key == "layer" else OP_TERMS
        s = _scale(y[mask])
        text = ""
        if mask.sum() >= MIN_POINTS_TREES:
            w = np.sqrt(np.exp(y[mask] + z[mask][:, 1]))  # measured = prior * ratio
            ds = lgb.Dataset(x[mask], label=y[mask] - s, weight=w, params={"verbose": -1})
            text = lgb.train(TREE_PARAMS, ds, num_boost_round=TREE_ROUNDS).model_to_string()
        coef = np.zeros(len(terms))
        coef[0] = s
        out[key] = Correction(kind=key, method=TREES, terms=terms, center=(0.0,) * len(terms),
                              coef=tuple(float(c) for c in coef), n=int(mask.sum()), trees=text)
    return out


def _fit(method: str, kernels: list[Kernel], z: np.ndarray, y: np.ndarray, bt: np.ndarray,
         lp: np.ndarray, rows: "Rows | None" = None) -> dict[str, Correction]:
    """Corrections of one method from points: kernels, their correction terms ``z``, log
    ratios ``y`` = log(measured / prior), analytic base terms ``bt`` on the new hardware,
    log prior predictions ``lp`` (and, for residual trees, their residual rows)."""
    if method == TREES:
        return _fit_trees(kernels, z, y, rows)
    kinds = np.array([_kind_key(k) for k in kernels])
    layer = np.array([k.kind in LAYER_KINDS for k in kernels])
    out: dict[str, Correction] = {}
    g_all = _scale(y)
    ms = np.exp(y + lp)
    for pool, mask in (("layer", layer), (GENERIC_OP, ~layer)):
        if not mask.any():
            continue
        terms = LAYER_TERMS if pool == "layer" else OP_TERMS
        nb = 4 if pool == "layer" else 2
        zz, bb, mp = z[mask][:, : len(terms)], bt[mask][:, :nb], ms[mask]
        yp, kp = y[mask], kinds[mask]
        g = g_all if method == "scale" else _scale(yp)
        m_shrink = _shrink_points(yp, kp)
        entries = {"layer": np.ones(mask.sum(), bool)} if pool == "layer" else {}
        entries.update({str(kd): kp == kd for kd in sorted(set(kp))})
        pooled_base = _baseline(bb, mp) if method in REBASELINE else None
        for kd, m in entries.items():
            zk = zz[m]
            baseline: tuple[float, ...] = ()
            if method in REBASELINE:
                coef_b = _baseline(bb[m], mp[m]) if m.sum() >= MIN_POINTS_BASELINE else pooled_base
                baseline = tuple(float(c) for c in coef_b)
                yk = np.log(mp[m]) - np.log(np.maximum(bb[m] @ coef_b, 1e-9))
                s = float(np.mean(yk))
            else:
                yk = yp[m]
                s = g if method == "scale" else float((yk.sum() + m_shrink * g) / (m.sum() + m_shrink))
            center = np.r_[0.0, zk[:, 1:].mean(axis=0)]
            coef = np.zeros(len(terms))
            coef[0] = s
            if method in RIDGE and len(yk) >= MIN_POINTS_LOGLINEAR:
                x = zk - center
                lam = np.full(len(terms), RIDGE[method] * len(yk) / 50)
                lam[0] = m_shrink if method not in REBASELINE else 0.0
                coef = np.linalg.solve(x.T @ x + np.diag(lam) + 1e-9 * np.eye(len(terms)), x.T @ yk + lam * coef)
            out[kd] = Correction(kind=kd, method=method, terms=terms, center=tuple(float(c) for c in center),
                                 coef=tuple(float(c) for c in coef), n=int(len(yk)), baseline=baseline)
    return out


@dataclass(frozen=True)
class Rows:
    """Residual rows (:func:`~archpass.costmodel.features.residual_rows`) of points, one
    matrix per pool with a row for every point (NaN where the point is of the other pool)."""

    layer: np.ndarray
    op: np.ndarray

    def __getitem__(self, idx) -> "Rows":
        return Rows(self.layer[idx], self.op[idx])

    @classmethod
    def of(cls, kernels, prior_ms: np.ndarray, target: Target) -> "Rows":
        from archpass.costmodel.features import residual_rows

        out = []
        for layer in (True, False):
            idx = [i for i, k in enumerate(kernels) if (k.kind in LAYER_KINDS) == layer]
            m = np.full((len(kernels), 1), np.nan)  # never read: no kernel of this pool
            if idx:
                r = residual_rows([kernels[i] for i in idx], target, np.asarray(prior_ms)[idx])
                m = np.full((len(kernels), r.shape[1]), np.nan)
                m[idx] = r
            out.append(m)
        return cls(*out)


def _apply(corr: dict[str, Correction], kernels: list[Kernel], z: np.ndarray, bt: np.ndarray,
           lp: np.ndarray, zt: np.ndarray | None = None, lt: np.ndarray | None = None,
           rows: Rows | None = None) -> np.ndarray:
    """Log of predicted / prior for kernels (the rule of :func:`~archpass.costmodel.estimate.correction_for`),
    without the corrections' additive ``add_ms``; ``transfer`` corrections read ``zt``/``lt``
    (terms and log reference of the prior's predictors on the new hardware; the same as
    ``z``/``lp`` when the hardware is the prior's)."""
    out = np.zeros(len(kernels))
    by: dict[int, tuple[Correction, list[int]]] = {}
    for i, k in enumerate(kernels):
        c = (corr.get(k.kind) or corr.get("layer")) if k.kind in LAYER_KINDS else corr.get(GENERIC_OP)
        if c is not None:
            by.setdefault(id(c), (c, []))[1].append(i)
    for c, idx in by.values():
        ix = np.array(idx)
        zz, ll = (zt, lt) if c.transfer and zt is not None else (z, lp)
        nb = len(c.baseline) or (4 if c.terms == LAYER_TERMS else 2)
        ref = c.reference(np.exp(ll[ix]), bt[ix, :nb])
        out[ix] = np.log(ref) - lp[ix] + np.log(c.factor(zz[ix, : len(c.terms)]))
        if c.trees and rows is not None:
            out[ix] += np.log(c.tree_factor((rows.layer if c.terms == LAYER_TERMS else rows.op)[ix]))
    return out


@dataclass(frozen=True)
class Points:
    """Adaptation measurements: kernels with their prior prediction and measured latency,
    grouped (one group per network or layer) with each group's whole latency when known
    and, for networks, every kernel of the network with its prior prediction (kernels the
    profiler showed no time for still cost the whole network their dispatch)."""

    kernels: tuple[Kernel, ...]
    prior_ms: np.ndarray
    ms: np.ndarray
    groups: tuple[str, ...]
    network_ms: dict = field(default_factory=dict)  # group -> latency measured without the profiler
    networks: dict = field(default_factory=dict)  # group -> (every kernel, their prior ms)
    slow_state_scaling: dict = field(default_factory=dict)  # round -> what :func:`slow_only_levels` did

    def __len__(self) -> int:
        return len(self.kernels)


def _terms(kernels, prior_ms: np.ndarray, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """Correction terms and analytic base terms (on ``target``'s hardware) of kernels,
    padded to the layer width."""
    from archpass.costmodel.features import feature_rows

    z = np.zeros((len(kernels), len(LAYER_TERMS)))
    bt = np.zeros((len(kernels), 4))
    for layer in (True, False):
        idx = [i for i, k in enumerate(kernels) if (k.kind in LAYER_KINDS) == layer]
        if idx:
            ks = [kernels[i] for i in idx]
            rows = correction_rows(ks, target, prior_ms[idx])
            z[np.ix_(idx, range(rows.shape[1]))] = rows
            base = feature_rows(ks, target)[1]
            bt[np.ix_(idx, range(base.shape[1]))] = base
    return z, bt


# ---------------------------------------------------------------- whole-network fit
#: kernel classes whose summed time gets its own factor against whole-network latency
CLASSES = (*LAYER_KINDS, GENERIC_OP)
#: the whole-network fit's per-kernel terms (ms a kernel, either sign): one for layer
#: kernels (convs, gemms), one for standalone ops, whose dispatch and profiler bookkeeping
#: differ (one term for both: 83.7% of the held-out models within ±10% pooled over 27
#: two-thread adaptations, two terms 85.9%; 1 thread and basic graph optimizations one
#: model fewer each, 92.0 and 91.0%; see docs/architecture.md)
KERNEL_TERMS = ("layer", "op")
#: ridge strengths (per network) pulling the class factors towards one common factor;
#: None = one common factor (the sum of kernels scaled to the networks' latency)
NET_RIDGE: tuple[float | None, ...] = (None, 1.0, 0.1, 0.01, 0.001)


@dataclass(frozen=True)
class _Net:
    """A timed network ready for the whole-network fit: every kernel, its class index,
    log prior, correction and base terms, and the latency measured without the profiler."""

    kernels: list
    cls: np.ndarray
    lp: np.ndarray
    z: np.ndarray
    bt: np.ndarray
    ms: float
    rows: "Rows"


def _nets(points: Points, target: Target) -> dict[str, _Net]:
    out = {}
    for g, (ks, prior) in points.networks.items():
        if g not in points.network_ms or not len(ks):
            continue
        z, bt = _terms(list(ks), prior, target)
        cls = np.array([CLASSES.index(_kind_key(k)) for k in ks])
        out[g] = _Net(list(ks), cls, np.log(np.maximum(prior, 1e-12)), z, bt, float(points.network_ms[g]),
                      Rows.of(list(ks), prior, target))
    return out


def _net_design(nets: list[_Net], corr: dict[str, Correction]) -> np.ndarray:
    """Per network: the corrected kernel time summed per class, then its kernel count per
    :data:`KERNEL_TERMS` (layer kernels, standalone ops)."""
    nc = len(CLASSES)
    x = np.zeros((len(nets), nc + len(KERNEL_TERMS)))
    for r, n in enumerate(nets):
        np.add.at(x[r], n.cls, np.exp(n.lp + _apply(corr, n.kernels, n.z, n.bt, n.lp, rows=n.rows)))
        layer = int(np.sum(n.cls < len(LAYER_KINDS)))
        x[r, nc:] = (layer, len(n.kernels) - layer)
    return x


def _oof_design(nets: list[_Net], fold: np.ndarray, fold_corr: dict[int, dict]) -> np.ndarray:
    """:func:`_net_design` rows, each network's from the correction fitted without its
    fold (NaN for a fold without one)."""
    x = np.full((len(nets), len(CLASSES) + len(KERNEL_TERMS)), np.nan)
    for f, corr in fold_corr.items():
        idx = np.flatnonzero(fold == f)
        if len(idx):
            x[idx] = _net_design([nets[i] for i in idx], corr)
    return x


def _net_ok(x: np.ndarray) -> np.ndarray:
    """The rows of a design that have every column."""
    return ~np.isnan(x).any(axis=1)


def _net_fit(x: np.ndarray, t: np.ndarray, lam: float | None) -> np.ndarray:
    """Coefficients (one factor per class, then ms per kernel for each of the design's
    per-kernel columns, :data:`KERNEL_TERMS`) with ``x @ coef`` ≈ ``t``: least squares of
    relative errors, the class factors non-negative and pulled towards the common factor
    (the median ratio of measured to summed kernels) with strength ``lam`` per network;
    ``lam`` None keeps the common factor alone.  The per-kernel terms have either sign:
    dispatch the profiled kernels do not show, or (negative) profiler bookkeeping they
    still hold (the adaptation takes out the base's per-node profiler cost, measured on the
    base's host: at 2 threads here the held-out network error fell from 8.1% to 7.4% over
    four adaptations when this term could be negative)."""
    from archpass.costmodel.predictor import nnls

    nc = len(CLASSES)
    nk = x.shape[1] - nc
    a0 = float(np.median(t / np.maximum(x[:, :nc].sum(axis=1), 1e-12)))
    if lam is None or len(t) < 3:
        return np.r_[np.full(nc, a0), np.zeros(nk)]
    w = 1.0 / t
    reg = np.sqrt(lam * len(t))
    xs = np.hstack([x, -x[:, nc:]])  # each per-kernel term as a difference of two non-negative ones
    m = nc + 2 * nk
    prior_rows = np.zeros((m, m))
    prior_rows[:nc, :nc] = reg * np.eye(nc)
    prior_rows[nc:, nc:] = 1e-3 * np.eye(2 * nk)  # the per-kernel terms: no prior, but determined
    a = np.vstack([xs * w[:, None], prior_rows])
    b = np.r_[np.ones(len(t)), np.full(nc, reg * a0), np.zeros(2 * nk)]
    coef = nnls(a, b)
    coef[:nc] = np.maximum(coef[:nc], 0.2 * a0)  # a class never vanishes
    return np.r_[coef[:nc], coef[nc:nc + nk] - coef[nc + nk:]]


def _with_net_fit(corr: dict[str, Correction], coef: np.ndarray, method: str) -> dict[str, Correction]:
    """``corr`` with every class's factor and the per-kernel terms of the whole-network fit
    (:data:`KERNEL_TERMS`: layer kinds take the first, standalone ops the second)."""
    nc = len(CLASSES)
    add = dict(zip(KERNEL_TERMS, (float(v) for v in coef[nc:])))
    out = dict(corr)
    for i, kd in enumerate(CLASSES):
        c = out.get(kd) or (out.get("layer") if kd in LAYER_KINDS else None)
        if c is None:
            terms = LAYER_TERMS if kd in LAYER_KINDS else OP_TERMS
            c = Correction(kind=kd, method=method, terms=terms, center=(0.0,) * len(terms), coef=(0.0,) * len(terms),
                           transfer=method.startswith(TRANSFER))
        out[kd] = replace(c, kind=kd, coef=(c.coef[0] + math.log(max(coef[i], 1e-9)), *c.coef[1:]),
                          add_ms=add["layer" if kd in LAYER_KINDS else "op"])
    if "layer" in out:  # every layer kind has its own entry now; the pooled one keeps the common factor
        c = out["layer"]
        out["layer"] = replace(c, coef=(c.coef[0] + math.log(max(float(np.median(coef[: len(LAYER_KINDS)])), 1e-9)),
                                        *c.coef[1:]), add_ms=add["layer"])
    return out


def _net_label(lam: float | None) -> str:
    return "common_factor" if lam is None else f"class_factors_ridge{lam:g}"


def _fit_method(method: str, kernels, z, y, bt, lp, rows: Rows | None = None) -> dict[str, Correction]:
    """:func:`_fit` of any method: ``transfer_*`` fits its base method on the transferred
    reference (the caller passes its terms) and marks the corrections."""
    if not method.startswith(TRANSFER):
        return _fit(method, kernels, z, y, bt, lp, rows)
    corr = _fit(method[len(TRANSFER):], kernels, z, y, bt, lp)
    return {k: replace(c, method=method, transfer=True) for k, c in corr.items()}


def layout_blocks(shell: Target) -> list[Target]:
    """The channel blocks an adapted target's features may pad to: the base's parallelism,
    and where onnxruntime runs its blocked NCHWc layout (:func:`~archpass.costmodel.features.blocked_layout`:
    the CPU provider with every graph optimization) the host's NCHWc block
    (``shell.fusion.nchwc_block``) when it is a larger multiple of the base's.
    On an AVX-512 host onnxruntime's NCHWc block is 16 channels against the base's 8: out
    of fold, 1x1 convs whose output channels are 8 mod 16 took 10-14% longer than the
    8-channel features predicted, while with basic optimizations (no NCHWc) 16-channel
    features cost 10 points of held-out models within ±10%.  :func:`fit_target` keeps the
    block whose held-out network error is lowest."""
    prior = shell.prior
    if prior is None or (shell.source or {}).get("backend") != "onnxruntime":
        return [shell]
    base = replace(shell, parallelism=prior.parallelism, unroll=dict(prior.unroll))
    block = shell.fusion.nchwc_block
    if not blocked_layout(shell) or block <= prior.parallelism or block % prior.parallelism:
        return [base]
    f = block // prior.parallelism
    return [base, replace(shell, parallelism=block, unroll={k: f * int(v) for k, v in prior.unroll.items()})]


def fit_target(shell: Target, points: Points, method: str | None = None) -> Target:
    """``shell`` with corrections fitted on ``points`` (:func:`fit_corrections`) for each
    of its :func:`layout_blocks`, the simplest block (the base's first) kept unless another
    one's held-out network MAPE is lower beyond noise (2%)."""
    fits = []
    for cand in layout_blocks(shell):
        corr, summary = fit_corrections(points, cand, method)
        fits.append((cand, corr, summary, float((summary.get("chains") or {}).get("mape_pct", math.inf))))
    cand, corr, summary, err = fits[0]
    for f in fits[1:]:
        if f[3] < err * 0.98 - 0.05:
            cand, corr, summary, err = f
    if len(fits) > 1:
        summary["layout_block"] = {"chosen": cand.parallelism, "network_cv_mape_pct": {
            str(f[0].parallelism): f[3] for f in fits}}
    if points.slow_state_scaling:
        summary["slow_state_scaling"] = points.slow_state_scaling
    return replace(cand, corrections=corr, accuracy=summary)


def _new_hardware(target: Target) -> bool:
    """Whether the adapted target's hardware description differs from its prior's (an
    onnxruntime target's channel block, :func:`layout_blocks`, is how its features are
    read, not other hardware for the prior's predictors)."""
    p = target.prior
    if (target.source or {}).get("backend") == "onnxruntime":
        return False
    return p is not None and (p.parallelism, dict(p.unroll), p.mem_bits_per_step, p.bytes_per_element) != (
        target.parallelism, dict(target.unroll), target.mem_bits_per_step, target.bytes_per_element)


def _transfer_ms(points: Points, target: Target) -> np.ndarray:
    """The prior's predictors on ``target``'s hardware for every point (a group's kernels together)."""
    from archpass.costmodel.estimate import transferred_prior

    tp = transferred_prior(target)
    out = np.zeros(len(points))
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(points.groups):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        out[idx] = predict_kernels([points.kernels[i] for i in idx], tp)[0]
    return out


PER_KIND = "per_kind"


def _mix(by_method: dict[str, dict[str, Correction]], choice: dict[str, str], fallback: str) -> dict[str, Correction]:
    """One correction per kernel class, each from the method ``choice`` names for it
    (``fallback``'s pooled layer correction for layer kinds without a choice)."""
    out: dict[str, Correction] = {}
    for c, m in choice.items():
        d = by_method[m]
        e = d.get(c) or (d.get("layer") if c in LAYER_KINDS else None)
        if e is not None:
            out[c] = replace(e, kind=c)
    if "layer" in by_method[fallback]:
        out["layer"] = by_method[fallback]["layer"]
    return out


def _per_kind_choice(err_by_method: dict[str, dict[str, float]], classes) -> dict[str, str]:
    """Per kernel class, the method with the lowest error."""
    return {str(c): min(err_by_method, key=lambda m: err_by_method[m].get(str(c), float("inf"))) for c in classes}


def _class_errors(pred_log: np.ndarray, ms: np.ndarray, prior_ms: np.ndarray, kinds: np.ndarray,
                  mask: np.ndarray) -> dict[str, float]:
    """Latency-weighted relative error of predictions per kernel class, over ``mask``."""
    out = {}
    for c in set(kinds[mask]):
        m = mask & (kinds == c) & ~np.isnan(pred_log)
        if m.any():
            pred = prior_ms[m] * np.exp(pred_log[m])
            out[str(c)] = float(np.sum(np.abs(pred - ms[m])) / np.sum(ms[m]))
    return out


#: a candidate's held-out network error ties with the best one's when the paired
#: difference over the networks is within this many standard errors of zero (or within
#: 2% of the best): then the network times cannot tell the two apart
TIE_SE = 2.0


def _choose_runtime(choices: list[tuple], err: dict, ape: dict, kernel_err: dict) -> tuple:
    """(ridge, method, how it was chosen) for a runtime target.  The pairs whose held-out
    network MAPE ties with the lowest (within 2%, or a paired difference over the networks
    within :data:`TIE_SE` standard errors) are the ones the network times cannot tell
    apart; among them the kernel correction with the lowest held-out latency-weighted
    kernel error is kept, with the simplest network fit (common factor first, then
    stronger ridges) within 2% of that correction's lowest network MAPE.

    Why the kernels break the tie: network times on a shared host are noisy (one-sided:
    another tenant only slows a window down), while every network holds tens of profiled
    kernels.  At 2 threads on the sixth machine (docs/architecture.md), one scale per
    kernel class had a held-out network MAPE of 15.0% against 15.5-17.9% for residual
    trees, while their held-out kernel errors were 57-81% against 15-19%: a scale cannot
    follow kernels whose 2-thread time is 0.45-2x the 1-thread prior, by their size."""
    def near(e: float, b: float) -> bool:  # within 2% (and rounding) of b
        return e <= b * 1.02 + 0.05

    best_c = min(choices, key=lambda c: err[c])
    best = err[best_c]

    def ties(c) -> bool:
        if near(err[c], best):
            return True
        a, b = ape.get(c), ape.get(best_c)
        if a is None or b is None:
            return False
        ok = ~(np.isnan(a) | np.isnan(b))
        d = a[ok] - b[ok]
        if len(d) < 5:
            return False
        se = float(np.std(d, ddof=1)) / math.sqrt(len(d))
        return float(np.mean(d)) <= TIE_SE * se

    tied = [c for c in choices if ties(c)]
    method = min(dict.fromkeys(c[1] for c in tied), key=lambda m: kernel_err.get(m, math.inf))
    own = [c for c in choices if c[1] == method]
    own_best = min(err[c] for c in own)
    lam = next(c[0] for c in own if near(err[c], own_best))
    return lam, method, {"lowest_network_mape": {"method": best_c[1], "network_fit": _net_label(best_c[0]),
                                                 "mape_pct": best},
                         "tied_methods": sorted({c[1] for c in tied}),
                         "rule": "among the pairs whose held-out network error ties with the lowest (2%, or a paired "
                                 f"difference within {TIE_SE:g} standard errors), the lowest held-out latency-weighted "
                                 "kernel error, then the simplest network fit"}


def fit_corrections(points: Points, target: Target, method: str | None = None) -> tuple[dict[str, Correction], dict]:
    """Corrections of ``target``'s prior from ``points``, by the method with the lowest
    cross-validated error (or ``method``), and the held-out summary of every method.

    Besides each method alone, ``per_kind`` takes per kernel class (conv, dwconv, gemm,
    op) the method with the lowest held-out error on that class (chosen, for each fold's
    held-out figures, on the other folds' points).  With whole networks (runtime targets)
    the choice is made on held-out *networks*.  The whole-network fit (a factor per kernel
    class and per-kernel terms of either sign for layer kernels and for standalone ops,
    :data:`KERNEL_TERMS`; the factors pulled towards one common factor at one of
    :data:`NET_RIDGE`'s strengths) is stacked: it reads each network's kernel sums from the
    fold's kernel correction that did not see that network (out-of-fold rows), since the
    full fit has seen every network and its in-sample sums hide how it errs on a new one
    (at 2 threads here generated networks under 1.5 ms came out 2-7% high out of fold,
    larger ones 1-16% low, while the in-sample fit showed no such trend).  Per fold, the
    network fit on the other folds' out-of-fold rows predicts the fold's networks; the
    simplest pair (kernel correction, ridge) within noise of the lowest held-out network
    MAPE is kept, and its network fit is made on every out-of-fold row."""
    kernels = list(points.kernels)
    z, bt = _terms(kernels, points.prior_ms, target)
    lp = np.log(np.maximum(points.prior_ms, 1e-12))
    y = np.log(points.ms) - lp
    kinds = np.array([_kind_key(k) for k in kernels])
    folds = np.array([_fold(g) for g in points.groups])
    nets = _nets(points, target)
    runtime = len(nets) >= 2
    if method is not None and method not in METHODS + (PER_KIND,):
        raise TargetError(f"unknown correction method '{method}'", f"use one of {', '.join(METHODS + (PER_KIND,))}")
    # (terms, log reference, log ratio) each method corrects: the prior's own prediction,
    # or (transfer_*) the prior's predictors on the new hardware
    sets = {m: (z, lp, y) for m in OWN_METHODS}
    zt, lt = z, lp
    if _new_hardware(target) or (method or "").startswith(TRANSFER):
        tr_ms = _transfer_ms(points, target)
        lt = np.log(np.maximum(tr_ms, 1e-12))
        zt = _terms(kernels, tr_ms, target)[0]
        sets.update({m: (zt, lt, np.log(points.ms) - lt) for m in TRANSFER_METHODS})
    rows = Rows.of(kernels, points.prior_ms, target)
    # residual trees need enough points in a pool to be a candidate
    trees_ok = max(int(np.sum(kinds != GENERIC_OP)), int(np.sum(kinds == GENERIC_OP))) >= MIN_POINTS_TREES
    methods = [m for m in METHODS if m in sets and (m != TREES or trees_ok or method == TREES)]
    net_keys = sorted(nets)
    net_fold = np.array([_fold(g) for g in net_keys])
    net_t = np.array([nets[g].ms for g in net_keys])
    net_x = [nets[g] for g in net_keys]
    fold_corr: dict[str, dict[int, dict]] = {m: {} for m in methods}
    net_oof: dict[str, np.ndarray] = {}
    pred_logs: dict[str, np.ndarray] = {}
    for m in methods:
        pred_log = np.full(len(points), np.nan)
        zm, lm, ym = sets[m]
        for f in range(FOLDS):
            test = folds == f
            if not test.any() or test.all():
                continue
            tr = np.flatnonzero(~test)
            corr = fold_corr[m][f] = _fit_method(m, [kernels[i] for i in tr], zm[~test], ym[~test], bt[~test], lm[~test],
                                                 rows[~test])
            pred_log[test] = _apply(corr, [kernels[i] for i in np.flatnonzero(test)], z[test], bt[test], lp[test],
                                    zt[test], lt[test], rows[test])
        pred_logs[m] = pred_log
    # per kind: each fold's choice made on the other folds' held-out predictions
    used_folds = sorted({f for m in methods for f in fold_corr[m]})
    kind_choice = {f: _per_kind_choice({m: _class_errors(pred_logs[m], points.ms, points.prior_ms, kinds, folds != f)
                                        for m in methods}, sorted(set(kinds))) for f in used_folds}
    best_single = min(methods, key=lambda m: float(np.nansum(np.abs(points.prior_ms * np.exp(pred_logs[m]) - points.ms))))
    pk = np.full(len(points), np.nan)
    for f in used_folds:
        fold_corr.setdefault(PER_KIND, {})[f] = _mix({m: fold_corr[m][f] for m in methods}, kind_choice[f], best_single)
        test = folds == f
        pk[test] = _apply(fold_corr[PER_KIND][f], [kernels[i] for i in np.flatnonzero(test)], z[test], bt[test],
                          lp[test], zt[test], lt[test], rows[test])
    pred_logs[PER_KIND] = pk
    candidates = methods + [PER_KIND]
    cv: dict[str, dict] = {}
    net_cv: dict[str, dict[str, dict]] = {}
    net_ape: dict[tuple, np.ndarray] = {}  # (ridge, method) -> each network's held-out error, %
    for m in candidates:
        ok = ~np.isnan(pred_logs[m])
        pred = points.prior_ms[ok] * np.exp(pred_logs[m][ok])
        cv[m] = {"kernels": accuracy_stats(pred, points.ms[ok])}
        # the error a sum of these kernels would see (without cancellation): whole-model
        # latency is a latency-weighted sum of its kernels'
        cv[m]["kernels"]["latency_weighted_mape_pct"] = float(
            np.sum(points.ms[ok] * np.abs(pred / points.ms[ok] - 1)) / np.sum(points.ms[ok]) * 100)
        if runtime:
            # the whole-network fit is stacked: it reads each network's row from the fold
            # whose kernel correction did not see it (the full fit's corrections have seen
            # every network, and in-sample rows hide how they err on a new one)
            x = net_oof[m] = _oof_design(net_x, net_fold, fold_corr.get(m, {}))
            net_pred = {lam: np.full(len(net_keys), np.nan) for lam in NET_RIDGE}
            rows_ok = _net_ok(x)
            for f in range(FOLDS):
                tr, te = (net_fold != f) & rows_ok, (net_fold == f) & rows_ok
                if not te.any() or tr.sum() < 2:
                    continue
                for lam in NET_RIDGE:
                    net_pred[lam][te] = x[te] @ _net_fit(x[tr], net_t[tr], lam)
            for lam in NET_RIDGE:
                okn = ~np.isnan(net_pred[lam])
                net_cv.setdefault(_net_label(lam), {})[m] = accuracy_stats(net_pred[lam][okn], net_t[okn])
                net_ape[lam, m] = np.abs(net_pred[lam] / net_t - 1) * 100
            cv[m]["networks"] = net_cv[_net_label(None)][m]
    prior_stats = accuracy_stats(points.prior_ms, points.ms)
    if runtime:
        metric = "held-out network MAPE"
        choices = [(lam, m) for lam in NET_RIDGE for m in candidates if method in (None, m)]
        err = {c: net_cv[_net_label(c[0])][c[1]].get("mape_pct", float("inf")) for c in choices}
        lam, chosen, tie = _choose_runtime(choices, err, net_ape, {m: cv[m]["kernels"]["latency_weighted_mape_pct"]
                                                                    for m in candidates})
    else:
        metric = "latency-weighted held-out layer MAPE"
        lam, chosen = None, method or min(candidates, key=lambda m: cv[m]["kernels"]["latency_weighted_mape_pct"])
    summary: dict = {}
    if chosen == PER_KIND:
        choice = _per_kind_choice({m: _class_errors(pred_logs[m], points.ms, points.prior_ms, kinds,
                                                    np.ones(len(points), bool)) for m in methods}, sorted(set(kinds)))
        fits = {}
        for m in set(choice.values()) | {best_single}:
            zm, lm, ym = sets[m]
            fits[m] = _fit_method(m, kernels, zm, ym, bt, lm, rows)
        corr = _mix(fits, choice, best_single)
        summary["per_kind"] = choice
    else:
        zc, lc, yc = sets[chosen]
        corr = _fit_method(chosen, kernels, zc, yc, bt, lc, rows)
    summary.update({
        "method": chosen,
        "reference": "the base's predictors on this hardware" if chosen.startswith(TRANSFER)
        else "the base's prediction",
        "selected_by": (f"lowest {metric} ({FOLDS} folds by {'network' if runtime else 'layer'})"
                        + ("; a tie on it broken by the held-out latency-weighted kernel MAPE" if runtime else ""))
        if method is None else "given",
        "cross_validation": cv,
        "all_kernels": cv[chosen]["kernels"],
        "prior_on_these_points": prior_stats,
        "measured_points": len(points),
        "groups": len(set(points.groups)),
    })
    if runtime:
        x = net_oof[chosen]
        ok = _net_ok(x)
        stacked = ok.sum() >= 2
        if not stacked:  # too few networks in the folds: the full fit's rows
            x = _net_design(net_x, corr)
            ok = _net_ok(x)
        coef = _net_fit(x[ok], net_t[ok], lam)
        corr = _with_net_fit(corr, coef, chosen)
        summary["network_fit"] = {
            "chosen": _net_label(lam), "class_factors": {c: float(coef[i]) for i, c in enumerate(CLASSES)},
            "overhead_ms_per_kernel": {k: float(v) for k, v in zip(KERNEL_TERMS, coef[len(CLASSES):])},
            "networks": len(net_keys),
            "rows": "out of fold" if stacked else "in sample",
            "in_sample": accuracy_stats(x[ok] @ coef, net_t[ok]), "cross_validation": net_cv}
        summary["chains"] = net_cv[_net_label(lam)][chosen]
        summary["selection"] = tie
    return corr, summary


# ====================================================================== choosing measurements
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


# ====================================================================== ZigZag
def adapt_zigzag(*, base: str | Path | Target, name: str, out_dir: str | Path, hardware: str | Path,
                 mapping: str | Path, clock_hz: float | None = None, samples: int = 50, workers: int = 2, seed: int = 0,
                 lpf_limit: int | None = None, models=(), description: str = "", method: str | None = None,
                 progress: Progress | None = None) -> Target:
    """Adapt a ZigZag target to another hardware/mapping from ``samples`` layer evaluations."""
    import shutil

    from archpass.costmodel.backends import zigzag as zz
    from archpass.costmodel.calibrate import zigzag_work
    from archpass.costmodel.host import package_version

    prior = load_base(base, "zigzag")
    if samples < 5:
        raise TargetError(f"--samples {samples} is too few to adapt a target", "use at least 5 (50 is the default)")
    clock = float(clock_hz or prior.clock_hz or 0)
    if clock <= 0:
        raise TargetError(f"clock {clock} Hz is not positive", "pass --clock-hz with the accelerator clock")
    lpf = int(lpf_limit or prior.source.get("lpf_limit", 4))
    zz.check_inputs(hardware, mapping)
    facts = zz.hardware_facts(hardware, mapping)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw_name, map_name = Path(hardware).name, Path(mapping).name
    for src, dst in ((hardware, out / hw_name), (mapping, out / map_name)):
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    shell = Target(
        name=name, description=description or f"ZigZag model of {facts.get('name') or hw_name}, adapted from {prior.name}",
        parallelism=int(facts["parallelism"]), dtype=prior.dtype, bytes_per_element=prior.bytes_per_element,
        clock_hz=clock, unroll=facts["unroll"], mem_bits_per_step=facts["mem_bits_per_step"], fusion=prior.fusion,
        source={"backend": "zigzag", "hardware": hw_name, "mapping": map_name, "lpf_limit": lpf,
                "zigzag_version": package_version("zigzag-dse"), "adapted_from": prior.name},
        prior=prior,
    )
    return adapt_layers(shell, out, zigzag_work, samples, workers, seed, models, method, progress,
                        {"hardware": str(hardware), "mapping": str(mapping), "clock_hz": clock, "lpf_limit": lpf})


def adapt_layers(shell: Target, out: Path, work: Callable[[dict], dict], samples: int, workers: int = 1, seed: int = 0,
                 models=(), method: str | None = None, progress: Progress | None = None, payload: dict | None = None) -> Target:
    """Measure ``samples`` chosen layers with ``work`` (a calibration job function: payload
    with ``spec`` -> record with ``points``), fit the corrections of ``shell.prior`` and
    write the adapted target to ``out``."""
    t0 = time.time()
    prior = shell.prior
    specs = select_layers(shell, prior, samples, seed, models)
    dataset = Dataset(Path(out) / DATASET)
    payload = payload or {}
    lpf = payload.get("lpf_limit")
    jobs = [Job(point_key({"spec": s, "lpf": lpf, "adapt": True}), {"spec": s, **payload}) for s in specs]
    run_jobs(jobs, work, dataset, workers, progress)
    keys = {j.key for j in jobs}
    points = dataset_points(dataset, prior, keys)
    if len(points) < 5:
        raise TargetError(f"only {len(points)} of {len(jobs)} layers could be measured ({len(dataset.failed)} failed)",
                          "check the hardware/mapping YAMLs or raise --samples")
    failed = [r for r in dataset.failed if r["key"] in keys]
    measurement = {"layers_measured": len(jobs), "failed": len(failed),
                   "failure_examples": sorted({r["error"] for r in failed})[:3], "seconds": round(time.time() - t0, 1),
                   "models": [Path(p).name for p in models]}
    return _write(shell, points, Path(out), measurement, method)


#: a round's networks timed in both host states needed to take the slow state out of the
#: networks timed only in it (:func:`slow_only_levels`)
MIN_BOTH_STATES = 3


def round_probe_bests(rounds: list[dict], latest_ms: float | None = None) -> dict[str, float]:
    """Each round's best probe reading by its records' key prefix (``""`` for round 1,
    ``"r2/"`` ...), from the rounds' records (``accuracy.measurement.rounds``); the last
    round, when it does not say, takes ``latest_ms`` (a target's ``measurement.probe_best_ms``
    is its latest round's).  Rounds recorded before they carried theirs are left out."""
    out = {round_key("", i + 1): float(r["probe_best_ms"]) for i, r in enumerate(rounds) if r.get("probe_best_ms")}
    last = round_key("", max(len(rounds), 1))
    if latest_ms and last not in out:
        out[last] = float(latest_ms)
    return out


def slow_only_levels(records: dict, net: dict[str, float], probe_bests: dict[str, float]) -> tuple[dict, dict]:
    """``net`` (record key -> network latency) with the slow state taken out of the
    networks that no window of caught in the host's fast state (multi-threaded rounds):
    their latency, the faster half of slow-state windows, is divided by how much slower the
    slow state ran that round's networks timed in both states (the median over them of
    the faster half of their slow windows over the faster half of their fast ones, at
    least 1; only with :data:`MIN_BOTH_STATES` such networks in the round).  A record's
    windows are judged against its round's best probe reading (``probe_bests``, by key
    prefix: :func:`round_probe_bests`; a round without one is left as it is).  Returns the
    levels and, per round, the ratio and how many networks gave and took it.

    On a host that ran 2-thread work slowly most of the time (the tenth machine,
    docs/architecture.md) 7-24 of a round's 27-29 networks had no fast window and held
    the level up: refits of its four stored 2-thread adaptations put 43.8% of the held-out
    models within ±10% of its three truths (means +5.9 to +32.2%) as measured, 70.0%
    (means -1.1 to +9.9%) with this; two rounds measured after it was chosen, 80 and 30%
    as measured, 80 and 50% with it.  A round whose every network had a fast window is
    unchanged."""
    rounds: dict[str, list[str]] = {}
    for key in net:
        m = ROUND_PREFIX.match(key)
        rounds.setdefault(m.group(0) if m else "", []).append(key)
    out, seen = dict(net), {}
    for prefix, keys in rounds.items():
        best = probe_bests.get(prefix)
        if not best:
            continue  # one thread (no probe), or a round recorded before it kept its best reading
        ratios, slow_only = [], []
        for key in keys:
            rec = records[key]
            wins, probe = rec.get("window_plain_ms") or [], rec.get("probe_ms") or []
            if not wins or len(probe) != len(wins) or not all(probe):
                continue  # windows not all read
            slow = [slow_state(p, best) for p in probe]
            if any(slow) and not all(slow):
                ratios.append(window_level([w for w, s in zip(wins, slow) if s])
                              / window_level([w for w, s in zip(wins, slow) if not s]))
            elif all(slow):
                slow_only.append(key)
        if slow_only and len(ratios) >= MIN_BOTH_STATES:
            r = max(float(np.median(ratios)), 1.0)
            for key in slow_only:
                out[key] = net[key] / r
            seen[prefix.rstrip("/") or "r1"] = {"slow_over_fast": round(r, 4), "networks_in_both_states": len(ratios),
                                                "networks_scaled": len(slow_only)}
    return out, seen


def dataset_points(dataset: Dataset, prior: Target, keys=None, probe_bests: dict[str, float] | None = None) -> Points:
    """The adaptation points of a dataset's records (all, or ``keys``): each record's
    kernels predicted by the prior together (runtime predictors read the whole network:
    every kernel of it when the record lists them), grouped by record, with the record's
    latency without the profiler when it has one (networks timed only in the host's slow
    state: :func:`slow_only_levels`, with each round's best probe reading ``probe_bests``)."""
    kernels, ms, groups, prior_ms, net, whole = [], [], [], [], {}, {}
    for key, rec in dataset.records.items():
        pts = [p for p in rec.get("points") or [] if p.get("ms") and math.isfinite(p["ms"]) and p["ms"] > 0]
        if (keys is not None and key not in keys) or not pts:
            continue
        ks = [Kernel.from_spec(p["spec"], id=str(p.get("id", "k"))) for p in pts]
        if rec.get("all_kernels"):
            every = [Kernel.from_spec(e["spec"], id=str(e["id"])) for e in rec["all_kernels"]]
            every_ms = predict_kernels(every, prior)[0]
            at = {k.id: i for i, k in enumerate(every)}
            if all(k.id in at for k in ks):
                prior_ms.append(every_ms[[at[k.id] for k in ks]])
                whole[key] = (tuple(every), every_ms)
            else:
                prior_ms.append(predict_kernels(ks, prior)[0])
        else:
            prior_ms.append(predict_kernels(ks, prior)[0])
        kernels += ks
        ms += [float(p["ms"]) for p in pts]
        groups += [key] * len(ks)
        if rec.get("plain_ms"):
            # from the stored windows when there are (a refit follows the current statistic)
            wins = rec.get("window_plain_ms") or []
            fast = [wins[i] for i in (rec.get("fast_windows") or range(len(wins))) if i < len(wins)]
            net[key] = window_level(fast) if fast else float(rec["plain_ms"])
            whole.setdefault(key, (tuple(ks), prior_ms[-1]))
    net, scaling = slow_only_levels(dataset.records, net, probe_bests or {})
    return Points(tuple(kernels), np.concatenate(prior_ms) if prior_ms else np.zeros(0), np.array(ms), tuple(groups),
                  net, whole, scaling)


def target_probe_bests(t: Target) -> dict[str, float]:
    """An adapted target's :func:`round_probe_bests` (from its measurement record)."""
    m = t.accuracy.get("measurement") or {}
    return round_probe_bests(list(m.get("rounds") or []), m.get("probe_best_ms"))


def refit(directory: str | Path, method: str | None = None) -> Target:
    """An adapted target's corrections fitted again from its stored measurements (no new
    measurement), by ``method`` or the best cross-validated one.  Not written."""
    t = load_target(directory)
    if t.prior is None:
        raise TargetError(f"target {directory} is not an adapted target", "pass the directory 'calibrate --adapt' wrote")
    points = dataset_points(Dataset(Path(t.path) / DATASET), t.prior, probe_bests=target_probe_bests(t))
    fitted = fit_target(t, points, method)
    return replace(fitted, accuracy={**t.accuracy, **fitted.accuracy})


def _write(shell: Target, points: Points, out: Path, measurement: dict, method: str | None) -> Target:
    fitted = fit_target(shell, points, method)
    summary = dict(fitted.accuracy)
    summary["measurement"] = measurement
    summary["note"] = ("held-out figures: each fold's points predicted by corrections fitted on the other folds; "
                       "the stored corrections are fitted on all points")
    target = replace(fitted, accuracy=summary, path=out)
    save_target(target, out)
    return target


# ====================================================================== onnxruntime
class OtherLoad:
    """Cores other processes kept busy while a measurement ran: the machine's busy time
    from ``/proc/stat`` minus this process's own CPU time, over the wall time."""

    def __enter__(self):
        from archpass.costmodel.backends.onnxruntime import cpu_times

        self._stat = cpu_times
        self.s0, self.c0, self.t0 = cpu_times(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        s1, c1, t1 = self._stat(), time.process_time(), time.perf_counter()
        self.cores = None
        if self.s0 is not None and s1 is not None and s1[0] > self.s0[0] and t1 > self.t0:
            ncpu = os.cpu_count() or 1
            busy_share = 1.0 - (s1[1] - self.s0[1]) / (s1[0] - self.s0[0])
            self.cores = max(0.0, busy_share * ncpu - (c1 - self.c0) / (t1 - self.t0))
        return False


def allowed_other_cores(threads: int) -> float:
    """How many cores other processes may keep busy while a ``threads``-thread timing runs:
    one core is kept spare besides the timing's own (two logical cores often share one
    physical core and its caches: on 2 cores, a one-thread timing ran up to 15% slower
    while another process kept the other core busy)."""
    return max((os.cpu_count() or 1) - threads - 1, 0) + 0.3


def wait_quiet(threads: int, max_wait: float, window: float = 0.2) -> float:
    """Wait (up to ``max_wait`` s) for a moment when other processes leave the cores a
    ``threads``-thread timing needs free (nothing of ours runs meanwhile, so every busy
    core is another process's).  Returns the seconds waited."""
    from archpass.costmodel.backends.onnxruntime import busy_cores

    t0 = time.perf_counter()
    allowed = allowed_other_cores(threads)
    while time.perf_counter() - t0 < max_wait:
        busy = busy_cores(window)
        if busy is None or busy <= allowed:
            break
    return time.perf_counter() - t0


@dataclass
class Network:
    """One network timed during an adaptation (a generated network or a ``--models`` file)."""

    key: str
    label: str
    proto: object
    kernels: list[Kernel]
    owner: dict
    tensor_owner: dict
    cost_s: float  # planned seconds of measurement
    windows: list = field(default_factory=list)  # per window: (first run, runs, other cores, probe ms or None)
    plain: list = field(default_factory=list)  # per window: ms without the profiler (hoststate.run_statistic)
    runs: int = 0
    sessions: tuple = ()
    fast: list = field(default_factory=list)  # indices of the fast-state windows (all with one thread)

    def fast_plain(self) -> list[float]:
        return [self.plain[i] for i in (self.fast or range(len(self.plain)))]


def _network(key: str, label: str, proto, base: Target, windows: int, runs: int, threads: int) -> Network:
    from archpass.analysis import analyze

    structure = analyze(proto)
    kernels = decompose(structure, base.fusion)
    nodes = {n.name: n for n in structure.nodes}
    owner = {n: k.id for k in kernels for n in k.nodes}
    tensor_owner = {o: k.id for k in kernels for n in k.nodes if n in nodes for o in nodes[n].outputs}
    pred_ms = float(predict_kernels(kernels, base)[0].sum())
    # each window runs the network 2 x runs times (with and without the profiler), plus
    # two sessions to build (about 0.1 s + 2 ms a node here)
    cost = windows * 2 * (runs + 1) * pred_ms / 1e3 / max(1.0, 0.7 * threads) + 2 * (0.1 + 0.002 * len(structure.nodes))
    if threads > 1:  # the pauses and untimed runs of measure_networks, two probe readings a window, blocks
        # of at least MIN_BLOCK_S
        cost += windows * 2 * (SPIN_SETTLE_S + WARMUP_RUNS_MT * pred_ms / 1e3 / (0.7 * threads))
        cost += windows * 2 * (PROBE_SETTLE_S + 0.003)
        cost += windows * 2 * max(MIN_BLOCK_S - runs * pred_ms / 1e3 / (0.7 * threads), 0.0)
    else:  # the untimed runs before each block
        cost += windows * 2 * WARMUP_RUNS_1T * pred_ms / 1e3
    return Network(key, label, proto, kernels, owner, tensor_owner, cost)


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
        nets.append(_network(point_key({"model": m.sha256}), Path(p).name, m.proto, base, windows, runs, threads))
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
            left.append(_network(point_key({"adapt_net": s, "style": style}), f"{style}-{s}", BUILDERS[style](s), base,
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


def measure_networks(nets: list[Network], provider: str, threads: int, graph_opt: str, budget_s: float,
                     windows: int = 3, runs: int = RUNS, retries: int = 2, spread_s: float = 0.0,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Time ``nets`` in ``windows`` interleaved windows (each window: every network
    ``runs`` times with onnxruntime's profiler and ``runs`` times without, each block after
    untimed runs: with one thread :data:`WARMUP_RUNS_1T`, with several a pause,
    :data:`SPIN_SETTLE_S`, and :data:`WARMUP_RUNS_MT`), within
    ``budget_s`` seconds of measurement (wall time, sessions included, waits for a quiet
    host excluded).  The first window admits networks in order while the time they took,
    repeated for the later windows, still fits the budget; the others are dropped.  A later
    window, or another try of one, starts only when a try as long as that network's last
    one still ends within the budget (a 2-thread adaptation here that only checked the
    elapsed time before each window measured 60.3 s of a 60 s budget).  A
    measurement during which other processes kept busy a core the timing needs (more than
    :func:`allowed_other_cores` busy) is taken again after waiting (up to :data:`MAX_WAIT_S`,
    at most :data:`WAIT_FACTOR` x ``budget_s`` in all) for a quiet moment, up to ``retries`` times; the least
    disturbed try is kept.  With several threads a probe (:mod:`~archpass.costmodel.hoststate`)
    is read before and after each window: a window in the host's slow state is taken again
    the same way after waiting for the fast state, and each network's statistics use its
    fast-state windows (:attr:`Network.fast`).  Window rounds start at least ``spread_s``
    seconds of wall time apart (the pause in between is a wait, not measurement), so that
    one slow phase of the host is less likely to cover every window.  Returns what was seen."""
    import shutil
    import tempfile

    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import random_feeds, session_options, timed_runs
    from archpass.costmodel.hoststate import FAST_RATIO, ParallelProbe, fast_windows, run_statistic, slow_state

    allowed = allowed_other_cores(threads)
    settle = SPIN_SETTLE_S if threads > 1 else 0.0
    min_block = MIN_BLOCK_S if threads > 1 else 0.0
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="archpass-adapt-")
    seen = {"windows": windows, "runs_per_window": runs, "min_block_s": min_block, "allowed_other_cores": allowed,
            "spread_s": spread_s, "spread_waited_s": 0.0, "remeasured": 0,
            "kept_busy": 0, "other_cores": [], "networks_dropped_by_budget": 0, "waited_s": 0.0}
    probe = ParallelProbe(threads, provider) if threads > 1 else None
    if probe is not None:
        seen.update(slow_state_remeasured=0, slow_state_kept=0, probe_fast_ratio=FAST_RATIO)
        # the best reading must be a fast-state one before windows are judged against it
        seen["waited_s"] += probe.anchor(min(ANCHOR_WAIT_S, WAIT_FACTOR * budget_s))

    def elapsed() -> float:
        """Seconds of measurement so far: wall time less the waits for a quiet host and the
        pauses that spread the window rounds."""
        return time.perf_counter() - t0 - seen["waited_s"] - seen["spread_waited_s"]

    def wait_allowance() -> float:
        return min(MAX_WAIT_S, max(WAIT_FACTOR * budget_s - seen["waited_s"], 0.0))

    try_s: dict[str, float] = {}  # per network: how long its last try took (measurement time)

    def window(n: Network) -> float:
        prof, plain, feeds, _ = n.sessions
        best = None
        start = elapsed()
        for attempt in range(retries + 1):
            before = None
            if probe is not None:  # wait for the host's fast state (not counted as measurement)
                waited, before = probe.wait_fast(wait_allowance())
                seen["waited_s"] += waited
            t_try = elapsed()
            with OtherLoad() as load:
                if settle:  # let the last session's spinning workers stop, then wake this one's
                    time.sleep(settle)
                warm = WARMUP_RUNS_MT if settle else WARMUP_RUNS_1T  # untimed runs before the block
                for _ in range(warm):
                    prof.run(None, feeds)
                n.runs += warm
                first = n.runs
                done = len(timed_runs(prof, feeds, runs, min_block))
                if settle:
                    time.sleep(settle)
                for _ in range(warm):
                    plain.run(None, feeds)
                times = timed_runs(plain, feeds, runs, min_block)
            n.runs += done
            other = load.cores if load.cores is not None else 0.0
            seen["other_cores"].append(other)
            state = None if probe is None else max(before, probe.read())
            slow = state is not None and not probe.fast(state)
            # the least disturbed try: quiet before busy, then fast state before slow
            rank = (other > allowed, slow, other)
            if best is None or rank < best[0]:
                best = (rank, (first, done, other, state), run_statistic(times, threads))
            try_s[n.key] = elapsed() - t_try
            # another try as long as this one must still end within the budget
            if (other <= allowed and not slow) or elapsed() + try_s[n.key] > budget_s or attempt == retries:
                break
            if slow:
                seen["slow_state_remeasured"] += 1
            else:  # the host is busy: wait for a quiet moment (not counted as measurement)
                seen["remeasured"] += 1
                seen["waited_s"] += wait_quiet(threads, wait_allowance())
        if best[0][0]:
            seen["kept_busy"] += 1
        if best[0][1]:
            seen["slow_state_kept"] += 1
        n.windows.append(best[1])
        n.plain.append(best[2])
        return elapsed() - start  # measurement time, waits excluded

    try:
        admitted: list[Network] = []
        per_window = 0.0  # seconds one later window of the admitted networks takes
        round_start = time.perf_counter()
        for n in nets:
            if admitted and elapsed() + (windows - 1) * per_window + n.cost_s > budget_s:
                seen["networks_dropped_by_budget"] += 1
                continue
            data = n.proto.SerializeToString()
            opt_path = os.path.join(tmp, f"{n.key}.onnx")
            so = session_options(threads, os.path.join(tmp, n.key), opt_path, graph_opt)
            prof = ort.InferenceSession(data, so, providers=[provider])
            plain = ort.InferenceSession(data, session_options(threads, graph_opt=graph_opt), providers=[provider])
            feeds = random_feeds(n.proto)
            prof.run(None, feeds)  # warm-up
            plain.run(None, feeds)
            n.runs = 1
            n.sessions = (prof, plain, feeds, opt_path)
            per_window += window(n)
            admitted.append(n)
        if progress:
            progress(f"window 1/{windows}: {len(admitted)} networks after {elapsed():.1f} s")
        for w in range(1, windows):
            if not admitted or elapsed() + try_s[admitted[0].key] > budget_s:
                break  # no window of this round would fit the budget: no pause for it either
            pause = round_start + spread_s - time.perf_counter()
            if pause > 0:  # spread the rounds over the host's phases (a wait, not measurement)
                time.sleep(pause)
                seen["spread_waited_s"] += pause
            round_start = time.perf_counter()
            for n in admitted:
                if elapsed() + try_s[n.key] > budget_s:  # a window of this network would end past the budget
                    break
                window(n)
            if progress:
                progress(f"window {w + 1}/{windows} after {elapsed():.1f} s")
        seen["seconds"] = round(elapsed(), 1)
        seen["waited_s"] = round(seen["waited_s"], 1)
        seen["spread_waited_s"] = round(seen["spread_waited_s"], 1)
        if probe is not None:  # fast-state windows against the best probe reading of the whole measurement
            for n in admitted:
                n.fast = fast_windows([w[3] for w in n.windows], probe.best)
            states = [w[3] for n in admitted for w in n.windows]
            seen.update(probe_best_ms=round(probe.best, 4), probe_median_ms=round(float(np.median(probe.readings)), 4),
                        probe_one_thread_ms=round(probe.serial_ms, 4), parallel_state_seen=probe.parallel_seen,
                        slow_state_windows=int(sum(slow_state(s, probe.best) for s in states)), windows_kept=len(states),
                        networks_without_fast_window=int(sum(all(slow_state(w[3], probe.best) for w in n.windows)
                                                             for n in admitted)))
        profiles = {n.key: (n.sessions[0].end_profiling(), n.sessions[3]) for n in admitted}
        for n in admitted:
            n.sessions = ()
        return {"seen": seen, "profiles": profiles, "tmp": tmp}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def measurement_notes(m: dict, budget_s: float) -> list[str]:
    """One line per reason to trust a measurement's level less: the host was in its slow
    state for more than :data:`UNSTABLE_SHARE` of the windows, or other processes kept a
    needed core busy for that share of the measurements (``m``: what
    :func:`measure_networks` saw)."""
    notes = []
    if m.get("parallel_state_seen") is False:
        notes.append(f"the host never ran the probe's threads in parallel (its best reading, {m['probe_best_ms']:g} ms, "
                     f"against {m['probe_one_thread_ms']:g} ms on one thread): the whole measurement was in a slow state "
                     "and predictions are likely high, small models' most; adapt again when the host is quiet")
    windows = int(m.get("windows_kept") or 0)
    slow = int(m.get("slow_state_windows") or 0)
    used_up = float(m.get("waited_s") or 0.0) >= WAIT_FACTOR * budget_s - MAX_WAIT_S
    waits = f" (waits for its fast state used up their {WAIT_FACTOR * budget_s:g} s)" if used_up else ""
    if windows and slow >= windows:
        # no network timed in the fast state: the level is the slow state's (two 2-thread
        # adaptations on a host whose median probe reading at 2 threads was 0.91 and 1.07
        # of its one-thread time came out +17 and +29% on average against the fast
        # state's truths)
        notes.append(f"the host ran multi-threaded work slowly during all {windows} windows{waits}: no network was "
                     "timed in its fast state, so predictions are likely high by tens of percent; adapt again when "
                     "the host is quiet")
    elif windows and slow > UNSTABLE_SHARE * windows:
        # two such 2-thread adaptations (50 of 63 and 34 of 111 windows slow) came out +14.8
        # and +18.7% on average, where the host's other adaptations of those hours were
        # within 5% (docs/architecture.md, fifth and seventh machines)
        notes.append(f"the host ran multi-threaded work slowly during {slow} of {windows} windows{waits}"
                     ": predictions may be high by up to about 20%; adapt again when the host is quiet, "
                     "or add a round later with --add")
    taken = windows or len(m.get("other_cores") or ())
    busy = int(m.get("kept_busy") or 0)
    if taken and busy > UNSTABLE_SHARE * taken:
        notes.append(f"{busy} of {taken} measurements were kept while other processes kept a needed core busy: "
                     "predictions may be high; adapt again when the machine is idle")
    return notes


def network_ms(n: Network) -> float:
    """A timed network's latency without the profiler: :func:`window_level` of its
    windows (with several threads, of its fast-state windows, :attr:`Network.fast`)."""
    return window_level(n.fast_plain())


def kernel_window_statistic(threads: int):
    """How a profiled kernel's windows combine: the median with one thread; with several
    the minimum over the fast-state windows.  Short slow states slip between the probe's
    readings (a small network's three probed-fast windows read 0.66, 0.41 and 0.65 ms
    here) and only ever slow a window down, most for the smallest kernels; the kernels
    shape the correction, the networks' medians set its level.  (Kernel medians, tried in
    four 2-thread adaptations, predicted MobileNetV3-Small 16-39% high; four with the
    minimum, from the same plans, 8-12%.)"""
    return np.median if threads <= 1 else np.min


def network_points(n: Network, profile_path: str, optimized_path: str, overhead_ms: float,
                   threads: int = 1) -> list[dict]:
    """Kernel points of one timed network: per window the 30th percentile of each kernel's
    per-run times, combined over windows (:func:`kernel_window_statistic`), less the profiler's
    per-node overhead."""
    import json as _json

    import onnx

    from archpass.costmodel.backends.onnxruntime import attribute
    from archpass.costmodel.calibrate import robust_ms

    with open(profile_path) as f:
        events = _json.load(f)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
    optimized = onnx.load(optimized_path, load_external_data=False) if os.path.exists(optimized_path) else None
    times, _, counts = attribute(per_node, optimized, n.owner, n.tensor_owner)
    out = []
    for k in n.kernels:
        ts = times.get(k.id)
        if not ts:
            continue
        kept = [n.windows[i] for i in (n.fast or range(len(n.windows)))]
        per_window = [robust_ms(ts[w[0]: w[0] + w[1]]) for w in kept if len(ts) >= w[0] + w[1]]
        if not per_window:
            continue
        ms = float(kernel_window_statistic(threads)(per_window))
        out.append({"spec": k.spec(), "id": k.id, "nodes": counts.get(k.id, 0),
                    "ms": max(ms - overhead_ms * counts.get(k.id, 0), MIN_KERNEL_SHARE * ms)})
    return out


#: what each round of an onnxruntime adaptation records (``accuracy.measurement.rounds``)
ROUND_KEYS = ("when", "seed", "seconds", "networks", "notes", "other_cores_median", "spread_waited_s", "models",
              "probe_best_ms")


def earlier_rounds(out: Path, prior: Target, provider: str, threads: int, graph_opt: str) -> list[dict]:
    """The measurement rounds of the adapted target in ``out`` that another round
    (``calibrate --adapt ... --add``) joins: it must have been adapted from the same base
    with the same provider, threads and graph optimization level, on this machine."""
    from archpass.costmodel.host import same_machine

    fix = "run it once without --add (the same -o), or pass the settings it was adapted with"
    if not (out / "target.json").is_file():
        raise TargetError(f"--add: {out} holds no adapted target", fix)
    try:
        before = load_target(out)
    except TargetError as e:
        raise TargetError(f"--add: {out} holds no readable target ({e.problem})", fix) from None
    src = before.source or {}
    want = {"backend": "onnxruntime", "adapted_from": prior.name, "provider": provider, "threads": threads,
            "graph_optimization": graph_opt}
    other = [f"{k} {src.get(k)!r}, not {v!r}" for k, v in want.items() if src.get(k) != v]
    if before.prior is None or other:
        raise TargetError(f"--add: {out} was adapted otherwise ({'; '.join(other) or 'not an adaptation'})", fix)
    if not same_machine(src.get("host")):
        raise TargetError(f"--add: {out} was measured on another machine",
                          "adapt into a new -o here (rounds of different machines do not pool)")
    m = before.accuracy.get("measurement") or {}
    rounds = list(m.get("rounds") or [])
    if not rounds:  # a target adapted before rounds were recorded: its networks are the unprefixed records
        keys = [k for k in Dataset(out / DATASET).records if not ROUND_PREFIX.match(k)]
        rounds = [{k: m[k] for k in ROUND_KEYS if k in m} | {"keys": keys}]
    return rounds


def adapt_onnxruntime(*, base: str | Path | Target, name: str, out_dir: str | Path,
                      provider: str = "CPUExecutionProvider", threads: int = 1, graph_opt: str = "all",
                      budget_s: float = 60.0, seed: int = 0, models=(), windows: int = 3, runs: int = RUNS,
                      spread_s: float | None = None,
                      description: str = "", method: str | None = None, pool: int = 96, add: bool = False,
                      progress: Callable[[str], None] | None = None) -> Target:
    """Adapt an onnxruntime target to this host / provider / threads / graph optimization
    level from at most ``budget_s`` seconds of measurement, its window rounds ``spread_s``
    apart (by default :data:`SPREAD_S`, at most :data:`SPREAD_FACTOR` x ``budget_s``).

    ``add``: ``out_dir`` holds a target this function adapted with the same base and
    settings on this host; measure another round (its own networks, drawn with the next
    seed) and fit on every round's networks (:func:`earlier_rounds`)."""
    import shutil

    from archpass.costmodel.backends.onnxruntime import check_graph_opt, check_provider
    from archpass.costmodel.host import fingerprint, host_fusion, package_version

    prior = load_base(base, "onnxruntime")
    check_provider(provider)
    check_graph_opt(graph_opt)
    if threads < 1:
        raise TargetError(f"--threads {threads} is not positive", "pass 1 or more")
    if budget_s < MIN_NETWORK_S:
        raise TargetError(f"--budget-s {budget_s:g} is too small to measure anything (one network takes at least "
                          f"{MIN_NETWORK_S:g} s: two sessions and {windows} timing windows)", "raise --budget-s (60 s is the default)")
    if spread_s is None:
        spread_s = min(SPREAD_S, SPREAD_FACTOR * budget_s)
    if spread_s < 0:
        raise TargetError(f"--spread-s {spread_s:g} is negative", "pass 0 (rounds back to back) or more")
    out = Path(out_dir)
    rounds = earlier_rounds(out, prior, provider, threads, graph_opt) if add else []
    seed += len(rounds)  # another round draws other networks
    this_round = len(rounds) + 1
    t_all = time.time()
    fusion = host_fusion(prior.fusion, provider, graph_opt)
    # the plan decomposes its networks with this host's layout (the prior's own predictions
    # do not read the layout flags)
    nets = select_networks(replace(prior, fusion=fusion), budget_s, windows, runs, threads, seed, models, pool,
                           progress=progress)
    got = measure_networks(nets, provider, threads, graph_opt, budget_s, windows, runs, spread_s=spread_s,
                           progress=progress)
    seen = got["seen"]
    overhead = float(prior.source.get("profiler_overhead_ms_per_node", 0.0))
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(out / DATASET)
    try:
        for n in nets:
            if n.key not in got["profiles"]:
                continue
            pts = network_points(n, *got["profiles"][n.key], overhead, threads)
            dataset.add({"key": round_key(n.key, this_round), "group": "network", "payload": {"label": n.label}, "points": pts,
                         "all_kernels": [{"id": k.id, "spec": k.spec()} for k in n.kernels],
                         "plain_ms": network_ms(n), "window_plain_ms": n.plain,
                         "other_cores": [w[2] for w in n.windows], "probe_ms": [w[3] for w in n.windows],
                         "fast_windows": n.fast})
    finally:
        shutil.rmtree(got["tmp"], ignore_errors=True)
    keys = [round_key(n.key, this_round) for n in nets if n.key in got["profiles"]]
    points = dataset_points(dataset, prior, set(keys).union(*(r["keys"] for r in rounds)),
                            round_probe_bests([*rounds, {}], seen.get("probe_best_ms")))
    if len(points) < 5 or len(keys) < 2:
        raise TargetError(f"--budget-s {budget_s:g} measured only {len(keys)} network(s)",
                          "raise --budget-s (60 s is the default)")
    notes = measurement_notes(seen, budget_s)
    oc = seen.pop("other_cores")
    measurement = {**seen, "notes": notes, "window_statistic": "mean of the faster half of the windows" if threads <= 1
                   else "mean of the faster half of the fast-state windows",
                   "kernel_window_statistic": "median" if threads <= 1 else "min of fast-state windows",
                   "networks": len(keys), "other_cores_median": float(np.median(oc)) if oc else None,
                   "other_cores_max": float(np.max(oc)) if oc else None, "total_seconds": round(time.time() - t_all, 1),
                   "models": [Path(p).name for p in models], "seed": seed,
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # every round's own record (the fit pools their networks); the target's measurement
    # figures are the latest round's, its notes every round's
    measurement["rounds"] = [*rounds, {k: measurement[k] for k in ROUND_KEYS if k in measurement} | {"keys": keys}]
    measurement["notes"] = [*(f"round {i + 1}: {n}" for i, r in enumerate(rounds) for n in r.get("notes") or []),
                            *((f"round {len(rounds) + 1}: {n}" for n in notes) if rounds else notes)]
    shell = Target(
        name=name,
        description=description or f"onnxruntime {provider}, {threads} thread(s)"
        + (f", graph optimizations {graph_opt}" if graph_opt != "all" else "") + f", adapted from {prior.name}",
        parallelism=prior.parallelism, dtype=prior.dtype, bytes_per_element=prior.bytes_per_element, clock_hz=None,
        unroll=prior.unroll, mem_bits_per_step=prior.mem_bits_per_step, fusion=fusion,
        source={"backend": "onnxruntime", "provider": provider, "threads": threads, "graph_optimization": graph_opt,
                "onnxruntime_version": package_version("onnxruntime"), "host": fingerprint(provider, threads, graph_opt),
                "profiler_overhead_ms_per_node": overhead, "adapted_from": prior.name, "budget_s": budget_s},
        prior=prior,
    )
    return _write(shell, points, out, measurement, method)


__all__ = ["adapt_zigzag", "adapt_onnxruntime", "adapt_layers", "dataset_points", "slow_only_levels", "round_probe_bests",
           "target_probe_bests", "refit",
           "fit_corrections", "fit_target", "layout_blocks", "Points", "select_layers", "select_networks",
           "measure_networks", "measurement_notes", "load_base", "earlier_rounds", "round_key", "METHODS", "PER_KIND"]
