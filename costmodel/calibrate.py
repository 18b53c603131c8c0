"""Calibration: sample kernels, measure them, fit the predictors, write a target.

Every measured point is appended to ``DIR/dataset.jsonl`` as soon as it arrives, so an
interrupted calibration resumes where it stopped (samples are a pure function of the
seed).  Points a backend cannot measure are recorded with their error and skipped.
A deterministic fifth of the points (by hash) is held out to measure accuracy; the
predictors written to the target are then refitted on all points.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from archpass.costmodel.extrapolation import kernel_range
from archpass.costmodel.features import feature_rows, network_context
from archpass.costmodel.host import package_version
from archpass.costmodel.kernels import GENERIC_OP, LAYER_KINDS, FusionRules, Kernel
from archpass.costmodel.predictor import Predictor
from archpass.costmodel.target import Target, save_target
from archpass.errors import TargetError
from archpass.io import check_output_dir

Progress = Callable[[int, int, str], None]
DATASET = "dataset.jsonl"
HOLDOUT = 0.2


def point_key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def held_out(key: str, fraction: float = HOLDOUT) -> bool:
    return int(key[:8], 16) / 0xFFFFFFFF < fraction


# ---------------------------------------------------------------------- the cache
class Dataset:
    """Append-only JSON-lines file of measured points ``{"key", "group", "points": [...], "error"}``.

    A record is one measurement job: one layer (ZigZag) or one generated chain with the
    times of its kernels (onnxruntime)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            with self.path.open() as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interruption
                    self.records[rec["key"]] = rec

    def add(self, rec: dict) -> None:
        self.records[rec["key"]] = rec
        from archpass.io import append_line

        append_line(self.path, json.dumps(rec, sort_keys=True))

    def rewrite(self) -> None:
        """Write every record again (atomically), e.g. after their specs were refreshed."""
        from archpass.io import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records.values()))

    def points(self) -> list[tuple[str, dict, float]]:
        """(record key, kernel spec, latency ms) of every successful point."""
        out = []
        for key, rec in self.records.items():
            for p in rec.get("points", []):
                if p.get("ms") is not None and math.isfinite(p["ms"]) and p["ms"] > 0:
                    out.append((key, p["spec"], float(p["ms"])))
        return out

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records.values() if r.get("error")]


# ---------------------------------------------------------------------- fitting
def _group_points(points, target: Target) -> dict[str, list[tuple[Kernel, float, str]]]:
    by_kind: dict[str, list] = {}
    for key, spec, ms in points:
        k = Kernel.from_spec(spec)
        # one predictor per layer kind; one for every standalone op (the op type is a
        # feature): fewer predictor calls keep an estimate under a few milliseconds
        by_kind.setdefault(k.kind if k.kind in LAYER_KINDS else GENERIC_OP, []).append((k, ms, key))
    return by_kind


def accuracy_stats(pred: np.ndarray, meas: np.ndarray) -> dict:
    if len(meas) == 0:
        return {"n": 0}
    err = pred / meas - 1.0
    return {
        "n": int(len(meas)),
        "mape_pct": float(np.mean(np.abs(err)) * 100),
        "within_10pct": float(np.mean(np.abs(err) <= 0.10) * 100),
        "within_20pct": float(np.mean(np.abs(err) <= 0.20) * 100),
        "rmspe_pct": float(np.sqrt(np.mean(err**2)) * 100),
    }


