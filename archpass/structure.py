"""The analyzed structure of a model: a shape-level view that passes and cost models share.

A :class:`Structure` is immutable.  It knows every tensor's shape, every conv/gemm
layer's geometry, the blocks and stages those layers form, and the channel groups: the
sets of tensor channel dimensions that must change together.  Rewrites that only change
shapes produce a new Structure without touching ONNX (channel counts through
:mod:`archpass.passes.resize`, input resolution through :mod:`archpass.spatial`); the
search scores thousands of candidates this way.

Ids are stable for a given input model: layers are named after their ONNX node,
blocks ``block<N>``, groups ``group<N>`` and stages ``stage<N>`` numbered in
topological order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterable, Mapping

HW = tuple[int, int]


def conv_out(size: int, k: int, s: int, pad_begin: int, pad_end: int, d: int = 1, ceil: bool = False) -> int:
    span = d * (k - 1) + 1
    num = size + pad_begin + pad_end - span
    if ceil:
        out = -(-num // s) + 1
        # ONNX: the last window must start inside the input or left padding
        if (out - 1) * s >= size + pad_begin:
            out -= 1
        return out
    return num // s + 1


@dataclass(frozen=True)
class Layer:
    """A conv or gemm/matmul-with-weights node and its geometry (NCHW view).

    ``in_groups`` lists the channel groups the input channel axis is made of (several
    after a Concat), ``out_group`` the group of the output channels.  ``activation``
    is the recognized activation that follows the layer (``relu``, ``relu6``,
    ``hardswish``, ``sigmoid``, ``swish``, ``hardsigmoid``, ``gelu``, ``clip``, or None);
    ``output`` is the layer's own output tensor and ``act_output`` the tensor after that
    activation (equal to ``output`` when there is none).
    """

    id: str
    op: str
    cin: int
    cout: int
    kernel: HW
    stride: HW
    groups: int
    in_hw: HW
    out_hw: HW
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: HW = (1, 1)
    activation: str | None = None
    bias: bool = False
    input: str = ""
    output: str = ""
    act_output: str = ""
    weight: str = ""
    in_groups: tuple[str, ...] = ()
    out_group: str = ""
    provenance: str | None = None

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.groups == self.cin and self.cout % self.cin == 0

    @property
    def pointwise(self) -> bool:
        return self.op == "Conv" and self.kernel == (1, 1) and self.groups == 1

    @property
    def macs(self) -> int:
        return self.cout * self.out_hw[0] * self.out_hw[1] * (self.cin // max(self.groups, 1)) * self.kernel[0] * self.kernel[1]

    @property
    def params(self) -> int:
        return self.cout * (self.cin // max(self.groups, 1)) * self.kernel[0] * self.kernel[1] + (self.cout if self.bias else 0)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "op": self.op,
            "cin": self.cin,
            "cout": self.cout,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "groups": self.groups,
            "in_hw": list(self.in_hw),
            "out_hw": list(self.out_hw),
            "pads": list(self.pads),
            "dilation": list(self.dilation),
            "activation": self.activation,
            "bias": self.bias,
            "macs": self.macs,
            "params": self.params,
            "in_groups": list(self.in_groups),
            "out_group": self.out_group,
            **({"provenance": self.provenance} if self.provenance else {}),
        }


@dataclass(frozen=True)
class Block:
    """A recognized building block.

    ``kind`` is ``ibn`` (1x1 expand, KxK depthwise, optional SE, 1x1 project),
    ``fused_ibn`` (expanding KxK dense, linear 1x1 project), ``depthwise`` (KxK
    depthwise, optional SE, 1x1 pointwise, no expansion) or ``residual`` (any other chain
    of layers around a residual Add, with an identity or projection shortcut: ResNet
    blocks).  ``roles`` maps a role (``expand``, ``depthwise``, ``fused``, ``se_reduce``,
    ``se_expand``, ``project``, ``conv<i>``, ``shortcut``) to a layer id.
    """

    id: str
    kind: str
    layers: tuple[str, ...]
    residual: bool
    stage: int
    roles: tuple[tuple[str, str], ...] = ()
    residual_add: str | None = None

    def role(self, name: str) -> str | None:
        for r, lid in self.roles:
            if r == name:
                return lid
        return None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "layers": list(self.layers),
            "residual": self.residual,
            "stage": self.stage,
            "roles": dict(self.roles),
        }


@dataclass(frozen=True)
class Member:
    """One place a channel group appears.

    ``role`` is ``producer`` (a layer's output channels), ``consumer`` (a layer's input
    channels, at ``offset`` within a concatenated input), ``depthwise`` (in = out),
    ``elementwise`` (Add/Mul/activation/normalization: shapes must agree), ``param``
    (a per-channel constant such as a BatchNorm scale or a LayerNorm weight),
    ``concat`` (an input of a Concat at ``offset``), ``input``/``output`` (a graph
    input or output).
    """

    node: str
    op: str
    role: str
    offset: int = 0

    def to_json(self) -> dict:
        d = {"node": self.node, "op": self.op, "role": self.role}
        if self.offset:
            d["offset"] = self.offset
        return d


@dataclass(frozen=True)
class Fix:
    """Why a channel group cannot change: ``reason``, and its ``source``: the node being
    visited when analysis fixed the group, or the graph input/output tensor.  A rewrite that
    removes or moves the source (``dw_to_dense``) drops or moves its fixes with it."""

    source: str
    reason: str


@dataclass(frozen=True)
class ChannelGroup:
    """``adjustable`` is ``not fixes`` and ``reason`` the first fix's (``with_fixes`` keeps them so)."""

    id: str
    channels: int
    members: tuple[Member, ...]
    adjustable: bool
    reason: str | None = None
    fixes: tuple[Fix, ...] = ()

    def with_fixes(self, fixes: Iterable[Fix]) -> ChannelGroup:
        fixes = tuple(fixes)
        return replace(self, fixes=fixes, adjustable=not fixes, reason=fixes[0].reason if fixes else None)

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "producer")

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role in ("consumer", "depthwise"))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "channels": self.channels,
            "adjustable": self.adjustable,
            "reason": self.reason,
            "producers": sorted({m.node for m in self.producers}),
            "consumers": sorted({m.node for m in self.consumers}),
            "members": [m.to_json() for m in self.members],
        }


