"""Analytic features of a kernel on a target.

The predictors learn the ratio between a measured latency and an analytic baseline built
from these features (compute steps on the target's parallel array, bytes moved), so a
prediction stays sensible outside the sampled shapes: a tree model cannot extrapolate,
but the baseline does.

``unroll`` maps loop dimensions (``K`` output channels, ``C`` input channels per group,
``G`` groups, ``OX``/``OY`` output columns/rows) to how many the hardware computes in
parallel; ``ideal`` is the number of array steps with every dimension rounded up to its
unroll, the utilization is ``macs / (ideal * prod(unroll))``.
"""

from __future__ import annotations

import numpy as np

from archpass.costmodel.kernels import LAYER_KINDS, Kernel

ACT_CODES = {None: 0, "relu": 1, "relu6": 2, "clip": 2, "hardswish": 3, "sigmoid": 4, "swish": 5, "hardsigmoid": 6, "gelu": 7}
OP_CODES = {
    op: i + 1
    for i, op in enumerate(
        ["Add", "Mul", "Sub", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "MaxPool", "AveragePool",
         "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "Concat", "Resize", "Reshape", "Flatten", "Transpose",
         "Softmax", "Split", "Slice", "Squeeze", "Unsqueeze", "Identity", "Tanh", "Gelu", "LayerNormalization"]
    )
}