def fit_predictors(target: Target, points, rounds: int = 400,
                   contexts: dict[str, tuple[float, ...]] | None = None) -> tuple[dict[str, Predictor], dict]:
    """Fit one predictor per kind on the training split, measure it on the held-out split,
    then refit on every point.  ``contexts`` (record key -> :func:`network_context` of the
    network the record's kernels ran in) makes the predictors read the network context.
    Returns (predictors, accuracy summary)."""
    by_kind = _group_points(points, target)
    preds: dict[str, Predictor] = {}
    summary: dict = {"kernels": {}, "holdout_fraction": HOLDOUT}
    all_pred, all_meas = [], []
    for kind, items in sorted(by_kind.items()):
        ks = [k for k, _, _ in items]
        y = np.array([ms for _, ms, _ in items])
        hold = np.array([held_out(key) for _, _, key in items])
        ctx = [contexts[key] for _, _, key in items] if contexts is not None else None
        x, base = feature_rows(ks, target, ctx)
        layer = ks[0].kind in LAYER_KINDS
        use_ctx = contexts is not None
        stats = {"n_points": int(len(y))}
        if hold.sum() >= 3 and (~hold).sum() >= 5:
            p = Predictor.fit(kind, layer, x[~hold], base[~hold], y[~hold], rounds, use_ctx)
            py = p.predict(x[hold], base[hold])
            stats.update(accuracy_stats(py, y[hold]))
            all_pred.append(py)
            all_meas.append(y[hold])
        # stats["range"]: where the estimate stops extrapolating
        preds[kind] = replace(Predictor.fit(kind, layer, x, base, y, rounds, use_ctx),
                              stats={**stats, "range": kernel_range(ks)})
        summary["kernels"][kind] = stats
    if all_meas:
        summary["all_kernels"] = accuracy_stats(np.concatenate(all_pred), np.concatenate(all_meas))
    return preds, summary


def record_ranges(directory: str | Path) -> dict[str, dict]:
    """Add the calibrated range (:func:`~archpass.costmodel.extrapolation.kernel_range`) of
    every predictor to an existing target's ``target.json``, from its measured dataset,
    without refitting anything.  Returns the ranges by predictor kind."""
    from archpass.io import atomic_write_text

    d = Path(directory)
    doc = json.loads((d / "target.json").read_text())
    by_kind = _group_points(Dataset(d / DATASET).points(), None)
    ranges = {kind: kernel_range([k for k, _, _ in items]) for kind, items in by_kind.items()}
    for kind, pd in doc["predictors"].items():
        if kind in ranges:
            pd.setdefault("stats", {})["range"] = ranges[kind]
    atomic_write_text(d / "target.json", json.dumps(doc, indent=1) + "\n")
    return ranges


# ---------------------------------------------------------------------- running jobs
@dataclass
class Job:
    key: str
    payload: dict


def run_jobs(jobs: list[Job], work: Callable[[dict], dict], dataset: Dataset, workers: int,
             progress: Progress | None = None) -> None:
    """Measure jobs not yet in the dataset, ``workers`` processes at a time."""
    todo = [j for j in jobs if j.key not in dataset.records]
    done = len(jobs) - len(todo)
    if progress:
        progress(done, len(jobs), "cached" if done else "")
    if not todo:
        return
    if workers <= 1:
        for j in todo:
            rec = work(j.payload)
            rec["key"] = j.key
            dataset.add(rec)
            done += 1
            if progress:
                progress(done, len(jobs), rec.get("error", ""))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(workers, maxtasksperchild=50) as pool:
        for key, rec in pool.imap_unordered(_call, [(work, j.key, j.payload) for j in todo]):
            rec["key"] = key
            dataset.add(rec)
            done += 1
            if progress:
                progress(done, len(jobs), rec.get("error", ""))


def _call(args):
    work, key, payload = args
    return key, work(payload)


# ---------------------------------------------------------------------- zigzag
def zigzag_work(payload: dict) -> dict:
    from archpass.costmodel.backends.zigzag import measure_layer

    res = measure_layer(payload["spec"], payload["hardware"], payload["mapping"], payload["clock_hz"], payload["lpf_limit"])
    rec = {"group": "layer", "payload": {"spec": payload["spec"]}}
    if "error" in res:
        rec["error"] = res["error"]
        rec["points"] = []
    else:
        rec["points"] = [{"spec": payload["spec"], "ms": res["ms"], "cycles": res["cycles"]}]
    return rec