@dataclass(frozen=True)
class Tensor:
    """A value in the graph.  ``segments`` are the channel groups along ``channel_axis``
    (one entry per concatenated part); ``const`` marks initializers."""

    name: str
    shape: tuple[int, ...]
    elem_bytes: int = 4
    channel_axis: int | None = None
    segments: tuple[str, ...] = ()
    spatial_axes: tuple[int, ...] = ()
    const: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_bytes


@dataclass(frozen=True)
class Node:
    """An ONNX node in execution (topological) order, with the layer it forms if any.

    ``spatial`` holds what recomputing output H×W needs for ops that change it
    (kernel, stride, pads, dilation, ceil, or resize scales), and a Gemm's ``transB`` (its
    weight layout, which the shape of a square weight cannot tell)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer: str | None = None
    spatial: tuple[tuple[str, object], ...] = ()

    def attr(self, key: str, default=None):
        for k, v in self.spatial:
            if k == key:
                return v
        return default


def macs_text(n: float) -> str:
    """A MAC count for people: '300.8 M', or '40.70 G' from a billion on."""
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


#: ops that multiply-accumulate; a node of these that is not a layer is "other compute"
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})


@dataclass(frozen=True)
class Compute:
    """A node that multiply-accumulates but is not a layer archpass rewrites or the cost
    model times as one: a 3-D convolution (``what`` "3-D Conv"; 1-D and 2-D ones are
    layers), a ConvTranspose, a MatMul of two activations (attention), a conv or matmul whose
    weights are computed.  Its MACs and weights come from its tensors' shapes."""

    node: str
    what: str
    macs: int
    params: int


def node_compute(s: "Structure", n: Node) -> Compute | None:
    """The :class:`Compute` of ``n`` (a COMPUTE_OPS node), None where a shape is unknown."""
    def shape(name: str) -> tuple[int, ...] | None:
        t = s.tensors.get(name) if name else None
        return t.shape if t is not None and t.shape and all(isinstance(d, int) and d > 0 for d in t.shape) else None

    ins = [shape(i) for i in n.inputs]
    out = shape(n.outputs[0]) if n.outputs else None
    if len(ins) < 2 or ins[0] is None or ins[1] is None or out is None:
        return None
    x, w = ins[0], ins[1]
    what = n.op
    if n.op == "Einsum":  # one multiply-add per combination of every index (two or more operands)
        terms = str(n.attr("equation", "")).replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        if len(terms) != len(ins) or "..." in "".join(terms) or any(
                t is None or len(term) != len(t) for term, t in zip(terms, ins)):
            return None
        for term, t in zip(terms, ins):
            sizes.update(zip(term, t))
        macs = math.prod(sizes.values())
    elif n.op == "Conv":
        macs = math.prod(out) * math.prod(w[1:])
        what = f"{len(w) - 2}-D Conv" if len(w) != 4 else "Conv"
    elif n.op == "ConvTranspose":
        macs = math.prod(x) * math.prod(w[1:])
    elif n.op == "MatMul":
        macs = math.prod(out) * x[-1]  # the contracted axis (numpy's matmul rules)
    else:  # Gemm: K from B, whose layout transB records
        macs = math.prod(out) * (w[1] if n.attr("transB", 0) else w[0])
    params = sum(math.prod(s.tensors[i].shape) if s.tensors[i].shape else 1
                 for i in n.inputs[1:] if i and i in s.tensors and s.tensors[i].const)
    return Compute(n.name, what, int(macs), int(params))


@dataclass(frozen=True)
class Stage:
    id: str
    index: int
    blocks: tuple[str, ...]
    hw: HW

    def to_json(self) -> dict:
        return {"id": self.id, "index": self.index, "blocks": list(self.blocks), "hw": list(self.hw)}


