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
   several interleaved windows (all networks once, then again...), the median over windows
   counts; the load other processes put on the machine is sampled around every
   measurement from ``/proc/stat`` and a measurement taken while the cores the timing needs
   were busy is repeated.  What was seen is recorded in the target (``accuracy.measurement``).
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

import hashlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from archpass.costmodel.calibrate import DATASET, Dataset, Job, Progress, accuracy_stats, point_key, run_jobs
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.features import correction_rows, layer_features
from archpass.costmodel.kernels import GENERIC_OP, LAYER_KINDS, FusionRules, Kernel, decompose
from archpass.costmodel.predictor import LAYER_TERMS, OP_TERMS, Correction
from archpass.costmodel.target import Target, load_target, save_target
from archpass.errors import TargetError

METHODS = ("scale", "class_scale", "loglinear_strong", "loglinear", "loglinear_weak", "rebaseline",
           "rebaseline_loglinear")
RIDGE = {"loglinear_strong": 30.0, "loglinear": 5.0, "loglinear_weak": 1.0, "rebaseline_loglinear": 5.0}
#: methods whose reference is a new analytic baseline fitted on the adaptation points
REBASELINE = ("rebaseline", "rebaseline_loglinear")
MIN_POINTS_BASELINE = 4
MIN_POINTS_LOGLINEAR = 6
FOLDS = 5
MIN_NETWORK_S = 0.5  # building two sessions and timing the smallest network in three windows


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


def _fold(group: str) -> int:
    return int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) % FOLDS


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


def _fit(method: str, kernels: list[Kernel], z: np.ndarray, y: np.ndarray, bt: np.ndarray,
         lp: np.ndarray) -> dict[str, Correction]:
    """Corrections of one method from points: kernels, their correction terms ``z``, log
    ratios ``y`` = log(measured / prior), analytic base terms ``bt`` on the new hardware
    and log prior predictions ``lp``."""
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


def _apply(corr: dict[str, Correction], kernels: list[Kernel], z: np.ndarray, bt: np.ndarray,
           lp: np.ndarray) -> np.ndarray:
    """Log of predicted / prior for kernels (the rule of :func:`~archpass.costmodel.estimate.correction_for`)."""
    out = np.zeros(len(kernels))
    for i, k in enumerate(kernels):
        c = (corr.get(k.kind) or corr.get("layer")) if k.kind in LAYER_KINDS else corr.get(GENERIC_OP)
        if c is not None:
            nb = len(c.baseline) or (4 if k.kind in LAYER_KINDS else 2)
            ref = c.reference(np.exp(lp[i: i + 1]), bt[i: i + 1, :nb])
            out[i] = float(np.log(ref[0]) - lp[i] + np.log(c.factor(z[i: i + 1, : len(c.terms)])[0]))
    return out


@dataclass(frozen=True)
class Points:
    """Adaptation measurements: kernels with their prior prediction and measured latency,
    grouped (one group per network or layer) with each group's whole latency when known."""

    kernels: tuple[Kernel, ...]
    prior_ms: np.ndarray
    ms: np.ndarray
    groups: tuple[str, ...]
    network_ms: dict = field(default_factory=dict)  # group -> latency measured without the profiler

    def __len__(self) -> int:
        return len(self.kernels)


