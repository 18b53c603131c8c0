"""Whole-model accuracy of the built-in targets' latency predictors.

For each held-out model (torchvision architectures, their width-multiplier and
resolution variants, and variants rewritten by archpass's own passes: IBN fusion of the
early or of all blocks, depthwise to dense, channel counts off the parallelism factor;
none of them in the calibration data, which is random layers / generated networks) and
each target, compares ``archpass.costmodel.estimate``
(shapes only) with the measurement source on the whole model:

* ``edgetpu`` / ``tpu``: ZigZag's evaluation of the whole ONNX model (same hardware,
  mapping, lpf_limit and clock as the target);
* ``cpu``: onnxruntime CPU EP, 1 thread, median latency of the whole model (five
  1-second windows spread over ``--spread-minutes``, 20 by default; the median of the
  window medians counts, since the machine is shared and its speed drifts: small models
  measured 9-11% apart in runs 13 minutes apart while ResNet-50 moved 0.7%; the spread
  between windows and the reference networks' drift against calibration time are
  recorded).

Prints the figures and writes ``benchmarks/results/predictor_accuracy.json``: per target
the % of models within ±10%, MAPE, Spearman rank correlation across the variants of each
architecture family, and the estimate time on MobileNetV2.

    python benchmarks/predictor_accuracy.py [--targets edgetpu,tpu,cpu] [--models NAME,...]

Exports are cached (``$ARCHPASS_BENCH_CACHE``, default ``~/.cache/archpass-bench``), and so
are ZigZag results (deterministic; keyed by model hash and target settings).  onnxruntime
latencies are measured afresh every run unless ``--reuse-cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "predictor_accuracy.json"
WINDOWS = 5  # onnxruntime timing windows per model
ZIGZAG_TIMEOUT = 600  # seconds for one whole-model ZigZag evaluation (a failure is recorded)

# name -> (torchvision constructor, kwargs, input resolution, family)
MODELS: dict[str, tuple[str, dict, int, str]] = {
    "mobilenet_v2": ("mobilenet_v2", {}, 224, "mobilenet_v2"),
    "mobilenet_v2_w0.35_r160": ("mobilenet_v2", {"width_mult": 0.35}, 160, "mobilenet_v2"),
    "mobilenet_v2_w0.5": ("mobilenet_v2", {"width_mult": 0.5}, 224, "mobilenet_v2"),
    "mobilenet_v2_w0.75_r192": ("mobilenet_v2", {"width_mult": 0.75}, 192, "mobilenet_v2"),
    "mobilenet_v2_w1.4": ("mobilenet_v2", {"width_mult": 1.4}, 224, "mobilenet_v2"),
    "mobilenet_v2_r160": ("mobilenet_v2", {}, 160, "mobilenet_v2"),
    "mobilenet_v2_r128": ("mobilenet_v2", {}, 128, "mobilenet_v2"),
    "mobilenet_v2_w1.3_r192": ("mobilenet_v2", {"width_mult": 1.3}, 192, "mobilenet_v2"),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, 224, "mobilenet_v3"),
    "mobilenet_v3_large_r192": ("mobilenet_v3_large", {}, 192, "mobilenet_v3"),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, 224, "mobilenet_v3"),
    "efficientnet_b0": ("efficientnet_b0", {}, 224, "efficientnet"),
    "efficientnet_b0_r192": ("efficientnet_b0", {}, 192, "efficientnet"),
    "mnasnet0_5": ("mnasnet0_5", {}, 224, "mnasnet"),
    "mnasnet0_75": ("mnasnet0_75", {}, 224, "mnasnet"),
    "mnasnet1_0": ("mnasnet1_0", {}, 224, "mnasnet"),
    "mnasnet1_3": ("mnasnet1_3", {}, 224, "mnasnet"),
    "resnet18": ("resnet18", {}, 224, "resnet"),
    "resnet18_r160": ("resnet18", {}, 160, "resnet"),
    "resnet34": ("resnet34", {}, 224, "resnet"),
    "resnet50": ("resnet50", {}, 224, "resnet"),
    "regnet_x_400mf": ("regnet_x_400mf", {}, 224, "regnet"),
    "regnet_y_400mf": ("regnet_y_400mf", {}, 224, "regnet"),
    "squeezenet1_1": ("squeezenet1_1", {}, 224, "squeezenet"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}, 224, "shufflenet"),
}

# name -> (base model, rewrite kind); a variant joins its base's family, so the Spearman
# figure ranks what the search ranks: rewrites of one architecture
VARIANTS: dict[str, tuple[str, str]] = {
    "mobilenet_v2+fuse_early": ("mobilenet_v2", "fuse_early"),
    "mobilenet_v2+fuse_all": ("mobilenet_v2", "fuse_all"),
    "mobilenet_v2+dense_early": ("mobilenet_v2", "dense_early"),
    "mobilenet_v2+odd_channels": ("mobilenet_v2", "odd_channels"),
    "mobilenet_v3_large+fuse_early": ("mobilenet_v3_large", "fuse_early"),
    "efficientnet_b0+fuse_early": ("efficientnet_b0", "fuse_early"),
    "mnasnet1_0+fuse_early": ("mnasnet1_0", "fuse_early"),
    "resnet18+odd_channels": ("resnet18", "odd_channels"),
}


def variant_recipe(structure, kind: str):
    """The rewrites of a benchmark variant, chosen from the base model's structure."""
    from archpass.recipe import Recipe

    early = [b for b in structure.blocks if b.kind == "ibn" and structure.layer(b.role("depthwise")).in_hw[0] >= 28]
    if kind == "fuse_early":
        rw = [{"pass": "fuse_ibn", "site": b.id} for b in early]
    elif kind == "fuse_all":
        rw = [{"pass": "fuse_ibn", "site": b.id} for b in structure.blocks if b.kind == "ibn"]
    elif kind == "dense_early":
        rw = [{"pass": "dw_to_dense", "site": b.role("depthwise")} for b in early]
    elif kind == "odd_channels":  # every adjustable group 3 channels narrower: none a multiple of 8
        rw = [{"pass": "channels", "site": g.id, "channels": g.channels - 3}
              for g in structure.groups if g.adjustable and g.channels >= 16]
    else:
        raise ValueError(kind)
    return Recipe.from_json({"rewrites": rw})