@dataclass(frozen=True)
class Structure:
    """Everything the passes and the cost model know about a model, without weights."""

    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    layers: tuple[Layer, ...]
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    groups: tuple[ChannelGroup, ...]
    nodes: tuple[Node, ...]
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    unsupported: tuple[str, ...] = ()  # op types seen that no pass can rewrite through
    notes: tuple[str, ...] = ()
    #: the data-dependent nodes ("name (Op)") whose post-processing loading set aside
    #: (archpass.tail): the network analyzed ends where it begins
    post_processing: tuple[str, ...] = ()

    # ---------------------------------------------------------------- lookup
    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        object.__setattr__(self, "_layer_idx", {l.id: l for l in self.layers})
        object.__setattr__(self, "_block_idx", {b.id: b for b in self.blocks})
        object.__setattr__(self, "_group_idx", {g.id: g for g in self.groups})

    def layer(self, layer_id: str) -> Layer:
        return self._layer_idx[layer_id]  # type: ignore[attr-defined]

    def block(self, block_id: str) -> Block:
        return self._block_idx[block_id]  # type: ignore[attr-defined]

    def group(self, group_id: str) -> ChannelGroup:
        return self._group_idx[group_id]  # type: ignore[attr-defined]

    def has_layer(self, layer_id: str) -> bool:
        return layer_id in self._layer_idx  # type: ignore[attr-defined]

    def has_block(self, block_id: str) -> bool:
        return block_id in self._block_idx  # type: ignore[attr-defined]

    def has_group(self, group_id: str) -> bool:
        return group_id in self._group_idx  # type: ignore[attr-defined]

    def producer_of(self, tensor: str) -> Node | None:
        return self._edges()[0].get(tensor)

    def consumers_of(self, tensor: str) -> list[Node]:
        return list(self._edges()[1].get(tensor, ()))

    def _edges(self) -> tuple[dict[str, Node], dict[str, tuple[Node, ...]]]:
        """Producer and consumers of every tensor, indexed on first use (a search asks a
        structure for them once per pass check; the structure never changes)."""
        idx = self.__dict__.get("_edge_idx")
        if idx is None:
            prod: dict[str, Node] = {}
            cons: dict[str, list[Node]] = {}
            for n in self.nodes:
                for o in n.outputs:
                    prod.setdefault(o, n)
                for i in n.inputs:
                    users = cons.setdefault(i, [])
                    if not users or users[-1] is not n:
                        users.append(n)
            idx = (prod, {t: tuple(v) for t, v in cons.items()})
            object.__setattr__(self, "_edge_idx", idx)
        return idx

    @property
    def input_hw_axes(self) -> tuple[int, int] | None:
        """The axes of the image input (the first 4-D input) that hold its height and width:
        (2, 3) for NCHW; an NHWC input that a Transpose turns into NCHW for the network (as
        TensorFlow/Keras exports write it) has them where that Transpose takes them from,
        (1, 2), as the analysis records them on the input tensor."""
        for name, shape in self.inputs:
            if len(shape) == 4:
                t = self.tensors.get(name)
                axes = t.spatial_axes if t is not None else ()
                return (axes[0], axes[1]) if len(axes) == 2 else (2, 3)
        return None

    @property
    def input_hw(self) -> HW | None:
        axes = self.input_hw_axes
        if axes is None:
            return None
        shape = next(shape for _, shape in self.inputs if len(shape) == 4)
        return (shape[axes[0]], shape[axes[1]])

    # ---------------------------------------------------------------- totals
    @property
    def other_compute(self) -> tuple["Compute", ...]:
        """The nodes that multiply-accumulate but are not layers (see :class:`Compute`),
        in execution order; computed once per structure."""
        got = self.__dict__.get("_other_compute")
        if got is None:
            got = tuple(c for n in self.nodes if n.layer is None and n.op in COMPUTE_OPS
                        for c in (node_compute(self, n),) if c is not None)
            object.__setattr__(self, "_other_compute", got)
        return got

    @property
    def other_macs(self) -> int:
        return sum(c.macs for c in self.other_compute)

    @property
    def macs(self) -> int:
        """Every multiply-accumulate of the model: its layers' and its other compute's."""
        return sum(l.macs for l in self.layers) + self.other_macs

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers) + sum(c.params for c in self.other_compute)

    def totals(self) -> dict:
        return {
            "layers": len(self.layers),
            "blocks": len(self.blocks),
            "stages": len(self.stages),
            "channel_groups": len(self.groups),
            "adjustable_groups": sum(1 for g in self.groups if g.adjustable),
            "macs": self.macs,
            "other_macs": self.other_macs,
            "params": self.params,
            "nodes": len(self.nodes),
        }

    def to_json(self) -> dict:
        return {
            "inputs": [{"name": n, "shape": list(s)} for n, s in self.inputs],
            "outputs": [{"name": n, "shape": list(s)} for n, s in self.outputs],
            "layers": [l.to_json() for l in self.layers],
            "blocks": [b.to_json() for b in self.blocks],
            "stages": [s.to_json() for s in self.stages],
            "channel_groups": [g.to_json() for g in self.groups],
            "unsupported_ops": list(self.unsupported),
            "notes": list(self.notes),
            "totals": self.totals(),
        }


def index_by_id(items: Iterable) -> dict:
    return {i.id: i for i in items}