def calibrate_zigzag(*, name: str, out_dir: str | Path, hardware: str | Path, mapping: str | Path,
                     clock_hz: float, samples: int = 600, workers: int = 2, seed: int = 0,
                     any_size_share: float = 0.25,
                     lpf_limit: int = 4, description: str = "", progress: Progress | None = None,
                     copy_yaml: bool = True) -> Target:
    import shutil

    from archpass.costmodel.backends import zigzag as zz
    from archpass.costmodel.sampling import sample_layers

    if clock_hz <= 0:
        raise TargetError(f"clock {clock_hz} Hz is not positive", "pass --clock-hz with the accelerator clock")
    zz.check_inputs(hardware, mapping)
    facts = zz.hardware_facts(hardware, mapping)
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw_name, map_name = Path(hardware).name, Path(mapping).name
    if copy_yaml:
        for src, dst in ((hardware, out / hw_name), (mapping, out / map_name)):
            if Path(src).resolve() != dst.resolve():
                shutil.copyfile(src, dst)
    dataset = Dataset(out / DATASET)
    # most layers at the spatial sizes standard resolutions give, a share at any size
    # (other resolutions, unpadded strided layers: 111, 55, 27, 13...)
    odd = int(round(samples * any_size_share))
    specs = sample_layers(samples - odd, seed) + sample_layers(odd, seed, any_size=True)
    payload = {"hardware": str(hardware), "mapping": str(mapping), "clock_hz": clock_hz, "lpf_limit": lpf_limit}
    jobs = [Job(point_key({"spec": s, "lpf": lpf_limit}), {"spec": s, **payload}) for s in specs]
    t0 = time.time()
    run_jobs(jobs, zigzag_work, dataset, workers, progress)
    target = Target(
        name=name,
        description=description or f"ZigZag model of {facts.get('name') or hw_name}",
        parallelism=int(facts["parallelism"]),
        dtype="int8",
        bytes_per_element=1,
        clock_hz=float(clock_hz),
        unroll=facts["unroll"],
        mem_bits_per_step=facts["mem_bits_per_step"],
        fusion=FusionRules(layers_only=True),
        source={"backend": "zigzag", "hardware": hw_name, "mapping": map_name, "lpf_limit": lpf_limit,
                "zigzag_version": package_version("zigzag-dse")},
    )
    return _finish(target, dataset, out, [j.key for j in jobs], t0)


def _finish(target: Target, dataset: Dataset, out: Path, keys: Iterable[str], t0: float,
            points: list | None = None, contexts: dict | None = None) -> Target:
    keys = set(keys)
    if points is None:
        points = [p for p in dataset.points() if p[0] in keys]
    if len(points) < 10:
        raise TargetError(f"only {len(points)} points could be measured ({len(dataset.failed)} failed)",
                          "check the backend set-up or raise --samples")
    preds, summary = fit_predictors(target, points, contexts=contexts)
    failed = [r for r in dataset.failed if r["key"] in keys]
    summary.update({
        "measured_points": len(points),
        "failed_jobs": len(failed),
        "failure_examples": sorted({r["error"] for r in failed})[:5],
        "jobs": len(keys),
        "calibration_seconds": round(time.time() - t0, 1),
        "note": "held-out accuracy of predictors fitted on the other points; the stored predictors are refitted on all points",
    })
    target = replace(target, predictors=preds, accuracy=summary, path=out)
    save_target(target, out)
    return target


# ---------------------------------------------------------------------- onnxruntime
def robust_ms(samples) -> float:
    """The 30th percentile of repeated timings: on a shared machine a run is sometimes
    descheduled for a whole time slice, which lands on whichever node was running; a
    low quantile ignores those runs and equals the median on a quiet machine."""
    return float(np.percentile(np.asarray(samples, dtype=float), 30))


def _ort_work(payload: dict) -> dict:
    """Build generated network (or chain) ``seed``, time its kernels in context, return the points."""
    from archpass.analysis import analyze
    from archpass.costmodel.backends.onnxruntime import attribute, measure_model, profile_nodes
    from archpass.costmodel.chains import BUILDERS
    from archpass.costmodel.kernels import decompose

    style = payload.get("style", "chain")
    rec: dict = {"group": "chain", "payload": {"seed": payload["seed"], "style": style}, "points": []}
    try:
        model = BUILDERS[style](payload["seed"])
        structure = analyze(model)
        kernels = decompose(structure, FusionRules.from_json(payload["fusion"]))
        nodes = {n.name: n for n in structure.nodes}
        owner = {n: k.id for k in kernels for n in k.nodes}
        tensor_owner = {o: k.id for k in kernels for n in k.nodes if n in nodes for o in nodes[n].outputs}
        from archpass.costmodel.backends.onnxruntime import wait_for_free_core

        rec["busy_cores"] = wait_for_free_core(payload.get("max_wait", 3.0))
        opt = payload.get("graph_opt", "all")
        per_node, optimized, runs = profile_nodes(model, payload["provider"], payload["threads"],
                                                  payload["warmup"], payload["repeats"], graph_opt=opt)
        times, unmatched, counts = attribute(per_node, optimized, owner, tensor_owner)
        # the same network without the profiler: its per-node bookkeeping (about 2 us a node
        # here) is inside the node times and is taken out again (profiler_overhead_ms)
        plain = measure_model(model, payload["provider"], payload["threads"], warmup=3, repeats=15, graph_opt=opt)
    except TargetError:
        raise
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return rec
    for k in kernels:
        if k.id in times and times[k.id]:
            rec["points"].append({"spec": k.spec(), "ms": robust_ms(times[k.id]), "id": k.id, "nodes": counts.get(k.id, 0)})
    rec["run_ms"] = robust_ms(runs) if runs else None
    rec["plain_ms"] = plain["ms"]
    rec["unmatched_nodes"] = unmatched
    return rec


