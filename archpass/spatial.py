"""Recomputing a Structure at another input resolution, without ONNX.

:func:`propagate_hw` walks the structure's nodes in topological order and recomputes
the shape of every tensor whose input changed: convolutions and pools from their
kernel/stride/pads (``Node.spatial``), global pools to 1x1, elementwise ops by
broadcasting, Resize by its scales, its sizes, or the tensors its sizes follow
(``sizes_from``, :mod:`archpass.sizelinks`), and the few layout ops whose axes the
analysis records (Transpose, Flatten, Concat, Squeeze/Unsqueeze, reductions).  Anything that pins a spatial size
(a Reshape, a Flatten of a spatial map into features, a Gemm fed by one, an op whose
output depends on the input's size) raises :class:`SpatialError` naming the node, so
the resolution pass can refuse with that reason.
"""

from __future__ import annotations

import math
from dataclasses import replace

from archpass.structure import HW, Layer, Node, Structure, Tensor, conv_out

BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less",
    "And", "Or", "GreaterOrEqual", "LessOrEqual", "Mod", "BitShift",
}
SAME_AS_FIRST = {
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "Erf",
    "Softplus", "Softsign", "Exp", "Log", "Sqrt", "Neg", "Abs", "Identity", "Dropout", "Cast", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Celu", "Mish", "ThresholdedRelu", "Not", "IsNaN", "Sin", "Cos", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "Softmax", "LogSoftmax", "LRN", "Hardmax", "CastLike",
}
WINDOWED = {"Conv", "MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
DIMWISE = {"Slice", "Split", "Pad"}


class SpatialError(ValueError):
    """The structure cannot run at the requested resolution; ``str()`` says where and why."""


def _broadcast(shapes: list[tuple[int, ...]], node: Node) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for d in range(rank):
        dims = {s[d - (rank - len(s))] for s in shapes if d - (rank - len(s)) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise SpatialError(f"{node.op} '{node.name}' would join tensors of shapes "
                               f"{' and '.join(str(tuple(s)) for s in shapes)}")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _windowed(node: Node, x: tuple[int, ...], old_out: tuple[int, ...]) -> tuple[int, ...]:
    a = dict(node.spatial)
    k = a["kernel"]
    nd = len(k)
    strides = a.get("strides") or (1,) * nd
    pads = a.get("pads") or (0,) * (2 * nd)
    dil = a.get("dilations") or (1,) * nd
    ceil = bool(a.get("ceil_mode", 0))
    auto = a.get("auto_pad") or "NOTSET"
    spatial = []
    for i in range(nd):
        size = x[2 + i]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // strides[i])
        elif auto == "VALID":
            o = conv_out(size, k[i], strides[i], 0, 0, dil[i], ceil)
        else:
            o = conv_out(size, k[i], strides[i], pads[i], pads[i + nd], dil[i], ceil)
        if o < 1:
            raise SpatialError(f"{node.op} '{node.name}' would get a {'x'.join(map(str, x[2:]))} input, "
                               f"smaller than its {'x'.join(map(str, k))} window")
        spatial.append(o)
    return (x[0], old_out[1], *spatial)


def _out_shapes(node: Node, s: Structure, get, changed: set[str]) -> list[tuple[int, ...]]:
    """New shapes of ``node``'s outputs given the (possibly new) shapes of its inputs."""
    op = node.op
    ins = [i for i in node.inputs if i]
    x = get(ins[0]) if ins else ()
    old = [s.tensors[o].shape if o in s.tensors else () for o in node.outputs]
    old_x = s.tensors[ins[0]].shape if ins and ins[0] in s.tensors else ()
    where = f"{op} '{node.name}'"
    if op in WINDOWED:
        return [_windowed(node, x, old[0])]
    if op in GLOBAL_POOLS:
        return [(*x[:2], *([1] * (len(x) - 2)))]
    if op in SAME_AS_FIRST:
        return [x] + old[1:]
    if op in BROADCAST:
        return [_broadcast([get(i) for i in ins], node)]
    if op in ("Resize", "Upsample"):
        scales = node.attr("scales")
        if scales:
            return [tuple(int(math.floor(d * sc)) for d, sc in zip(x, scales))]
        linked = node.attr("sizes_from")
        if linked:  # the source computed them from these tensors' dims (archpass.sizelinks)
            return [tuple(e[1] if e[0] == "const" else get(e[1])[e[2]] for e in linked)]
        if node.attr("sizes"):
            return [tuple(node.attr("sizes"))]
        raise SpatialError(f"{where} computes its output size at run time")
    if op == "Transpose":
        return [tuple(x[p] for p in node.attr("perm"))]
    if op == "Concat":
        axis = node.attr("axis") % len(x)
        parts = [get(i) for i in ins]
        for p in parts[1:]:
            if len(p) != len(x) or any(a != b for d, (a, b) in enumerate(zip(p, x)) if d != axis):
                raise SpatialError(f"{where} would join tensors of shapes {' and '.join(str(tuple(q)) for q in parts)}")
        return [tuple(sum(p[axis] for p in parts) if d == axis else x[d] for d in range(len(x)))]
    if op == "Flatten":
        axis = node.attr("axis") % max(len(x), 1)
        if math.prod(x[axis:]) != math.prod(old_x[axis:]):
            raise SpatialError(f"{where} turns a {'x'.join(map(str, old_x[2:]))} feature map into a fixed number of "
                               "features; the network is not fully convolutional up to a global pooling")
        return [(math.prod(x[:axis]), math.prod(x[axis:]))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = node.attr("axes")
        if op == "Squeeze":
            axes = tuple(i for i, d in enumerate(old_x) if d == 1) if axes is None else axes
            if any(x[a] != 1 for a in axes):
                raise SpatialError(f"{where} would squeeze an axis that is no longer of size 1")
            return [tuple(d for i, d in enumerate(x) if i not in axes)]
        rank = len(x) + len(axes)
        it = iter(x)
        return [tuple(1 if i in axes else next(it) for i in range(rank))]
    if op.startswith("Reduce"):
        axes = node.attr("axes")
        if axes is None:
            if node.attr("noop_with_empty_axes", 0):
                return [x]
            axes = tuple(range(len(x)))
        if node.attr("keepdims", 1):
            return [tuple(1 if i in axes else d for i, d in enumerate(x))]
        return [tuple(d for i, d in enumerate(x) if i not in axes)]
    if op == "Gemm" and node.layer:
        if x[1:] != old_x[1:]:
            raise SpatialError(f"{where} has a fixed number of input features ({old_x[1]}) but would get {x[1]}; "
                               "the network is not fully convolutional up to a global pooling")
        return [(x[0], old[0][1])]
    if op == "MatMul" and node.layer:
        return [(*x[:-1], old[0][-1])]
    if op in DIMWISE:
        outs = []
        for o in old:
            shp = []
            for d, (a, b) in enumerate(zip(old_x, x)):
                if o[d] == a:
                    shp.append(b)
                elif a == b:
                    shp.append(o[d])
                else:
                    raise SpatialError(f"{where} cuts or pads axis {d}, whose size would change from {a} to {b}")
            outs.append(tuple(shp))
        return outs
    if op == "Reshape":
        raise SpatialError(f"{where} fixes the spatial size (it reshapes {tuple(old_x)} to {tuple(old[0])})")
    raise SpatialError(f"{where} depends on the size of its input, which archpass cannot recompute")


def _with(obj, **changes):
    """``dataclasses.replace`` for frozen dataclasses without ``__post_init__`` (Layer, Tensor),
    ten times faster: this runs for every tensor of every candidate the search scores."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


def linear_hw(shape: tuple[int, ...], batch: int = 1) -> HW:
    """The positions a Gemm or MatMul layer runs over, per sample, as (H, W): every axis of
    its input but the batch and the channels (the last).  A 2-D input is rows of channels:
    one row per sample after a flatten, but H*W rows per sample for a Linear over the
    flattened positions ([N*H*W, C], as exports write ConvNeXt's and transformers' Linears).
    An input whose dim 0 is not the batch is rows too, all its leading axes per sample:
    sequence-first (tokens, N, C), as torch's MultiheadAttention projects, or windows folded
    into the batch (N x windows, tokens, C)."""
    batch = max(1, int(batch))
    if len(shape) > 2 and int(shape[0]) == batch:
        hw = tuple(int(d) for d in shape[1:-1])
        return (hw[0], int(math.prod(hw[1:])) if len(hw) > 1 else 1)
    rows = int(math.prod(int(d) for d in shape[:-1])) if len(shape) > 1 else (int(shape[0]) if shape else 1)
    return (rows // batch if rows % batch == 0 else rows, 1) if rows > 0 else (1, 1)


def model_batch(inputs) -> int:
    """The batch size of a model: the smallest positive dim 0 of its (name, shape) inputs."""
    return min((int(shp[0]) for _, shp in inputs if len(shp) and shp[0] > 0), default=1)


def propagate_hw(s: Structure, hw: HW) -> Structure:
    """``s`` with its (first 4-D) input at height/width ``hw``; raises SpatialError where that cannot work."""
    hw = (int(hw[0]), int(hw[1]))
    first = next(((n, shp) for n, shp in s.inputs if len(shp) == 4), None)
    if first is None:
        raise SpatialError("the model has no 4-D image input")
    name, shape = first
    h_axis, w_axis = s.input_hw_axes
    if (shape[h_axis], shape[w_axis]) == hw:
        return s
    resized = list(shape)
    resized[h_axis], resized[w_axis] = hw
    new: dict[str, tuple[int, ...]] = {name: tuple(resized)}
    tensors = s.tensors

    def get(t: str) -> tuple[int, ...]:
        got = new.get(t)
        return got if got is not None else tensors[t].shape

    for node in s.nodes:
        linked = tuple(e[1] for e in node.attr("sizes_from") or () if e[0] == "dim")
        for i in (*node.inputs, *linked):
            if i in new:
                break
        else:
            continue
        for o, shp in zip(node.outputs, _out_shapes(node, s, get, set(new))):
            if o and tuple(shp) != (tensors[o].shape if o in tensors else None):
                new[o] = tuple(int(d) for d in shp)
    new_tensors = dict(tensors)
    for t, shp in new.items():
        new_tensors[t] = _with(tensors[t], shape=shp) if t in tensors else Tensor(t, shp)
    layers: list[Layer] = []
    for l in s.layers:
        if l.input in new or l.output in new:
            xs, ys = get(l.input), get(l.output)
            if l.op == "Conv":
                layers.append(_with(l, in_hw=(xs[2], xs[3]), out_hw=(ys[2], ys[3])))
            else:
                hw = linear_hw(xs, model_batch(s.inputs))
                layers.append(_with(l, in_hw=hw, out_hw=hw))
        else:
            layers.append(l)
    by_id = {l.id: l for l in layers}
    blocks = {b.id: b for b in s.blocks}
    stages = tuple(
        replace(st, hw=by_id[blocks[st.blocks[-1]].layers[-1]].out_hw) if st.blocks else st for st in s.stages
    )
    inputs = tuple((n, get(n)) for n, _ in s.inputs)
    outputs = tuple((n, get(n)) for n, _ in s.outputs)
    return replace(s, inputs=inputs, outputs=outputs, layers=tuple(layers), stages=stages, tensors=new_tensors)
