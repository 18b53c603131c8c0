"""Fitting a correction on top of the prior (step 3 of :mod:`archpass.costmodel.adapt`).

Per kernel kind, ``log(measured / prior) ≈ θ · (1, log prior, log compute steps, log
memory traffic)`` on the new hardware, with θ shrunk towards the prior (θ = 0), or
residual trees over a pooled scale.  Candidates: one ``scale`` for everything, a
``class_scale`` per kernel kind shrunk towards it, ``loglinear`` at three ridge strengths,
a new analytic baseline (``rebaseline*``), residual trees, corrections of the prior's
predictors evaluated on new hardware (``transfer_*``), and ``per_kind`` (per kernel class
the method with the lowest held-out error); the one with the lowest cross-validated error
(networks or layers held out by group) is kept (:func:`fit_corrections`), and its
held-out figures are the target's accuracy summary.  Runtime targets then get a
whole-network fit (a factor per kernel class and per-kernel terms, stacked on
out-of-fold rows) so that the kernels of a network sum to its latency measured without
the profiler.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

from archpass.costmodel.calibrate import accuracy_stats
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.features import blocked_layout, correction_rows
from archpass.costmodel.kernels import GENERIC_OP, LAYER_KINDS, Kernel
from archpass.costmodel.predictor import LAYER_TERMS, OP_TERMS, Correction, lightgbm
from archpass.costmodel.target import Target
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
    # round -> what :func:`~archpass.costmodel.adapt.slow_only_levels` did
    slow_state_scaling: dict = field(default_factory=dict)

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
    host's block unless the base's held-out network error is lower beyond noise."""
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
    of its :func:`layout_blocks`: the block the host lays its tensors out in (the last) is
    kept unless another one's held-out network MAPE is lower beyond noise (2%).  Where the
    two tie, the host's block is the one the runtime pads to: on an AVX-512 host (NCHWc 16,
    the eleventh machine in docs/architecture.md) six adaptations refitted with 16 each got
    5-10 points more of the held-out models within ±10% than with 8, where the earlier rule
    (the base's 8 unless 16 was lower beyond noise) had taken 8 in three of them."""
    fits = []
    for cand in layout_blocks(shell):
        corr, summary = fit_corrections(points, cand, method)
        fits.append((cand, corr, summary, float((summary.get("chains") or {}).get("mape_pct", math.inf))))
    cand, corr, summary, err = fits[-1]
    for f in reversed(fits[:-1]):
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


__all__ = ["fit_corrections", "fit_target", "layout_blocks", "Points", "Rows", "round_key", "ROUND_PREFIX",
           "METHODS", "OWN_METHODS", "TRANSFER_METHODS", "PER_KIND", "CLASSES", "KERNEL_TERMS", "FOLDS"]
