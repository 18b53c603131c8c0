"""Set a model's data-dependent post-processing aside, and put it back on emit.

A detector exported whole ends in post-processing whose shapes depend on the data: box
decoding after a ``NonZero``, ``TopK`` over a computed count, ``NonMaxSuppression``,
``RoiAlign`` over the proposals it kept, a ``Loop``.  Analysis, the passes and the cost
model need static shapes, and that part is not what a rewrite targets anyway.
:func:`split` cuts the graph at the first nodes whose output shape depends on the data
(and everything they feed); loading (``archpass.model._cut_tail``) cuts the source as
written and canonicalizes only the network before them, which is the model archpass
analyzes, rewrites, scores and compares (its outputs are the tensors the post-processing
reads, the *frontier*), and the rest is kept as a :class:`Tail`.  :func:`attach` puts the
tail back after the (rewritten) network, so an emitted model computes what the source
did, with the source's outputs.

The frontier keeps its names and shapes through every rewrite: the analysis fixes the
channels of the groups that feed a model output, and the resolution pass is off (the
tail may hold sizes folded at the current input size; see
:func:`archpass.passes.resolution.fixed_reason`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto

from archpass.batchaxis import LAYER_OPS
from archpass.errors import ArchpassError


@dataclass(frozen=True)
class Tail:
    """The post-processing :func:`split` set aside."""

    nodes: tuple[NodeProto, ...] = field(repr=False)
    initializers: tuple[TensorProto, ...] = field(repr=False)
    #: the source's graph outputs, in order, as the (canonical) source declared them
    outputs: tuple[ValueInfoProto, ...] = field(repr=False)
    #: tensors of the network the tail reads (the network's outputs while it is analyzed)
    frontier: tuple[str, ...]
    #: the first nodes whose output shape depends on the data, as "name (Op)"
    seeds: tuple[str, ...]

    @property
    def params(self) -> int:
        return int(sum(int(np.prod(t.dims)) for t in self.initializers))

    def note(self) -> str:
        ops = Counter(n.op_type for n in self.nodes if n.op_type != "Constant")
        data_ops = sorted({s.rsplit("(", 1)[1].rstrip(")") for s in self.seeds})
        top = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in ops.most_common(6))
        params = f", {self.params / 1e6:.2f} M parameters" if self.params >= 1e5 else ""
        return (f"the post-processing after the data-dependent {', '.join(data_ops)} ({sum(ops.values())} nodes: {top}"
                f"{', ...' if len(ops) > 6 else ''}{params}) is set aside: archpass rewrites, scores and compares the "
                f"network before it ({len(self.frontier)} tensors feed it), leaves it out of the estimates, and puts it "
                "back unchanged in the emitted model")


def _subgraph_inputs(node: NodeProto) -> set[str]:
    """The outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
            for n in g.node:
                names.update(i for i in list(n.input) + list(_subgraph_inputs(n)) if i and i not in local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def _reads(node: NodeProto) -> set[str]:
    return {i for i in node.input if i} | _subgraph_inputs(node)


def seeds(proto: ModelProto, unshaped: set[str], data_dependent: frozenset[str]) -> tuple[str, ...]:
    """The names of ``proto``'s nodes of a ``data_dependent`` op type with an output in
    ``unshaped`` (the tensors its shape inference leaves without a static shape: the
    canonical model's, or the source's inferred with data propagation)."""
    return tuple(n.name for n in proto.graph.node if n.op_type in data_dependent and any(o in unshaped for o in n.output))


def layers_before(proto: ModelProto, seed_names: Sequence[str]) -> int:
    """How many layer nodes (Conv, Gemm, MatMul, ...) of ``proto`` are not downstream of ``seed_names``."""
    seeds, tainted, count = set(seed_names), set(), 0
    for n in proto.graph.node:
        if n.name in seeds or _reads(n) & tainted:
            tainted.update(o for o in n.output if o)
        elif n.op_type in LAYER_OPS:  # archpass.batchaxis's
            count += 1
    return count


def split(proto: ModelProto, seed_names: Sequence[str], types: Mapping[str, ValueInfoProto],
          constants: Mapping[str, TensorProto] | None = None) -> Tail | None:
    """Cut ``proto`` (the source, before canonicalization: onnxslim has rewritten a Mask
    R-CNN's mask-pasting Loop into one that pastes a single mask; changed in place) before
    the nodes ``seed_names`` and everything downstream of them.  ``types`` gives the value
    info of the tensors that become the network's outputs (the frontier; shapes are
    inferred again with the network); ``constants`` the tensors canonicalization folded
    (they go with the tail as initializers).  Returns the tail, or None when a seed is not in
    ``proto``, a frontier tensor has no type, or nothing would be left before it."""
    g = proto.graph
    by_name = {n.name: n for n in g.node}
    if not seed_names or any(name not in by_name for name in seed_names):
        return None
    seeds = [by_name[name] for name in seed_names]
    tainted: set[str] = set()
    in_tail: list[bool] = []
    seed_ids = {id(n) for n in seeds}
    roots = []  # the seeds that read nothing the tail made before them
    for n in g.node:  # topological order: a node is in the tail when it reads what the tail made
        downstream = bool(_reads(n) & tainted)
        t = id(n) in seed_ids or downstream
        if id(n) in seed_ids and not downstream:
            roots.append(n)
        in_tail.append(t)
        if t:
            tainted.update(o for o in n.output if o)
    # Constant nodes only the tail reads go with it
    tail_reads = set().union(*(_reads(n) for n, t in zip(g.node, in_tail) if t))
    head_reads = set().union(*(_reads(n) for n, t in zip(g.node, in_tail) if not t))
    for i, n in enumerate(g.node):
        if not in_tail[i] and n.op_type == "Constant" and not (set(n.output) & (head_reads | {o.name for o in g.output})):
            in_tail[i] = True
    head = [n for n, t in zip(g.node, in_tail) if not t]
    tail = [n for n, t in zip(g.node, in_tail) if t]
    if not any(n.op_type != "Constant" for n in head):
        return None
    inits = {i.name: i for i in g.initializer}
    head_reads = set().union(*(_reads(n) for n in head))
    produced = [o for n in head for o in n.output if o]
    head_outputs = {o.name for o in g.output}
    const_nodes = {n.output[0]: n for n in head if n.op_type == "Constant" and n.output}
    read = [o for o in produced if o in tail_reads and o not in head_outputs]
    # the tail's constants: initializers, Constant nodes' values, and tensors of the network
    # that canonicalization folded (``constants``), as initializers of the tail
    constants = constants or {}
    folded = {name: constants[name] for name in read if name in constants}
    folded.update({name: _constant_value(const_nodes[name]) for name in read
                   if name in const_nodes and name not in folded})
    if any(t is None for t in folded.values()):  # a sparse Constant: not ours to cut
        return None
    frontier = [o for o in read if o not in folded]
    tail_inits = [inits[name] for name in sorted(tail_reads & inits.keys())]
    tail_inits += [TensorProto.FromString(t.SerializeToString()) for t in folded.values()]
    shapes = dict(types)
    sources = tuple(ValueInfoProto.FromString(o.SerializeToString()) for o in g.output)
    kept_outputs = [o for o in g.output if o.name not in tainted]
    new_outputs = kept_outputs + [_typed(shapes[name]) for name in frontier if name in shapes]
    if len(new_outputs) != len(kept_outputs) + len(frontier):  # a frontier tensor without a shape: not ours to cut
        return None
    result = Tail(nodes=tuple(NodeProto.FromString(n.SerializeToString()) for n in tail),
                  initializers=tuple(TensorProto.FromString(t.SerializeToString()) for t in tail_inits),
                  outputs=sources, frontier=tuple(frontier), seeds=tuple(f"{n.name} ({n.op_type})" for n in roots))
    out_copies = [ValueInfoProto.FromString(o.SerializeToString()) for o in new_outputs]
    del g.node[:]
    g.node.extend(head)
    del g.output[:]
    g.output.extend(out_copies)
    keep = head_reads | {o.name for o in g.output}
    kept_inits = [i for i in g.initializer if i.name in keep]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    dropped = tainted | {o for n in tail for o in n.output}
    kept_vi = [vi for vi in g.value_info if vi.name not in dropped and vi.name not in set(frontier)]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    return result


def _constant_value(node: NodeProto) -> TensorProto | None:
    """A Constant node's value as an initializer named after its output (None for a sparse one)."""
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            t = TensorProto.FromString(a.t.SerializeToString())
            t.name = node.output[0]
            return t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = onnx.helper.get_attribute_value(a)
            dtype = np.float32 if a.name.startswith("value_float") else np.int64
            return numpy_helper.from_array(np.array(v, dtype=dtype), node.output[0])
    return None


def _typed(vi: ValueInfoProto) -> ValueInfoProto:
    """``vi``'s name and element type, no shape (inference gives it with the network)."""
    return onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None)