def _terms(points: Points, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """Correction terms and analytic base terms (on ``target``'s hardware) of every point,
    padded to the layer width."""
    from archpass.costmodel.features import feature_rows

    z = np.zeros((len(points), len(LAYER_TERMS)))
    bt = np.zeros((len(points), 4))
    for layer in (True, False):
        idx = [i for i, k in enumerate(points.kernels) if (k.kind in LAYER_KINDS) == layer]
        if idx:
            ks = [points.kernels[i] for i in idx]
            rows = correction_rows(ks, target, points.prior_ms[idx])
            z[np.ix_(idx, range(rows.shape[1]))] = rows
            base = feature_rows(ks, target)[1]
            bt[np.ix_(idx, range(base.shape[1]))] = base
    return z, bt


def _network_scale(points: Points, log_corr: np.ndarray, mask: np.ndarray) -> float:
    """Median over the masked groups with a whole-network latency of measured / predicted sum."""
    ratios = []
    for g in sorted({points.groups[i] for i in np.flatnonzero(mask)}):
        if g not in points.network_ms:
            continue
        idx = [i for i in np.flatnonzero(mask) if points.groups[i] == g]
        pred = float(np.sum(points.prior_ms[idx] * np.exp(log_corr[idx])))
        ratios.append(points.network_ms[g] / max(pred, 1e-12))
    return float(np.median(ratios)) if ratios else 1.0


def _with_network_scale(corr: dict[str, Correction], scale: float) -> dict[str, Correction]:
    if abs(math.log(scale)) < 1e-6:
        return corr
    return {k: replace(c, coef=(c.coef[0] + math.log(scale), *c.coef[1:])) for k, c in corr.items()}


def fit_corrections(points: Points, target: Target, method: str | None = None) -> tuple[dict[str, Correction], dict]:
    """Corrections of ``target``'s prior from ``points``, by the method with the lowest
    cross-validated error (or ``method``), and the held-out summary of every method."""
    z, bt = _terms(points, target)
    lp = np.log(np.maximum(points.prior_ms, 1e-12))
    y = np.log(points.ms) - lp
    kernels = list(points.kernels)
    folds = np.array([_fold(g) for g in points.groups])
    runtime = bool(points.network_ms)
    cv: dict[str, dict] = {}
    for m in METHODS:
        pred_log = np.full(len(points), np.nan)
        net_pred, net_meas = [], []
        for f in range(FOLDS):
            test = folds == f
            if not test.any() or test.all():
                continue
            corr = _fit(m, [kernels[i] for i in np.flatnonzero(~test)], z[~test], y[~test], bt[~test], lp[~test])
            all_log = _apply(corr, kernels, z, bt, lp)
            scale = _network_scale(points, all_log, ~test) if runtime else 1.0
            pred_log[test] = all_log[test] + math.log(scale)
            for g in sorted({points.groups[i] for i in np.flatnonzero(test)}):
                if g in points.network_ms:
                    idx = [i for i in np.flatnonzero(test) if points.groups[i] == g]
                    net_pred.append(float(np.sum(points.prior_ms[idx] * np.exp(pred_log[idx]))))
                    net_meas.append(points.network_ms[g])
        ok = ~np.isnan(pred_log)
        pred = points.prior_ms[ok] * np.exp(pred_log[ok])
        cv[m] = {"kernels": accuracy_stats(pred, points.ms[ok])}
        # the error a sum of these kernels would see (without cancellation): whole-model
        # latency is a latency-weighted sum of its kernels'
        cv[m]["kernels"]["latency_weighted_mape_pct"] = float(
            np.sum(points.ms[ok] * np.abs(pred / points.ms[ok] - 1)) / np.sum(points.ms[ok]) * 100)
        if net_meas:
            cv[m]["networks"] = accuracy_stats(np.array(net_pred), np.array(net_meas))
    prior_stats = accuracy_stats(points.prior_ms, points.ms)
    key = "networks" if runtime and all("networks" in v for v in cv.values()) else "kernels"
    metric = "mape_pct" if key == "networks" else "latency_weighted_mape_pct"

    def score(m: str) -> float:
        return cv[m][key].get(metric, float("inf"))

    chosen = method or min(METHODS, key=score)
    if chosen not in METHODS:
        raise TargetError(f"unknown correction method '{chosen}'", f"use one of {', '.join(METHODS)}")
    corr = _fit(chosen, kernels, z, y, bt, lp)
    scale = _network_scale(points, _apply(corr, kernels, z, bt, lp), np.ones(len(points), bool)) if runtime else 1.0
    corr = _with_network_scale(corr, scale)
    summary = {
        "method": chosen,
        "selected_by": f"lowest cross-validated {metric} over {key} ({FOLDS} folds by {'network' if runtime else 'layer'})"
        if method is None else "given",
        "cross_validation": cv,
        "all_kernels": cv[chosen]["kernels"],
        "prior_on_these_points": prior_stats,
        "network_scale": scale,
        "measured_points": len(points),
        "groups": len(set(points.groups)),
    }
    if "networks" in cv[chosen]:
        summary["chains"] = cv[chosen]["networks"]
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
            spec = {**k.spec(), "in_from_op": False, "out_to_op": False}
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


def dataset_points(dataset: Dataset, prior: Target, keys=None) -> Points:
    """The adaptation points of a dataset's records (all, or ``keys``): each record's
    kernels predicted by the prior together (runtime predictors read the whole network),
    grouped by record, with the record's latency without the profiler when it has one."""
    kernels, ms, groups, prior_ms, net = [], [], [], [], {}
    for key, rec in dataset.records.items():
        pts = [p for p in rec.get("points") or [] if p.get("ms") and math.isfinite(p["ms"]) and p["ms"] > 0]
        if (keys is not None and key not in keys) or not pts:
            continue
        ks = [Kernel.from_spec(p["spec"]) for p in pts]
        prior_ms.append(predict_kernels(ks, prior)[0])
        kernels += ks
        ms += [float(p["ms"]) for p in pts]
        groups += [key] * len(ks)
        if rec.get("plain_ms"):
            net[key] = float(rec["plain_ms"])
    return Points(tuple(kernels), np.concatenate(prior_ms) if prior_ms else np.zeros(0), np.array(ms), tuple(groups), net)


def refit(directory: str | Path, method: str | None = None) -> Target:
    """An adapted target's corrections fitted again from its stored measurements (no new
    measurement), by ``method`` or the best cross-validated one.  Not written."""
    t = load_target(directory)
    if t.prior is None:
        raise TargetError(f"target {directory} is not an adapted target", "pass the directory 'calibrate --adapt' wrote")
    points = dataset_points(Dataset(Path(t.path) / DATASET), t.prior)
    corr, summary = fit_corrections(points, t, method)
    return replace(t, corrections=corr, accuracy={**t.accuracy, **summary})


def _write(shell: Target, points: Points, out: Path, measurement: dict, method: str | None) -> Target:
    corr, summary = fit_corrections(points, shell, method)
    summary["measurement"] = measurement
    summary["note"] = ("held-out figures: each fold's points predicted by corrections fitted on the other folds; "
                       "the stored corrections are fitted on all points")
    target = replace(shell, corrections=corr, accuracy=summary, path=out)
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
    windows: list = field(default_factory=list)  # per window: (first run, runs, other cores, kept)
    plain: list = field(default_factory=list)  # per window: median ms without the profiler
    runs: int = 0
    sessions: tuple = ()


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
    return Network(key, label, proto, kernels, owner, tensor_owner, cost)


def select_networks(base: Target, budget_s: float, windows: int, runs: int, threads: int, seed: int = 0,
                    models=(), pool: int = 24, progress: Callable[[str], None] | None = None) -> list[Network]:
    """The networks to time within ``budget_s``: the ``--models`` first, then generated
    networks (half following families' stage plans, half freely drawn) chosen greedily by
    how many kernel shapes not yet covered they add per second of measurement."""
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
    cands = []
    for i in range(pool):
        style = ("template", "network")[i % 2]
        s = seed * 100003 + 700001 + i
        cands.append(_network(point_key({"adapt_net": s, "style": style}), f"{style}-{s}", BUILDERS[style](s), base,
                              windows, runs, threads))
    cheapest = min(c.cost_s for c in cands)
    if planned + cheapest > budget_s and not nets:
        raise TargetError(f"--budget-s {budget_s:g} is too small to measure anything: the smallest network needs "
                          f"about {cheapest:.1f} s", "raise --budget-s (60 s is the default)")

    def cells(n: Network) -> set:
        return {(k.kind, k.op if k.kind not in LAYER_KINDS else k.kernel[0], k.stride[0],
                 int(math.log2(max(k.macs if k.kind in LAYER_KINDS else k.out_elems, 1)) // 1)) for k in n.kernels}

    covered = set().union(*(cells(n) for n in nets)) if nets else set()
    left = list(cands)
    while left:
        fits = [c for c in left if planned + c.cost_s <= budget_s]
        if not fits:
            break
        best = max(fits, key=lambda c: (len(cells(c) - covered) + 0.1) / c.cost_s)
        nets.append(best)
        left.remove(best)
        covered |= cells(best)
        planned += best.cost_s
    if progress:
        progress(f"{len(nets)} networks planned, about {planned:.0f} s of measurement")
    return nets


def measure_networks(nets: list[Network], provider: str, threads: int, graph_opt: str, budget_s: float,
                     windows: int = 3, runs: int = 5, retries: int = 2,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Time ``nets`` in ``windows`` interleaved windows (each window: every network
    ``runs`` times with onnxruntime's profiler and ``runs`` times without), within
    ``budget_s`` seconds of wall time, sessions included.  The first window admits
    networks in order while the time they took, repeated for the later windows, still fits
    the budget; the others are dropped.  A measurement during which other processes kept
    busy a core the timing needs (more than ``cores - threads + 0.3`` busy) is taken again,
    up to ``retries`` times; the least disturbed try is kept.  Returns what was seen."""
    import shutil
    import tempfile

    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import random_feeds, session_options

    ncpu = os.cpu_count() or 1
    allowed = max(ncpu - threads, 0) + 0.3
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="archpass-adapt-")
    seen = {"windows": windows, "runs_per_window": runs, "allowed_other_cores": allowed, "remeasured": 0,
            "kept_busy": 0, "other_cores": [], "networks_dropped_by_budget": 0}

    def window(n: Network) -> float:
        prof, plain, feeds, _ = n.sessions
        best = None
        start = time.perf_counter()
        for attempt in range(retries + 1):
            first = n.runs
            with OtherLoad() as load:
                for _ in range(runs):
                    prof.run(None, feeds)
                times = []
                for _ in range(runs):
                    a = time.perf_counter()
                    plain.run(None, feeds)
                    times.append((time.perf_counter() - a) * 1e3)
            n.runs += runs
            other = load.cores if load.cores is not None else 0.0
            seen["other_cores"].append(other)
            if best is None or other < best[2]:
                best = (first, runs, other, float(np.median(times)))
            if other <= allowed or time.perf_counter() - t0 > budget_s:
                break
            seen["remeasured"] += 1
            time.sleep(0.2)
        if best[2] > allowed:
            seen["kept_busy"] += 1
        n.windows.append(best[:3])
        n.plain.append(best[3])
        return time.perf_counter() - start

    try:
        admitted: list[Network] = []
        per_window = 0.0  # seconds one later window of the admitted networks takes
        for n in nets:
            if admitted and time.perf_counter() - t0 + (windows - 1) * per_window + n.cost_s > budget_s:
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
            progress(f"window 1/{windows}: {len(admitted)} networks after {time.perf_counter() - t0:.1f} s")
        for w in range(1, windows):
            for n in admitted:
                if time.perf_counter() - t0 > budget_s:
                    break
                window(n)
            if progress:
                progress(f"window {w + 1}/{windows} after {time.perf_counter() - t0:.1f} s")
        seen["seconds"] = round(time.perf_counter() - t0, 1)
        profiles = {n.key: (n.sessions[0].end_profiling(), n.sessions[3]) for n in admitted}
        for n in admitted:
            n.sessions = ()
        return {"seen": seen, "profiles": profiles, "tmp": tmp}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def network_points(n: Network, profile_path: str, optimized_path: str, overhead_ms: float) -> list[dict]:
    """Kernel points of one timed network: per window the 30th percentile of each kernel's
    per-run times, the median over windows, less the profiler's per-node overhead."""
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
        per_window = [robust_ms(ts[first: first + runs]) for first, runs, _ in n.windows if len(ts) >= first + runs]
        if not per_window:
            continue
        ms = float(np.median(per_window))
        out.append({"spec": k.spec(), "id": k.id, "nodes": counts.get(k.id, 0),
                    "ms": max(ms - overhead_ms * counts.get(k.id, 0), 0.2 * ms)})
    return out


def adapt_onnxruntime(*, base: str | Path | Target, name: str, out_dir: str | Path,
                      provider: str = "CPUExecutionProvider", threads: int = 1, graph_opt: str = "all",
                      budget_s: float = 60.0, seed: int = 0, models=(), windows: int = 3, runs: int = 5,
                      description: str = "", method: str | None = None, pool: int = 24,
                      progress: Callable[[str], None] | None = None) -> Target:
    """Adapt an onnxruntime target to this host / provider / threads / graph optimization
    level from at most ``budget_s`` seconds of measurement."""
    import shutil

    from archpass.costmodel.backends.onnxruntime import check_graph_opt, check_provider
    from archpass.costmodel.host import fingerprint, package_version

    prior = load_base(base, "onnxruntime")
    check_provider(provider)
    check_graph_opt(graph_opt)
    if threads < 1:
        raise TargetError(f"--threads {threads} is not positive", "pass 1 or more")
    if budget_s < MIN_NETWORK_S:
        raise TargetError(f"--budget-s {budget_s:g} is too small to measure anything (one network takes at least "
                          f"{MIN_NETWORK_S:g} s: two sessions and {windows} timing windows)", "raise --budget-s (60 s is the default)")
    out = Path(out_dir)
    t_all = time.time()
    nets = select_networks(prior, budget_s, windows, runs, threads, seed, models, pool, progress=progress)
    got = measure_networks(nets, provider, threads, graph_opt, budget_s, windows, runs, progress=progress)
    seen = got["seen"]
    overhead = float(prior.source.get("profiler_overhead_ms_per_node", 0.0))
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(out / DATASET)
    try:
        for n in nets:
            if n.key not in got["profiles"]:
                continue
            pts = network_points(n, *got["profiles"][n.key], overhead)
            dataset.add({"key": n.key, "group": "network", "payload": {"label": n.label}, "points": pts,
                         "plain_ms": float(np.median(n.plain)), "window_plain_ms": n.plain,
                         "other_cores": [w[2] for w in n.windows]})
    finally:
        shutil.rmtree(got["tmp"], ignore_errors=True)
    keys = [n.key for n in nets if n.key in got["profiles"]]
    points = dataset_points(dataset, prior, set(keys))
    if len(points) < 5 or len(keys) < 2:
        raise TargetError(f"--budget-s {budget_s:g} measured only {len(keys)} network(s)",
                          "raise --budget-s (60 s is the default)")
    oc = seen.pop("other_cores")
    measurement = {**seen, "networks": len(keys), "other_cores_median": float(np.median(oc)) if oc else None,
                   "other_cores_max": float(np.max(oc)) if oc else None, "total_seconds": round(time.time() - t_all, 1),
                   "models": [Path(p).name for p in models]}
    shell = Target(
        name=name,
        description=description or f"onnxruntime {provider}, {threads} thread(s)"
        + (f", graph optimizations {graph_opt}" if graph_opt != "all" else "") + f", adapted from {prior.name}",
        parallelism=prior.parallelism, dtype=prior.dtype, bytes_per_element=prior.bytes_per_element, clock_hz=None,
        unroll=prior.unroll, mem_bits_per_step=prior.mem_bits_per_step, fusion=prior.fusion,
        source={"backend": "onnxruntime", "provider": provider, "threads": threads, "graph_optimization": graph_opt,
                "onnxruntime_version": package_version("onnxruntime"), "host": fingerprint(provider, threads, graph_opt),
                "profiler_overhead_ms_per_node": overhead, "adapted_from": prior.name, "budget_s": budget_s},
        prior=prior,
    )
    return _write(shell, points, out, measurement, method)


__all__ = ["adapt_zigzag", "adapt_onnxruntime", "adapt_layers", "dataset_points", "refit", "fit_corrections", "Points", "select_layers", "select_networks",
           "measure_networks", "load_base", "METHODS"]