def cache_dir() -> Path:
    d = Path(os.environ.get("ARCHPASS_BENCH_CACHE", Path.home() / ".cache" / "archpass-bench")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def family(name: str) -> str:
    return MODELS[VARIANTS[name][0]][3] if name in VARIANTS else MODELS[name][3]


def export(name: str) -> Path:
    import torch
    import torchvision

    if name in VARIANTS:
        return rewrite_variant(name)
    ctor, kwargs, res, _ = MODELS[name]
    path = cache_dir() / f"{name}-opset17-torch{torch.__version__}-tv{torchvision.__version__}.onnx".replace("+", "_")
    if path.exists():
        return path
    torch.manual_seed(0)
    model = getattr(torchvision.models, ctor)(weights=None, **kwargs).eval()
    from archpass.io import write_atomically

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, res, res),), str(tmp), opset_version=17, dynamo=False,
                              input_names=["input"], output_names=["output"])

    write_atomically(path, write)
    return path


def rewrite_variant(name: str) -> Path:
    """Apply the variant's rewrites to its (exported) base model with archpass's engine."""
    from archpass.analysis import analyze
    from archpass.model import load_model, save_model
    from archpass.passes.engine import apply_recipe

    base, kind = VARIANTS[name]
    src = export(base)
    path = cache_dir() / f"{name}-{src.stem}.onnx"
    if not path.exists():
        model = load_model(src)
        structure = analyze(model)
        save_model(apply_recipe(model, variant_recipe(structure, kind), structure=structure).proto, path)
    return path