def settle(proto: ModelProto, tail: Tail) -> Tail:
    """After the network ``proto`` (changed in place) was canonicalized: frontier tensors
    that became constants (folded) stop being its outputs and go with the tail."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    folded = [name for name in tail.frontier if name in inits]
    if not folded:
        return tail
    keep = [o for o in g.output if o.name not in folded]
    del g.output[:]
    g.output.extend(keep)
    from dataclasses import replace

    return replace(tail, frontier=tuple(n for n in tail.frontier if n not in folded),
                   initializers=tail.initializers + tuple(TensorProto.FromString(inits[n].SerializeToString())
                                                          for n in folded))


def attach(proto: ModelProto, tail: Tail | None) -> ModelProto:
    """``proto`` (the rewritten network; not changed) followed by ``tail``: the source's
    outputs again.  A tail initializer whose name the network now uses for another
    tensor is renamed in the tail."""
    if tail is None:
        return proto
    out = ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    missing = [t for t in tail.frontier if t not in produced]
    if missing:
        raise ArchpassError(f"the rewritten network no longer computes '{missing[0]}', which the post-processing reads",
                            "this is an archpass bug: please report it with the model")
    inits = {i.name: i for i in g.initializer}
    rename: dict[str, str] = {}
    added = []
    computed = {o for n in g.node for o in n.output}
    for t in tail.initializers:
        have = inits.get(t.name)
        if have is None and t.name not in computed:
            added.append(t)
        elif have is None or have.SerializeToString() != t.SerializeToString():  # the network computes it, or holds another value
            new = TensorProto.FromString(t.SerializeToString())
            k = 1
            while f"{t.name}__tail{k}" in produced:
                k += 1
            new.name = rename[t.name] = f"{t.name}__tail{k}"
            added.append(new)
    nodes = [NodeProto.FromString(n.SerializeToString()) for n in tail.nodes]
    if rename:
        for n in nodes:
            rename_reads(n, rename)
    g.initializer.extend(added)
    g.node.extend(nodes)
    del g.output[:]  # the network's outputs were the source's it computes and the frontier
    g.output.extend(ValueInfoProto.FromString(o.SerializeToString()) for o in tail.outputs)
    return out


def rename_reads(node: NodeProto, rename: Mapping[str, str]) -> None:
    """Rename the tensors ``node`` reads, in its subgraphs too (unless a subgraph defines
    the name itself)."""
    for i, name in enumerate(node.input):
        if name in rename:
            node.input[i] = rename[name]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer} | {o for n in sub.node for o in n.output}
            outer = {k: v for k, v in rename.items() if k not in local}
            for n in sub.node:
                rename_reads(n, outer)