LAYER_FEATURES = (
    "macs", "ideal", "mem", "util", "cin", "cout", "cin_mod", "cout_mod", "cin_pad_ratio", "cout_pad_ratio",
    "k", "stride", "groups", "cin_per_group", "in_hw", "out_hw", "in_elems", "out_elems", "w_elems",
    "act", "fused_add", "post_act", "compute_over_mem", "spatial_pad_ratio",
)
LAYER_BASE = ("one", "ideal", "mem", "bound")
OP_FEATURES = ("in_elems", "out_elems", "cin", "cout", "cin_mod", "in_hw", "out_hw", "k", "stride", "n_inputs", "op")
OP_BASE = ("one", "elems")
#: Context features, used by runtime targets (whose kernels are timed inside whole
#: networks): the network the kernel runs in (on a CPU a network whose weights fit in the
#: last-level cache keeps them there from one inference to the next: a 1000-class gemm
#: reads its weights at ~30 us/MB in networks under ~12 MB of weights and ~50-55 us/MB in
#: larger ones here) and the kernel's neighbours (at the edge of a run of convolutions
#: onnxruntime converts out of and into its blocked NCHWc layout, and the conversion is
#: timed with the kernel: a depthwise conv feeding a squeeze-excitation block runs ~25%
#: longer than one feeding a conv).
NETWORK_FEATURES = ("net_weight_mb", "net_act_mb", "net_aligned", "net_footprint_mb")
CONTEXT_FEATURES = NETWORK_FEATURES + ("in_from_op", "out_to_op")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def loop_sizes(k: Kernel) -> dict[str, int]:
    """ZigZag-style loop dimensions of a layer kernel."""
    g = max(k.groups, 1)
    if k.kind == "gemm":
        # rows (tokens of a MatMul over N x H x W x C) form ZigZag's D loop, never unrolled spatially
        return {"G": 1, "K": k.cout, "C": k.cin, "D": k.out_hw[0] * k.out_hw[1], "FX": 1, "FY": 1}
    return {
        "G": g,
        "K": max(k.cout // g, 1),
        "C": max(k.cin // g, 1),
        "OX": k.out_hw[1],
        "OY": k.out_hw[0],
        "FX": k.kernel[1],
        "FY": k.kernel[0],
    }


def layer_features(k: Kernel, parallelism: int, unroll: dict[str, int], elem_bits: int, mem_bits_per_step: float):
    loops = loop_sizes(k)
    ideal = 1
    lanes = 1
    for dim, size in loops.items():
        u = int(unroll.get(dim, 1))
        if dim == "G" and k.kind != "dwconv":
            u = 1  # a G unroll (vectorized depthwise channels) does not parallelize grouped dense convs
        ideal *= _ceil_div(size, u)
        lanes *= u
    macs = max(k.macs, 1)
    in_elems = k.cin * k.in_hw[0] * k.in_hw[1]
    # a strided kernel smaller than its stride never reads part of its input
    read_h = min(k.in_hw[0], k.out_hw[0] * min(k.kernel[0], k.stride[0]) + max(k.kernel[0] - k.stride[0], 0))
    read_w = min(k.in_hw[1], k.out_hw[1] * min(k.kernel[1], k.stride[1]) + max(k.kernel[1] - k.stride[1], 0))
    in_read = k.cin * read_h * read_w
    out_elems = k.cout * k.out_hw[0] * k.out_hw[1]
    w_elems = k.weight_elems
    mem = (in_read + out_elems * (2 if k.fused_add else 1) + w_elems) * elem_bits / max(mem_bits_per_step, 1e-9)
    p = max(parallelism, 1)
    f = {
        "macs": macs,
        "ideal": ideal,
        "mem": mem,
        "util": macs / (ideal * lanes),
        "cin": k.cin,
        "cout": k.cout,
        "cin_mod": k.cin % p,
        "cout_mod": k.cout % p,
        "cin_pad_ratio": _ceil_div(k.cin, p) * p / max(k.cin, 1),
        "cout_pad_ratio": _ceil_div(k.cout, p) * p / max(k.cout, 1),
        "k": k.kernel[0] * k.kernel[1],
        "stride": k.stride[0],
        "groups": k.groups,
        "cin_per_group": k.cin // max(k.groups, 1),
        "in_hw": k.in_hw[0] * k.in_hw[1],
        "out_hw": k.out_hw[0] * k.out_hw[1],
        "in_elems": in_elems,
        "out_elems": out_elems,
        "w_elems": w_elems,
        "act": ACT_CODES.get(k.act, 8),
        "fused_add": int(k.fused_add),
        "post_act": ACT_CODES.get(k.post_act, 8),
        "compute_over_mem": ideal / max(mem, 1e-9),
        # output rows/columns rounded up to the array's spatial unroll (ZigZag's mappings
        # change when they do not divide: on edge_tpu_like a 1x1 conv at 55x55 takes 56%
        # of the time it takes at 56x56)
        "spatial_pad_ratio": _ceil_div(k.out_hw[1], int(unroll.get("OX", 1))) * int(unroll.get("OX", 1))
        * _ceil_div(k.out_hw[0], int(unroll.get("OY", 1))) * int(unroll.get("OY", 1)) / max(k.out_hw[0] * k.out_hw[1], 1),
    }
    base = {"one": 1.0, "ideal": float(ideal), "mem": float(mem), "bound": float(max(ideal, mem))}
    return f, base


def op_features(k: Kernel, parallelism: int):
    p = max(parallelism, 1)
    f = {
        "in_elems": k.in_elems,
        "out_elems": k.out_elems,
        "cin": k.cin,
        "cout": k.cout,
        "cin_mod": k.cin % p,
        "in_hw": k.in_hw[0] * k.in_hw[1],
        "out_hw": k.out_hw[0] * k.out_hw[1],
        "k": k.kernel[0] * k.kernel[1],
        "stride": k.stride[0],
        "n_inputs": k.n_inputs,
        "op": OP_CODES.get(k.op, 0),
    }
    base = {"one": 1.0, "elems": float(k.in_elems + k.out_elems)}
    return f, base


def network_context(kernels: list[Kernel], bytes_per_element: int, parallelism: int = 8) -> tuple[float, ...]:
    """The network the kernels make up, as :data:`NETWORK_FEATURES`: its weight MB, the MB
    of all kernel outputs, the share of conv/gemm MACs whose input and output channels are
    multiples of the parallelism factor (a runtime with blocked layouts runs an aligned
    network without layout conversions), and its cache footprint (weights plus the
    largest kernel's input and output)."""
    layers = [k for k in kernels if k.kind in LAYER_KINDS]
    w = sum(k.weight_elems for k in layers)
    outs = [k.cout * k.out_hw[0] * k.out_hw[1] if k.kind in LAYER_KINDS else k.out_elems for k in kernels]
    ins = [k.cin * k.in_hw[0] * k.in_hw[1] if k.kind in LAYER_KINDS else k.in_elems for k in kernels]
    live = max((i + o for i, o in zip(ins, outs)), default=0)
    p = max(parallelism, 1)
    total = sum(max(k.macs, 1) for k in layers)
    aligned = sum(max(k.macs, 1) for k in layers if k.cin % p == 0 and k.cout % p == 0)
    mb = bytes_per_element / 2**20
    return w * mb, sum(outs) * mb, aligned / total if total else 1.0, (w + live) * mb


def feature_rows(kernels: list[Kernel], target, context=None) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix and baseline matrix for kernels of one group (all layer or all op kinds).

    ``context`` (one :func:`network_context` tuple, or one per kernel) appends the
    :data:`CONTEXT_FEATURES` columns: the network's, then each kernel's boundary flags."""
    if not kernels:
        return np.zeros((0, 0)), np.zeros((0, 0))
    layer = kernels[0].kind in LAYER_KINDS
    rows, bases = [], []
    for k in kernels:
        if layer:
            f, b = layer_features(k, target.parallelism, target.unroll, target.elem_bits, target.mem_bits_per_step)
            rows.append([f[n] for n in LAYER_FEATURES])
            bases.append([b[n] for n in LAYER_BASE])
        else:
            f, b = op_features(k, target.parallelism)
            rows.append([f[n] for n in OP_FEATURES])
            bases.append([b[n] for n in OP_BASE])
    x = np.asarray(rows, dtype=np.float64)
    if context is not None:
        c = np.broadcast_to(np.asarray(context, dtype=np.float64), (len(kernels), len(NETWORK_FEATURES)))
        edges = np.array([[k.in_from_op, k.out_to_op] for k in kernels], dtype=np.float64)
        x = np.hstack([x, c, edges])
    return x, np.asarray(bases, dtype=np.float64)


def correction_rows(kernels: list[Kernel], target, prior_ms) -> np.ndarray:
    """The log terms an adapted target's corrections read (:data:`~archpass.costmodel.predictor.LAYER_TERMS`
    or ``OP_TERMS``), for kernels of one group: the prior's prediction, and the analytic
    compute and memory terms on the adapted target's own hardware."""
    if not kernels:
        return np.zeros((0, 0))
    layer = kernels[0].kind in LAYER_KINDS
    rows = []
    for k, p in zip(kernels, prior_ms):
        lp = float(np.log(max(float(p), 1e-9)))
        if layer:
            _, b = layer_features(k, target.parallelism, target.unroll, target.elem_bits, target.mem_bits_per_step)
            rows.append([1.0, lp, np.log(max(b["ideal"], 1e-9)), np.log(max(b["mem"], 1e-9))])
        else:
            rows.append([1.0, lp, np.log(max(k.in_elems + k.out_elems, 1))])
    return np.asarray(rows, dtype=np.float64)


def residual_rows(kernels: list[Kernel], target, prior_ms) -> np.ndarray:
    """What a :class:`~archpass.costmodel.predictor.Correction`'s residual trees read, for
    kernels of one group (all layer or all op kinds): the analytic features on ``target``,
    the kernel's edge flags and kind, its log prior prediction, for layer kinds its work
    per group (:func:`group_work`), and its blocked-layout flags (:func:`blocked_layout`).
    Columns are only ever appended: trees trained on fewer columns read the first ones
    (:meth:`~archpass.costmodel.predictor.Correction.tree_factor`)."""
    if not kernels:
        return np.zeros((0, 0))
    x, _ = feature_rows(kernels, target)
    layer = kernels[0].kind in LAYER_KINDS
    extra = [[float(k.in_from_op), float(k.out_to_op), float(LAYER_KINDS.index(k.kind)) if layer else 0.0,
              float(np.log(max(float(p), 1e-9)))] for k, p in zip(kernels, prior_ms)]
    out = np.hstack([x, np.asarray(extra, dtype=np.float64)])
    if layer:
        out = np.hstack([out, np.asarray([group_work(k) for k in kernels], dtype=np.float64)])
    # where onnxruntime's blocked layout puts the kernel and its conversions (zeros for
    # targets without it: a plain onnxruntime target's trees never split on them)
    lay = blocked_layout(target)
    flags = [[float(lay and k.blocked), float(lay and k.in_reorder), float(lay and k.out_reorder)] for k in kernels]
    return np.hstack([out, np.asarray(flags, dtype=np.float64)])


def blocked_layout(target) -> bool:
    """Whether ``target`` runs onnxruntime's blocked NCHWc layout: an onnxruntime CPU
    target with every graph optimization (the layout rewrite is one of them) on a host
    that has one (``FusionRules.nchwc_block``)."""
    src = getattr(target, "source", None) or {}
    fusion = getattr(target, "fusion", None)
    return (src.get("backend") == "onnxruntime" and src.get("provider", "CPUExecutionProvider") == "CPUExecutionProvider"
            and src.get("graph_optimization", "all") == "all" and (fusion is None or fusion.nchwc_block > 0))


def group_work(k: Kernel) -> tuple[float, float]:
    """A layer kernel's work per group: log MACs per group, and log input x output
    channels per group.  A CPU runs a grouped conv group by group, so a conv's time
    follows its per-group GEMM (at 2 threads here RegNetX's 16-channel groups, 10-25 of
    them, ran at a fifth to a quarter of the 1-thread base's prediction, 8-channel groups
    at a third to a half)."""
    g = max(k.groups, 1)
    return (float(np.log(max(k.macs, 1) / g)),
            float(np.log(max(k.cin // g, 1) * max(k.cout // g, 1))))


def log_safe(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, 1e-9))


__all__ = ["LAYER_FEATURES", "OP_FEATURES", "LAYER_BASE", "OP_BASE", "CONTEXT_FEATURES", "NETWORK_FEATURES", "feature_rows",
           "layer_features", "op_features", "loop_sizes", "network_context", "correction_rows", "residual_rows",
           "group_work", "blocked_layout"]