def reference_networks(target, n: int = 8):
    """(key, network, calibration-time latency) of ``n`` held-out calibration networks of a
    runtime target (deterministic: the first held-out keys in sorted order)."""
    from archpass.costmodel.calibrate import DATASET, Dataset, held_out
    from archpass.costmodel.chains import BUILDERS

    if target.path is None or not (Path(target.path) / DATASET).exists():
        return []
    ds = Dataset(Path(target.path) / DATASET)
    out = []
    for key in sorted(ds.records):
        rec = ds.records[key]
        style = (rec.get("payload") or {}).get("style", "chain")
        if held_out(key) and rec.get("plain_ms") and style in BUILDERS:
            out.append((key, BUILDERS[style](rec["payload"]["seed"]), rec["plain_ms"]))
        if len(out) == n:
            break
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    import numpy as np

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------ ground truths
def _zigzag_truth(args):
    """(model name, target name, result dict) for one whole-model ZigZag evaluation."""
    name, tname, model_path, hw, mp, lpf, clock = args
    import onnx

    from archpass.costmodel.backends.zigzag import evaluate_cycles

    import signal

    def _timeout(*_):
        raise TimeoutError(f"ZigZag took over {ZIGZAG_TIMEOUT} s")

    t0 = time.time()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(ZIGZAG_TIMEOUT)
    try:
        cycles = evaluate_cycles(onnx.load(model_path), hw, mp, lpf)
        return name, tname, {"ms": cycles / clock * 1e3, "cycles": cycles, "seconds": round(time.time() - t0, 1)}
    except Exception as exc:
        return name, tname, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                             "seconds": round(time.time() - t0, 1)}
    finally:
        signal.alarm(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="edgetpu,tpu,cpu")
    ap.add_argument("--models", default=",".join([*MODELS, *VARIANTS]))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse-cpu", action="store_true", help="reuse cached onnxruntime measurements")
    ap.add_argument("--spread-minutes", type=float, default=20.0,
                    help="spread the onnxruntime timing windows over this many minutes (the shared machine's speed "
                         "drifts by up to ~10%% for small models over tens of minutes; the median over a longer span is "
                         "the machine's typical latency)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--truths-only", action="store_true", help="only run the (cached) ZigZag whole-model evaluations")
    args = ap.parse_args(argv)

    import numpy as np

    from archpass.analysis import analyze
    from archpass.costmodel import estimate, load_target
    from archpass.costmodel.backends.onnxruntime import measure_model
    from archpass.io import atomic_write_text
    from archpass.model import load_model, save_model

    if args.truths_only:
        # before the targets exist: ZigZag settings from the build script
        from types import SimpleNamespace

        from archpass.costmodel.build_targets import BUILTINS

        targets = []
        for t in args.targets.split(","):
            b = BUILTINS[t]
            if b["backend"] == "zigzag":
                targets.append(SimpleNamespace(name=t, backend="zigzag", clock_hz=b["clock_hz"], source={"lpf_limit": 4},
                                               source_file=lambda key, b=b: b[key]))
    else:
        targets = [load_target(t) for t in args.targets.split(",")]
    names = args.models.split(",")
    truth_cache_path = cache_dir() / "truths.json"
    truth_cache = json.loads(truth_cache_path.read_text()) if truth_cache_path.exists() else {}

    def save_cache():
        atomic_write_text(truth_cache_path, json.dumps(truth_cache, indent=1))

    # export, canonicalize, analyze
    models = {}
    for name in names:
        t0 = time.time()
        path = export(name)
        model = load_model(path)
        structure = analyze(model)
        canon = cache_dir() / f"{name}.canonical.onnx"
        if not canon.exists():
            save_model(model.proto, canon)
        models[name] = (model, structure, canon)
        print(f"loaded {name}: {len(structure.layers)} layers ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)

    # ZigZag whole-model evaluations (cached: deterministic)
    jobs = []
    for t in targets:
        if t.backend != "zigzag":
            continue
        hw, mp = str(t.source_file("hardware")), str(t.source_file("mapping"))
        lpf = int(t.source.get("lpf_limit", 4))
        for name in names:
            key = f"zigzag:{t.name}:{lpf}:{t.clock_hz}:{models[name][0].sha256}"
            if key not in truth_cache:
                jobs.append((name, t.name, str(models[name][2]), hw, mp, lpf, t.clock_hz, key))
    if jobs:
        import multiprocessing as mp_

        keys = {(j[0], j[1]): j[-1] for j in jobs}
        with mp_.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
            for name, tname, res in pool.imap_unordered(_zigzag_truth, [j[:-1] for j in jobs]):
                truth_cache[keys[(name, tname)]] = res
                save_cache()
                print(f"zigzag {tname} {name}: {res}", file=sys.stderr, flush=True)

    if args.truths_only:
        return 0

    drift: dict[str, dict] = {}
    # onnxruntime whole-model medians (after ZigZag: nothing else of ours running).  Each model
    # is timed in five 1-second windows, one per pass over all models, so the windows are
    # minutes apart; the median of the window medians is the figure (on a shared machine a
    # window can overlap another process's burst, in either direction).
    for t in targets:
        if t.backend != "onnxruntime":
            continue
        provider, threads = t.source.get("provider", "CPUExecutionProvider"), int(t.source.get("threads", 1))
        keys = {name: f"ort:{t.name}:{provider}:{threads}:{models[name][0].sha256}" for name in names}
        todo = [n for n in names if not (args.reuse_cpu and keys[n] in truth_cache)]
        windows: dict[str, list] = {n: [] for n in todo}
        # the machine's speed against calibration time: held-out calibration networks timed
        # again in every window (a shared machine drifts by a few % over an hour)
        refs = reference_networks(t) if todo else []
        ref_times: dict[str, list] = {key: [] for key, _, _ in refs}
        t_start = time.time()
        for w in range(WINDOWS):
            if w and args.spread_minutes > 0:  # windows evenly spread over the span, idle in between
                wait = t_start + w * args.spread_minutes * 60 / (WINDOWS - 1) - time.time()
                if wait > 0:
                    print(f"ort {t.name}: window {w + 1}/{WINDOWS} in {wait / 60:.1f} min", file=sys.stderr, flush=True)
                    time.sleep(wait)
            for name in todo:
                windows[name].append(measure_model(models[name][0].proto, provider, threads, warmup=10, repeats=40,
                                                   min_seconds=1.0))
            for key, net, _ in refs:
                ref_times[key].append(measure_model(net, provider, threads, warmup=3, repeats=15)["ms"])
        if refs:
            ratios = [statistics.median(ref_times[key]) / then for key, _, then in refs]
            drift[t.name] = {"networks": len(refs), "median_now_over_calibration": statistics.median(ratios),
                             "ratios": ratios}
            print(f"ort {t.name}: calibration networks now run at {statistics.median(ratios):.3f}x their "
                  f"calibration-time latency", file=sys.stderr)
        for name in todo:
            ordered = sorted(windows[name], key=lambda r: r["ms"])
            res = dict(ordered[len(ordered) // 2])
            res["window_medians_ms"] = [r["ms"] for r in windows[name]]
            res["window_spread_pct"] = (ordered[-1]["ms"] / ordered[0]["ms"] - 1) * 100
            truth_cache[keys[name]] = res
            print(f"ort {t.name} {name}: {res['ms']:.2f} ms (windows {res['window_medians_ms']})", file=sys.stderr)
        save_cache()

    # predictions and figures
    report = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}, "targets": {}}
    for name in names:
        base = VARIANTS[name][0] if name in VARIANTS else name
        ctor, ctor_kwargs, res, _ = MODELS[base]
        report["models"][name] = {"torchvision": ctor, "kwargs": ctor_kwargs, "resolution": res, "family": family(name),
                                  "rewrites": VARIANTS[name][1] if name in VARIANTS else None,
                                  "layers": len(models[name][1].layers), "macs": models[name][1].macs}
    for t in targets:
        rows = []
        for name in names:
            model, structure, _ = models[name]
            if t.backend == "zigzag":
                key = f"zigzag:{t.name}:{int(t.source.get('lpf_limit', 4))}:{t.clock_hz}:{model.sha256}"
            else:
                key = f"ort:{t.name}:{t.source.get('provider', 'CPUExecutionProvider')}:{int(t.source.get('threads', 1))}:{model.sha256}"
            truth = truth_cache.get(key, {"error": "not measured"})
            est = estimate(structure, t)
            row = {"model": name, "family": family(name), "predicted_ms": est.latency_ms}
            if "ms" in truth:
                row.update(measured_ms=truth["ms"], error_pct=(est.latency_ms / truth["ms"] - 1) * 100)
                if "window_medians_ms" in truth:
                    row["window_medians_ms"] = truth["window_medians_ms"]
            else:
                row["measure_error"] = truth.get("error")
            rows.append(row)
        ok = [r for r in rows if "measured_ms" in r]
        errs = np.array([abs(r["error_pct"]) for r in ok]) if ok else np.array([])
        fams = {}
        for r in ok:
            fams.setdefault(r["family"], []).append(r)
        rank = {f: spearman([r["predicted_ms"] for r in rs], [r["measured_ms"] for r in rs])
                for f, rs in fams.items() if len(rs) >= 3}
        # estimate time on MobileNetV2 (shapes only, target loaded)
        st = models["mobilenet_v2"][1] if "mobilenet_v2" in models else models[names[0]][1]
        times, times_nomem = [], []
        for _ in range(30):
            t0 = time.perf_counter()
            estimate(st, t)
            times.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            estimate(st, t, best_order=False)
            times_nomem.append((time.perf_counter() - t0) * 1e3)
        summary = {
            "source": t.backend,
            "machine_drift": drift.get(t.name),
            "models_measured": len(ok),
            "models_failed": [r["model"] for r in rows if "measured_ms" not in r],
            "within_10pct": float(np.mean(errs <= 10) * 100) if len(errs) else None,
            "within_20pct": float(np.mean(errs <= 20) * 100) if len(errs) else None,
            "mape_pct": float(np.mean(errs)) if len(errs) else None,
            "max_abs_error_pct": float(np.max(errs)) if len(errs) else None,
            "spearman_by_family": rank,
            "spearman_all": spearman([r["predicted_ms"] for r in ok], [r["measured_ms"] for r in ok]),
            "estimate_ms_mobilenet_v2": statistics.median(times),
            "estimate_ms_mobilenet_v2_without_order_search": statistics.median(times_nomem),
            "rows": rows,
        }
        report["targets"][t.name] = summary
        print(f"\n== {t.name} ({t.backend}) ==")
        for r in rows:
            meas = f"{r['measured_ms']:9.3f}" if "measured_ms" in r else f"  failed: {r.get('measure_error')}"
            err = f"{r['error_pct']:+6.1f}%" if "error_pct" in r else ""
            print(f"  {r['model']:28s} pred {r['predicted_ms']:9.3f} ms  measured {meas} {err}")
        print(f"  within ±10%: {summary['within_10pct']:.1f}% of {len(ok)}   MAPE {summary['mape_pct']:.1f}%   "
              f"Spearman by family: { {k: round(v, 3) for k, v in rank.items() if v is not None} }   "
              f"estimate {summary['estimate_ms_mobilenet_v2']:.2f} ms (MobileNetV2)")
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
