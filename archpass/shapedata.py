"""Data a source computes from its inputs' shapes, and how an emitted model gets it back.

torch's default (dynamo) exporter writes some tensors as arithmetic on the input's
symbolic sizes: timm's ConvNeXt-V2 and EdgeNeXt heads (an ``as_strided`` after pooling)
become a Gather whose indices are ``Range(0, batch) * C + ...`` over ``Shape(input)``.
Canonicalization folds those at the pinned sizes, so the emitted model would gather item 0
whatever the batch; ViT's class token, expanded to ``Concat(Shape(input)[0:1], 1, 1)``,
is folded to one copy the same way.  Reshape and Resize target shapes are relinked by
:func:`archpass.dynamic._relink_batch`; this module covers every other data input.

:func:`shape_data` records, before canonicalization, each input of a node that the source
computes from nothing but ``Shape`` of graph inputs and constants (none above
:data:`MAX_CONSTANT` elements: a weight that large is not copied, that input stays folded
and the batch static): the consumer node, the input's index and the subgraph that computes
it (a serialized GraphProto).  :func:`relink`
puts each such subgraph back in front of its consumer in an emitted model, but only where
the consumer still reads a constant and the subgraph gives exactly that constant at the
emitted model's (static) input sizes; :mod:`archpass.dynamic` then checks the whole model
at other sizes, as for every relink.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, helper

from archpass.dynamic import SHAPE_INPUTS, constant_reader, fresh_namer

#: constants larger than this are weights, not shape arithmetic: such a subgraph is not recorded
MAX_CONSTANT = 1 << 16


@dataclass(frozen=True)
class ShapeData:
    """Input ``index`` of node ``consumer``, computed in the source by ``graph`` (serialized
    GraphProto: its inputs are the graph inputs it takes ``Shape`` of, its one output the tensor)."""

    consumer: str
    index: int
    graph: bytes


def _nondeterministic(op: str) -> bool:
    return op.startswith("Random") or op in ("Multinomial", "Bernoulli")


def shape_data(proto: ModelProto) -> tuple[ShapeData, ...]:
    """The data inputs ``proto`` computes from its inputs' shapes (see the module); Reshape
    shapes and Resize sizes are left to :func:`archpass.dynamic.computed_shapes`."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    derived: dict[str, onnx.NodeProto] = {}  # tensor -> its producer
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                   for a in n.attribute) or _nondeterministic(n.op_type):
            continue
        shape_of_input = n.op_type == "Shape" and n.input and n.input[0] in inputs
        if shape_of_input or (n.op_type != "Constant" and any(i in derived for i in n.input) and all(
                not i or i in derived or i in inits or i in consts for i in n.input)):
            derived.update((o, n) for o in n.output if o)
    if not derived:
        return ()
    counts = Counter(n.name for n in g.node)
    unique = {x for x, k in counts.items() if x and k == 1}
    out = []
    for n in g.node:
        if any(o in derived for o in n.output) or n.name not in unique:
            continue
        for k, name in enumerate(n.input):
            if name not in derived or SHAPE_INPUTS.get(n.op_type) == k:
                continue
            sub = _subgraph(name, derived, inits, consts, inputs)
            if sub is not None:
                out.append(ShapeData(n.name, k, sub.SerializeToString()))
    return tuple(out)


def _subgraph(tensor: str, derived: dict, inits: dict, consts: dict, inputs: dict) -> GraphProto | None:
    """The nodes, constants and graph inputs that compute ``tensor`` (None: a constant too large)."""
    nodes, used, reads, stack, seen, taken = [], {}, {}, [tensor], set(), set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in derived:
            n = derived[t]
            if id(n) not in taken:
                taken.add(id(n))
                nodes.append(n)
                stack.extend(n.input)
        elif t in inits:
            if int(np.prod(inits[t].dims)) > MAX_CONSTANT:
                return None
            used[t] = inits[t]
        elif t in consts:
            used[t] = None
            nodes.append(consts[t])  # once: t is seen once
        elif t in inputs:
            reads[t] = inputs[t]
    order = {id(n): i for i, n in enumerate(derived.values())}
    consts_first = [n for n in nodes if n.op_type == "Constant"]
    rest = sorted((n for n in nodes if n.op_type != "Constant"), key=lambda n: order.get(id(n), 0))
    return helper.make_graph(consts_first + rest, "shape_data", list(reads.values()),
                             [onnx.ValueInfoProto(name=tensor)], [v for v in used.values() if v is not None])


def _evaluate(sub: GraphProto, static: ModelProto) -> np.ndarray | None:
    """``sub``'s output for zeros at ``static``'s input shapes (None: an input unknown or not static)."""
    from onnx.reference import ReferenceEvaluator

    shapes = {vi.name: vi.type.tensor_type for vi in static.graph.input}
    feeds = {}
    for vi in sub.input:
        tt = shapes.get(vi.name)
        if tt is None or any(not d.HasField("dim_value") for d in tt.shape.dim):
            return None
        feeds[vi.name] = np.zeros([d.dim_value for d in tt.shape.dim], helper.tensor_dtype_to_np_dtype(tt.elem_type))
    model = helper.make_model(sub, opset_imports=list(static.opset_import), ir_version=static.ir_version)
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # noqa: BLE001 - a subgraph the reference cannot run is not relinked
        return None


def relink(proto: ModelProto, data: tuple[ShapeData, ...], static: ModelProto) -> int:
    """In ``proto`` (changed in place), compute each of ``data``'s inputs from the input
    shapes again where its consumer still reads a constant that the subgraph reproduces at
    ``static``'s input sizes (the same model with static dims).  Returns how many were relinked."""
    if not data:
        return 0
    nodes = {n.name: n for n in proto.graph.node if n.name}
    fresh = fresh_namer(proto)
    constant = constant_reader(proto)
    graph_inputs = {i.name for i in proto.graph.input}

    new_nodes, new_inits, replaced = [], [], set()
    for d in data:
        n = nodes.get(d.consumer)
        if n is None or d.index >= len(n.input):
            continue
        folded = constant(n.input[d.index])
        sub = GraphProto.FromString(d.graph)
        if folded is None or any(vi.name not in graph_inputs for vi in sub.input):
            continue
        value = _evaluate(sub, static)
        if value is None or value.dtype != folded.dtype or value.shape != folded.shape or not np.array_equal(value, folded):
            continue
        rename = {vi.name: vi.name for vi in sub.input}
        for i in sub.initializer:
            rename[i.name] = fresh(f"{i.name}_from_shape")
            c = onnx.TensorProto()
            c.CopyFrom(i)
            c.name = rename[i.name]
            new_inits.append(c)
        for m in sub.node:
            c = onnx.NodeProto()
            c.CopyFrom(m)
            for j, o in enumerate(c.output):
                if o:
                    rename[o] = fresh(f"{o}_from_shape")
                    c.output[j] = rename[o]
            for j, i in enumerate(c.input):
                if i:
                    c.input[j] = rename[i]
            c.name = fresh(f"{m.name or m.op_type}_from_shape")
            new_nodes.append(c)
        replaced.add(n.input[d.index])
        n.input[d.index] = rename[sub.output[0].name]
    if not replaced:
        return 0
    used = {i for m in proto.graph.node for i in m.input} | {o.name for o in proto.graph.output}
    unused = replaced - used
    kept_nodes = [m for m in proto.graph.node if not (m.op_type == "Constant" and m.output and m.output[0] in unused)]
    kept_inits = [i for i in proto.graph.initializer if i.name not in unused]
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes + kept_nodes)  # the subgraphs read graph inputs only: first is in order
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_inits + new_inits)
    return len(replaced)
