"""onnxruntime measurement backend: any execution provider, fixed threads, warm-up,
repeats, median.

Kernels are timed *in context*: a generated chain of blocks runs as one model with
onnxruntime's profiler on, and each kernel gets the summed time of the optimized nodes
that came from its ONNX nodes (layout reorders are charged to the kernel that needs
them).  Timing a kernel as its own one-node model would charge it the layout changes
(NCHW <-> blocked NCHWc) a whole model does once, overestimating whole models by up to
2.6x.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from archpass.dynamic import random_feeds
from archpass.errors import TargetError

_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_kernel_time)$")


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def cpu_times() -> tuple[float, float] | None:
    """(all, idle) CPU time of the machine so far, in clock ticks (Linux; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts), idle


def busy_cores(window: float = 0.2) -> float | None:
    """Cores kept busy by other processes over ``window`` seconds (Linux; None elsewhere)."""
    a = cpu_times()
    time.sleep(window)
    b = cpu_times()
    if a is None or b is None or b[0] <= a[0]:
        return None
    ncpu = os.cpu_count() or 1
    return ncpu * (1.0 - (b[1] - a[1]) / (b[0] - a[0]))


def wait_for_free_core(max_wait: float = 30.0, window: float = 0.2) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes leave at least one core free, so
    a one-thread timing is not time-sliced with them.  Returns the last busy-core reading."""
    ncpu = os.cpu_count() or 1
    deadline = time.time() + max_wait
    busy = busy_cores(window)
    while busy is not None and busy > ncpu - 1 + 0.15 and time.time() < deadline:
        busy = busy_cores(window)
    return busy


def check_provider(provider: str) -> None:
    ort = _ort()
    avail = ort.get_available_providers()
    if provider not in avail:
        raise TargetError(f"execution provider '{provider}' is not installed here (available: {', '.join(avail)})",
                          "install the onnxruntime build that has it or pick an available one")


#: ``--graph-opt`` choices: onnxruntime's graph optimization levels
GRAPH_OPT = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
             "all": "ORT_ENABLE_ALL"}


def check_graph_opt(level: str) -> None:
    if level not in GRAPH_OPT:
        raise TargetError(f"unknown graph optimization level '{level}'", f"use one of {', '.join(GRAPH_OPT)}")


def session_options(threads: int, profile_prefix: str | None = None, optimized_path: str | None = None,
                    graph_opt: str = "all"):
    ort = _ort()
    check_graph_opt(graph_opt)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT[graph_opt])
    so.log_severity_level = 3
    if threads == 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def _model_bytes(model: onnx.ModelProto | str | Path) -> bytes | str:
    if isinstance(model, (str, Path)):
        return str(model)
    return model.SerializeToString()


def timed_runs(session, feeds: dict, runs: int, min_seconds: float = 0.0) -> list[float]:
    """Wall-clock times (ms) of at least ``runs`` runs of ``session`` lasting at least
    ``min_seconds`` in all."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_model(model: onnx.ModelProto | str | Path, provider: str = "CPUExecutionProvider", threads: int = 1,
                  warmup: int = 10, repeats: int = 30, min_seconds: float = 0.0, graph_opt: str = "all") -> dict:
    """Median wall-clock latency (ms) of a whole model over ``repeats`` runs after ``warmup``."""
    ort = _ort()
    check_provider(provider)
    sess = ort.InferenceSession(_model_bytes(model), session_options(threads, graph_opt=graph_opt), providers=[provider])
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    feeds = random_feeds(proto)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = timed_runs(sess, feeds, repeats, min_seconds)
    return {"ms": statistics.median(times), "runs": len(times), "p10": float(np.percentile(times, 10)),
            "p90": float(np.percentile(times, 90))}