def profiler_overhead_ms(dataset: Dataset, keys) -> float:
    """Per-node time the profiler adds, from chains timed with and without it: the median
    over chains of (profiled node sum - plain median) / nodes, never negative.  Only short
    chains (under 1.5 ms) tell: in a long one a microsecond a node drowns in run-to-run
    noise."""
    keys = set(keys)
    short, every = [], []
    for key, rec in dataset.records.items():
        pts = rec.get("points") or []
        n = sum(p.get("nodes", 0) for p in pts)
        if key in keys and rec.get("plain_ms") and n:
            s = sum(p["ms"] for p in pts)
            every.append((s - rec["plain_ms"]) / n)
            if s < 1.5:
                short.append(every[-1])
    use = short if len(short) >= 10 else every
    return max(0.0, float(np.median(use))) if use else 0.0


def corrected_points(dataset: Dataset, keys, overhead_ms: float) -> list[tuple[str, dict, float]]:
    """Kernel points with the profiler's per-node overhead taken out (floored at 20%).

    Generated networks keep every kernel: their stem and last kernel pay the conversions
    into and out of the runtime's blocked layout and the cold input exactly as a real
    network's do.  Of a short chain (the older context), the first kernel is left out, and
    the last one when it is a convolution: they would charge those conversions to kernels
    of their kind that a whole model runs in its middle.  (A chain ending in a classifier
    gemm keeps it: its output is not in a blocked layout.)"""
    keys = set(keys)
    out = []
    for key, rec in dataset.records.items():
        if key not in keys:
            continue
        pts = rec.get("points", [])
        if (rec.get("payload") or {}).get("style", "chain") == "chain" and len(pts) >= 4:
            pts = pts[1:-1] if pts[-1]["spec"].get("kind") in ("conv", "dwconv") else pts[1:]
        for p in pts:
            ms = p.get("ms")
            if ms is not None and math.isfinite(ms) and ms > 0:
                out.append((key, p["spec"], max(ms - overhead_ms * p.get("nodes", 0), 0.2 * ms)))
    return out


