"""Inputs without a batch axis: analyzed as a batch of one, emitted as the source had them.

Some exports take one sample per run and add the batch axis inside the graph: a
torchvision detector traced on a list of images reads ``images`` as ``(3, H, W)`` and
unsqueezes it to ``(1, 3, H, W)`` after normalizing it.  Everything that runs models on
calibration data counts samples along axis 0, so such an input would be read as three
samples of ``(H, W)``.  :func:`find` recognizes such inputs (their data, after element-wise
ops only, gets a new leading axis of 1 before any layer reads it); :func:`wrap` gives the
model under analysis a batch-of-one input that a ``Squeeze`` turns back into the source's
tensor, and :func:`unwrap` removes that ``Squeeze`` again from an emitted model, which
then reads the input as the source did (at the rewritten spatial size, if the input
resolution changed).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

#: suffix of the tensor the Squeeze writes: the source's input as the graph reads it
SUFFIX = "__archpass_sample"
SQUEEZE_PREFIX = "archpass_batch_axis_"
#: ops that read an input as a layer would (the search stops there; archpass.tail counts them)
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention"})
#: ops that keep their first input's shape for the element-wise path from the input
ELEMENTWISE = frozenset({"Sub", "Div", "Mul", "Add", "Cast", "Identity", "Clip", "Relu", "Neg", "Abs", "Sqrt",
                         "Pow", "Sigmoid", "Tanh", "Min", "Max"})


def _shapes(proto: ModelProto) -> dict[str, tuple]:
    g = proto.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    return out


def _axes(node, inits: dict[str, onnx.TensorProto]) -> tuple[int, ...] | None:
    """An Unsqueeze's axes (attribute before opset 13, initializer input after)."""
    for a in node.attribute:
        if a.name == "axes":
            return tuple(a.ints)
    if len(node.input) > 1 and node.input[1] in inits:
        return tuple(int(x) for x in np.atleast_1d(numpy_helper.to_array(inits[node.input[1]])))
    return None


def find(proto: ModelProto) -> tuple[str, ...]:
    """The graph inputs that get a new leading axis of 1 (an ``Unsqueeze`` at axis 0, or a
    ``Reshape`` to ``(1, *shape)``) after element-wise ops only, before any layer reads them."""
    g = proto.graph
    shapes = _shapes(proto)
    inits = {t.name: t for t in g.initializer}  # read only for an Unsqueeze's axes: no weight is converted
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for vi in g.input:
        if vi.name in inits:
            continue
        shape = shapes.get(vi.name)
        if not shape or None in shape:
            continue
        todo, seen, batchless, layer = [vi.name], set(), False, False
        while todo and not layer:
            t = todo.pop()
            for n in consumers.get(t, ()):
                if n.op_type in LAYER_OPS:
                    layer = True
                    break
                out = n.output[0] if n.output else ""
                if n.op_type == "Unsqueeze" and (_axes(n, inits) or ()) in ((0,), (-len(shape) - 1,)):
                    batchless = True
                elif n.op_type == "Reshape" and shapes.get(out) == (1, *shape):
                    batchless = True
                elif n.op_type in ELEMENTWISE and out and shapes.get(out) == shape and out not in seen:
                    seen.add(out)
                    todo.append(out)
        if batchless and not layer:
            found.append(vi.name)
    return tuple(found)


def _opset(proto: ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)


def wrap(proto: ModelProto, names: tuple[str, ...]) -> None:
    """Give the inputs ``names`` of ``proto`` (changed in place) a leading axis of 1, which a
    ``Squeeze`` at the graph's start removes again for the nodes that read them."""
    g = proto.graph
    rename = {n: n + SUFFIX for n in names}
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    squeezes = []
    for vi in g.input:
        if vi.name not in rename:
            continue
        inner = onnx.ValueInfoProto()
        inner.CopyFrom(vi)
        inner.name = rename[vi.name]
        g.value_info.append(inner)
        dims = vi.type.tensor_type.shape.dim
        first = onnx.TensorShapeProto.Dimension(dim_value=1)
        rest = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for r, d in zip(rest, dims):
            r.CopyFrom(d)
        del dims[:]
        dims.extend([first, *rest])
        if _opset(proto) >= 13:
            axes = numpy_helper.from_array(np.array([0], dtype=np.int64), SQUEEZE_PREFIX + vi.name + "_axes")
            g.initializer.append(axes)
            squeezes.append(helper.make_node("Squeeze", [vi.name, axes.name], [rename[vi.name]],
                                             name=SQUEEZE_PREFIX + vi.name))
        else:
            squeezes.append(helper.make_node("Squeeze", [vi.name], [rename[vi.name]], name=SQUEEZE_PREFIX + vi.name,
                                             axes=[0]))
    nodes = squeezes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def unwrap(proto: ModelProto, names: tuple[str, ...]) -> ModelProto:
    """``proto`` (not changed) with :func:`wrap`'s ``Squeeze`` nodes removed: the inputs
    ``names`` are read as the source read them, with the dims the rewritten model gives
    them (its input size, if the resolution changed) without the leading 1."""
    if not names:
        return proto
    out = ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    drop = {SQUEEZE_PREFIX + n for n in names}
    back = {n + SUFFIX: n for n in names}
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(kept)
    from archpass.tail import rename_reads

    for node in g.node:
        rename_reads(node, back)
    axes = {SQUEEZE_PREFIX + n + "_axes" for n in names}
    inits = [t for t in g.initializer if t.name not in axes]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name not in back]
    del g.value_info[:]
    g.value_info.extend(vis)
    for vi in g.input:
        if vi.name in names:
            dims = vi.type.tensor_type.shape.dim
            rest = [onnx.TensorShapeProto.Dimension() for _ in dims[1:]]
            for r, d in zip(rest, dims[1:]):
                r.CopyFrom(d)
            del dims[:]
            dims.extend(rest)
    return out