def profile_nodes(model: onnx.ModelProto, provider: str = "CPUExecutionProvider", threads: int = 1, warmup: int = 5,
                  repeats: int = 20, graph_opt: str = "all") -> tuple[dict[str, list[float]], onnx.ModelProto | None, list[float]]:
    """Per optimized-node durations (ms, one per measured run), the optimized graph, and
    the measured runs' total latencies."""
    ort = _ort()
    check_provider(provider)
    tmp = tempfile.mkdtemp(prefix="archpass-ort-")
    try:
        opt_path = os.path.join(tmp, "optimized.onnx")
        so = session_options(threads, os.path.join(tmp, "prof"), opt_path, graph_opt)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
        feeds = random_feeds(model)
        for _ in range(warmup + repeats):
            sess.run(None, feeds)
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
        optimized = onnx.load(opt_path, load_external_data=False) if os.path.exists(opt_path) else None
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    per_node: dict[str, list[float]] = {}
    runs = []
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e["dur"] / 1e3)
    per_node = {k: v[warmup:] for k, v in per_node.items()}
    return per_node, optimized, runs[warmup:]


_FUSION_TAIL = re.compile(r"/[A-Za-z]+Fusion/?$")


def _candidates(name: str) -> list[str]:
    """Original names an optimized node name may come from."""
    out = [name]
    for _ in range(3):
        nxt = _FUSION_TAIL.sub("", _SUFFIX.sub("", out[-1]))
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


def attribute(per_node: dict[str, list[float]], optimized: onnx.ModelProto | None, owner: dict[str, str],
              tensor_owner: dict[str, str]) -> tuple[dict[str, list[float]], list[str], dict[str, int]]:
    """Charge each optimized node's times to a kernel.

    ``owner`` maps original node names to kernel ids, ``tensor_owner`` original tensor
    names to the kernel that produces them.  An optimized node is matched by its name
    (onnxruntime keeps or suffixes the fused node's name), then by an output tensor it
    shares with the original graph, then through its consumers (layout reorders are
    charged to the kernel that needs them), then its producer.  Returns the per-run times
    of each kernel, the optimized nodes no rule matched (charged to the kernel that ran
    before them) and how many optimized nodes each kernel ran."""
    by_name: dict[str, str] = {}
    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    if optimized is not None:
        for n in optimized.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
            for o in n.output:
                producer[o] = n

        def direct(n) -> str | None:
            for cand in _candidates(n.name):
                if cand in owner:
                    return owner[cand]
                if cand in tensor_owner:  # NCHWc nodes are named after the tensor they produce
                    return tensor_owner[cand]
            for o in n.output:
                ob = _SUFFIX.sub("", o)
                if o in tensor_owner:
                    return tensor_owner[o]
                if ob in tensor_owner:
                    return tensor_owner[ob]
            return None

        for n in optimized.graph.node:
            k = direct(n)
            if k is None:  # follow consumers, then producers
                seen, frontier = set(), [n]
                while frontier and k is None:
                    nxt = []
                    for m in frontier:
                        for o in m.output:
                            for c in consumers.get(o, []):
                                if c.name in seen:
                                    continue
                                seen.add(c.name)
                                k = direct(c)
                                if k is not None:
                                    break
                                nxt.append(c)
                            if k is not None:
                                break
                        if k is not None:
                            break
                    frontier = nxt
                if k is None:
                    for i in n.input:
                        p = producer.get(i)
                        if p is not None and direct(p) is not None:
                            k = direct(p)
                            break
                        if i in tensor_owner:
                            k = tensor_owner[i]
                            break
            if k is not None:
                by_name[n.name] = k
    kernel_times: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    unmatched = []
    previous = None
    for name, durs in per_node.items():  # profiler order = execution order
        k = by_name.get(name) or next((owner[c] for c in _candidates(name) if c in owner), None)
        if k is None:
            unmatched.append(name)
            k = previous  # a node the optimizer made up: charge the kernel that ran just before
            if k is None:
                continue
        previous = k
        counts[k] = counts.get(k, 0) + 1
        acc = kernel_times.setdefault(k, [0.0] * len(durs))
        n = min(len(acc), len(durs))
        kernel_times[k] = [acc[i] + durs[i] for i in range(n)]
    return kernel_times, unmatched, counts