def calibrate_onnxruntime(*, name: str, out_dir: str | Path, provider: str = "CPUExecutionProvider", threads: int = 1,
                          samples: int = 300, workers: int = 1, seed: int = 0, warmup: int = 5, repeats: int = 21,
                          parallelism: int = 8, description: str = "", progress: Progress | None = None,
                          max_wait: float = 3.0, style: str = "network", template_share: float = 0.5,
                          graph_opt: str = "all") -> Target:
    """Calibrate a runtime target: ``samples`` generated networks, each timed with the
    profiler.  A ``template_share`` of them follow known architecture families' stage plans
    (:meth:`ChainBuilder.build_template`), the rest are freely drawn
    (:meth:`ChainBuilder.build_network`).  ``style="chain"`` measures short fragments
    instead (the older context)."""
    from archpass.costmodel.backends.onnxruntime import check_graph_opt, check_provider
    from archpass.costmodel.host import fingerprint, host_fusion

    check_provider(provider)
    check_graph_opt(graph_opt)
    if threads < 1:
        raise TargetError(f"--threads {threads} is not positive", "pass 1 or more")
    # jobs keep the fusion they were measured under in their keys; generated networks write
    # channel splits as Split, so the runtime's Slice->Split fusion (on in the target) does
    # not change how they decompose; the host's NCHWc block (in the fusion, and so in the
    # keys, only where it is not the default) places the blocked layout in the decompositions
    fusion = host_fusion(FusionRules(residual_add=True), provider, graph_opt)
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(out / DATASET)
    payload = {"provider": provider, "threads": threads, "warmup": warmup, "repeats": repeats, "fusion": fusion.to_json(),
               **({"graph_opt": graph_opt} if graph_opt != "all" else {})}  # keys of "all" datasets stay as measured
    if style == "chain":
        plan = [("chain", samples)]
    else:
        templates = int(round(samples * template_share))
        plan = [("network", samples - templates), ("template", templates)]
    jobs = []
    for st, count in plan:
        extra = {} if st == "chain" else {"style": st}  # chain jobs keep the keys they were measured under
        jobs += [Job(point_key({"chain": seed * 100003 + i, **payload, **extra}),
                     {"seed": seed * 100003 + i, "max_wait": max_wait, **payload, **extra}) for i in range(count)]
    t0 = time.time()
    run_jobs(jobs, _ort_work, dataset, workers, progress)
    target = Target(
        name=name,
        description=description or f"onnxruntime {provider}, {threads} thread(s)"
        + (f", graph optimizations {graph_opt}" if graph_opt != "all" else ""),
        parallelism=parallelism,
        dtype="float32",
        bytes_per_element=4,
        clock_hz=None,
        unroll={"K": parallelism, "C": parallelism, "G": parallelism},
        mem_bits_per_step=64.0,
        fusion=replace(fusion, split_slices=True),
        source={"backend": "onnxruntime", "provider": provider, "threads": threads, "warmup": warmup,
                "repeats": repeats, "onnxruntime_version": package_version("onnxruntime"), "graph_optimization": graph_opt,
                "host": fingerprint(provider, threads, graph_opt)},
    )
    return _finish_runtime(target, dataset, out, [j.key for j in jobs], t0)


def network_contexts(dataset: Dataset, target: Target) -> dict[str, tuple[float, ...]]:
    """The :func:`network_context` of every record's network (from all its kernels)."""
    return {key: network_context([Kernel.from_spec(p["spec"]) for p in rec.get("points", [])], target.bytes_per_element,
                                 target.parallelism)
            for key, rec in dataset.records.items()}


def refresh_specs(dataset: Dataset, fusion: FusionRules, keys=None) -> int:
    """Re-derive the kernel specs of generated-network records from their seeds (networks
    are pure functions of their seed), for datasets measured before a spec field was
    added.  Rewrites the dataset when anything changed; returns the records updated."""
    from archpass.analysis import analyze
    from archpass.costmodel.chains import BUILDERS
    from archpass.costmodel.kernels import decompose

    fresh = 0
    for key, rec in dataset.records.items():
        pts = rec.get("points") or []
        payload = rec.get("payload") or {}
        style = payload.get("style", "chain")
        if (keys is not None and key not in keys) or not pts or style not in BUILDERS or "seed" not in payload:
            continue  # not a generated network (a ZigZag layer, say)
        if all("in_from_op" in p["spec"] for p in pts):
            continue
        specs = {k.id: k.spec() for k in decompose(analyze(BUILDERS[style](rec["payload"]["seed"])), fusion)}
        for p in pts:
            if p.get("id") in specs:
                p["spec"] = specs[p["id"]]
        fresh += 1
    if fresh:
        dataset.rewrite()
    return fresh


def _finish_runtime(target: Target, dataset: Dataset, out: Path, keys, t0: float) -> Target:
    refresh_specs(dataset, target.fusion, set(keys))
    overhead = profiler_overhead_ms(dataset, keys)
    target = replace(target, source={**target.source, "profiler_overhead_ms_per_node": overhead})
    contexts = network_contexts(dataset, target)
    target = _finish(target, dataset, out, keys, t0, points=corrected_points(dataset, keys, overhead), contexts=contexts)
    target = replace(target, accuracy={**target.accuracy,
                                       "chains": chain_accuracy(target, dataset, keys, overhead, contexts)})
    target = replace(target, accuracy={**target.accuracy, "notes": calibration_notes(target)})
    save_target(target, out)
    return target


#: held-out whole-network MAPE above which a full onnxruntime calibration says that its
#: kernel sums miss whole networks, and names the adaptation (the built-in ``cpu``, 1
#: thread: 3.4%; a full 2-thread calibration of 1000 networks on the shared 2-core host
#: here, ``benchmarks/adapt.py --phase ort-full``: 14.0%, its held-out models +17.7% on
#: average, 30% within ±10%, where 60 s adaptations of ``cpu`` in the same hours were
#: within ±10% on 90-95% of them; one more such calibration outside the benchmark: 17.7%,
#: docs/architecture.md)
NETWORK_MAPE_NOTE = 10.0


def calibration_notes(target: Target) -> list[str]:
    """What a full runtime calibration's held-out whole networks (``accuracy.chains``) say
    about it: when the summed kernels miss the networks' measured latency by more than
    :data:`NETWORK_MAPE_NOTE` percent, a note naming the adaptation, which fits whole-network
    timings taken in windows on top of a 1-thread target's kernels."""
    chains = (target.accuracy or {}).get("chains") or {}
    mape = chains.get("mape_pct")
    if not chains.get("n") or mape is None or not mape > NETWORK_MAPE_NOTE:
        return []
    src = target.source or {}
    threads = int(src.get("threads", 1) or 1)
    opts = "" if src.get("graph_optimization", "all") == "all" else f" --graph-opt {src['graph_optimization']}"
    provider = src.get("provider", "CPUExecutionProvider")
    prov = "" if provider == "CPUExecutionProvider" else f" --provider {provider}"
    note = (f"held-out whole networks are {mape:.0f}% off (MAPE over {chains['n']}; "
            f"{chains.get('within_10pct', 0):.0f}% within ±10%): the summed kernel timings miss how this host runs "
            f"whole networks{' with several threads' if threads > 1 else ''}; "
            f"'archpass calibrate --adapt cpu --backend onnxruntime --threads {threads}{prov}{opts} --name NAME -o DIR' "
            "fits whole networks timed in windows on top of the 1-thread target's kernels (about a minute of measurement)")
    return [note]


def chain_accuracy(target: Target, dataset: Dataset, keys, overhead_ms: float = 0.0,
                   contexts: dict[str, tuple[float, ...]] | None = None) -> dict:
    """Held-out networks (or chains): predicted sum of kernels vs the network's median
    latency measured without the profiler (predictors fitted without those networks'
    points).  ``contexts``: :func:`network_contexts`, computed here when not given."""
    from archpass.costmodel.estimate import predict_kernels

    keys = set(keys)
    train = [p for p in corrected_points(dataset, keys, overhead_ms) if not held_out(p[0])]
    if len(train) < 10:
        return {"n": 0}
    preds, _ = fit_predictors(target, train, contexts=contexts if contexts is not None else network_contexts(dataset, target))
    probe = replace(target, predictors=preds)
    pred, meas = [], []
    for key, rec in dataset.records.items():
        truth = rec.get("plain_ms") or rec.get("run_ms")
        if key not in keys or not held_out(key) or not rec.get("points") or not truth:
            continue
        ks = [Kernel.from_spec(p["spec"]) for p in rec["points"]]
        lat, _ = predict_kernels(ks, probe)
        pred.append(float(lat.sum()))
        meas.append(truth)
    return accuracy_stats(np.array(pred), np.array(meas))


def refit(directory: str | Path) -> Target:
    """Refit a target's predictors from its stored dataset (no new measurements): used
    when the features change.  Reads target.json for everything but the predictors."""
    import json as _json

    from archpass.costmodel.target import Target as _T

    d = Path(directory)
    doc = _json.loads((d / "target.json").read_text())
    target = _T(
        name=doc["name"], description=doc.get("description", ""), parallelism=int(doc["parallelism"]),
        dtype=doc.get("dtype", "float32"), bytes_per_element=int(doc["bytes_per_element"]),
        clock_hz=doc.get("clock_hz"), unroll=dict(doc.get("unroll", {})),
        mem_bits_per_step=float(doc.get("mem_bits_per_step", 64)), fusion=FusionRules.from_json(doc.get("fusion", {})),
        source=dict(doc["source"]),
    )
    dataset = Dataset(d / DATASET)
    t0 = time.time()
    if target.backend == "onnxruntime":
        target = _finish_runtime(target, dataset, d, list(dataset.records), t0)
    else:
        target = _finish(target, dataset, d, list(dataset.records), t0)
    target = replace(target, accuracy={**target.accuracy,
                                       "calibration_seconds": doc.get("accuracy", {}).get("calibration_seconds")})
    save_target(target, d)
    return target
