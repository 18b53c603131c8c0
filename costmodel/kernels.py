"""Kernel decomposition: which parts of a model run as one kernel on a target.

A :class:`Kernel` is what a latency predictor scores: a conv/gemm layer together with the
ops the target fuses into it (bias, activation, a residual Add and the activation after
it), or one standalone op (pooling, elementwise, concat, resize...).  The decomposition
works on a :class:`~archpass.structure.Structure` alone (shapes, no weights, no ONNX),
so the search can score thousands of candidates.

What counts as a kernel follows the target's measurement source:

* ``layers_only`` targets (ZigZag) evaluate Conv, Gemm and MatMul nodes only; every other
  op is a zero-cost dummy node in ZigZag's ONNX parser, so it is not a kernel here either.
* runtime targets (onnxruntime) run every op; conv + activation and conv + residual Add
  + activation are fused as the target's :class:`FusionRules` say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from archpass.structure import Layer, Node, Structure

# Standalone-op kinds.  Layer kinds are "conv", "dwconv" and "gemm".
LAYER_KINDS = ("conv", "dwconv", "gemm")
#: Name of the predictor fitted on every standalone op, used for op kinds never measured.
GENERIC_OP = "op"
OP_KINDS = {
    "Add": "eltwise",
    "Sub": "eltwise",
    "Mul": "eltwise",
    "Div": "eltwise",
    "Relu": "act",
    "Clip": "act",
    "Sigmoid": "act",
    "HardSigmoid": "act",
    "HardSwish": "act",
    "Tanh": "act",
    "LeakyRelu": "act",
    "Gelu": "act",
    "Erf": "act",
    "Pow": "act",
    "Sqrt": "act",
    "MaxPool": "pool",
    "AveragePool": "pool",
    "GlobalAveragePool": "gpool",
    "GlobalMaxPool": "gpool",
    "ReduceMean": "gpool",
    "Concat": "concat",
    "Split": "concat",
    "Slice": "concat",
    "Resize": "resize",
    "Upsample": "resize",
    "Reshape": "shape",
    "Flatten": "shape",
    "Squeeze": "shape",
    "Unsqueeze": "shape",
    "Identity": "shape",
    "Transpose": "transpose",
    "Softmax": "softmax",
    "LayerNormalization": "norm",
    "BatchNormalization": "norm",
    "InstanceNormalization": "norm",
}
ACTIVATIONS = ("relu", "relu6", "hardswish", "sigmoid", "swish", "hardsigmoid", "gelu", "clip")
#: onnxruntime's NCHWc channel block where the layout rules were measured (AVX-512; MLAS
#: uses 8 on other x86-64 CPUs): what a concatenation's inputs and a grouped conv's groups
#: must be multiples of to stay blocked.  A target's own is ``FusionRules.nchwc_block``.
NCHWC_BLOCK = 16


@dataclass(frozen=True)
class FusionRules:
    """Which op chains a target runs as one kernel.

    ``activations``: activations fused into the conv/gemm before them.  ``residual_add``:
    a conv whose output feeds only an Add (the residual) runs the Add in the same kernel,
    followed by one of ``post_add_activations``.  ``layers_only``: only conv/gemm layers
    are kernels (every other op costs nothing at the source).  ``split_slices``: Slices
    that together partition one tensor run as one Split (onnxruntime's
    GatherSliceToSplitFusion; exporters write a channel split as two Slices).
    ``nchwc_block``: onnxruntime's NCHWc channel block on the target's host (the CPU
    provider with every graph optimization runs blocked tensors of that many channels;
    0 for none): where :func:`layout_flags` puts the blocked layout.  It is the host's, read
    by :func:`~archpass.costmodel.host.nchwc_block` when a target is adapted there; targets
    without it in their file were measured where it is :data:`NCHWC_BLOCK`.
    """

    activations: tuple[str, ...] = ACTIVATIONS
    residual_add: bool = False
    post_add_activations: tuple[str, ...] = ("relu", "relu6", "clip")
    layers_only: bool = False
    split_slices: bool = False
    nchwc_block: int = NCHWC_BLOCK

    def to_json(self) -> dict:
        out = {
            "activations": list(self.activations),
            "residual_add": self.residual_add,
            "post_add_activations": list(self.post_add_activations),
            "layers_only": self.layers_only,
            "split_slices": self.split_slices,
        }
        if self.nchwc_block != NCHWC_BLOCK:  # older files (and every target measured where it is) lack the key
            out["nchwc_block"] = self.nchwc_block
        return out

    @classmethod
    def from_json(cls, d: dict) -> "FusionRules":
        unknown = set(d) - {"activations", "residual_add", "post_add_activations", "layers_only", "split_slices",
                            "nchwc_block"}
        if unknown:
            raise ValueError(f"unknown fusion rule keys {sorted(unknown)}")
        return cls(
            activations=tuple(d.get("activations", ACTIVATIONS)),
            residual_add=bool(d.get("residual_add", False)),
            post_add_activations=tuple(d.get("post_add_activations", ("relu", "relu6", "clip"))),
            layers_only=bool(d.get("layers_only", False)),
            split_slices=bool(d.get("split_slices", False)),
            nchwc_block=int(d.get("nchwc_block", NCHWC_BLOCK)),
        )


#: a kernel's blocked-layout flags (:func:`layout_flags`); in its spec only when set
LAYOUT_FLAGS = ("blocked", "in_reorder", "out_reorder")


@dataclass(frozen=True)
class Kernel:
    """One unit of work on the target, with the geometry its predictor needs.

    ``nodes`` are the ONNX node names it covers (for attributing measured per-node times),
    ``layers`` the layer ids.  For layer kernels the geometry is the layer's; for
    standalone ops ``cin``/``cout`` are the channels of the (first) input and output,
    ``in_elems``/``out_elems`` the element counts of all inputs / outputs.

    ``in_from_op`` / ``out_to_op`` say whether the kernel sits at a boundary of a run of
    convolutions: an input made by something else than a conv kernel (a standalone op or
    the model input), an output read by something else (or a model output).

    ``blocked`` / ``in_reorder`` / ``out_reorder`` say where onnxruntime's blocked NCHWc
    layout (a CPU with every graph optimization) would put the kernel and its layout
    conversions (:func:`layout_flags`): whether the kernel runs on blocked tensors, and
    whether a conversion into the layout before it or out of it after it is timed with it.
    Many edges the ``in_from_op`` / ``out_to_op`` flags mark convert nothing (pooling,
    activations, residual adds, aligned concatenations stay blocked), and some they miss
    do (a conv whose channels the layout cannot take feeding one it can).
    """

    id: str
    kind: str
    op: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...] = ()
    cin: int = 0
    cout: int = 0
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    act: str | None = None
    fused_add: bool = False
    post_act: str | None = None
    in_elems: int = 0
    out_elems: int = 0
    n_inputs: int = 1
    in_from_op: bool = False
    out_to_op: bool = False
    blocked: bool = False
    in_reorder: bool = False
    out_reorder: bool = False

    @property
    def macs(self) -> int:
        if self.kind not in LAYER_KINDS:
            return 0
        return self.cout * self.out_hw[0] * self.out_hw[1] * (self.cin // max(self.groups, 1)) * self.kernel[0] * self.kernel[1]

    @property
    def weight_elems(self) -> int:
        if self.kind not in LAYER_KINDS:
            return 0
        return self.cout * (self.cin // max(self.groups, 1)) * self.kernel[0] * self.kernel[1]

    def to_json(self) -> dict:
        d = {
            "id": self.id,
            "kind": self.kind,
            "op": self.op,
            "layers": list(self.layers),
            "nodes": list(self.nodes),
        }
        if self.kind in LAYER_KINDS:
            d.update(
                cin=self.cin,
                cout=self.cout,
                kernel=list(self.kernel),
                stride=list(self.stride),
                groups=self.groups,
                in_hw=list(self.in_hw),
                out_hw=list(self.out_hw),
                act=self.act,
                fused_add=self.fused_add,
                post_act=self.post_act,
                macs=self.macs,
            )
        else:
            d.update(cin=self.cin, cout=self.cout, in_hw=list(self.in_hw), out_hw=list(self.out_hw),
                     in_elems=self.in_elems, out_elems=self.out_elems, n_inputs=self.n_inputs)
        d.update(in_from_op=self.in_from_op, out_to_op=self.out_to_op)
        # blocked-layout flags only when set: the keys of points measured before them stay
        d.update({f: True for f in LAYOUT_FLAGS if getattr(self, f)})
        return d

    def spec(self) -> dict:
        """Geometry only (no names): the key of a measured point."""
        d = self.to_json()
        for k in ("id", "layers", "nodes", "macs"):
            d.pop(k, None)
        return d

    @classmethod
    def from_spec(cls, d: dict, id: str = "k", nodes: tuple[str, ...] = ()) -> "Kernel":
        kw = dict(d)
        for k in ("kernel", "stride", "in_hw", "out_hw"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("id", "layers", "nodes", "macs"):
            kw.pop(k, None)
        return cls(id=id, nodes=nodes, **kw)


def layer_kind(layer: Layer) -> str:
    if layer.op == "Conv":
        return "dwconv" if layer.depthwise else "conv"
    return "gemm"


def _act_nodes(structure: Structure, layer: Layer, producer: dict[str, Node], order: dict[str, int]) -> list[Node]:
    """The nodes between a layer's output and its act_output (the recognized activation)."""
    if not layer.act_output or layer.act_output == layer.output:
        return []
    found: dict[str, Node] = {}
    stack = [layer.act_output]
    while stack:
        t = stack.pop()
        if t == layer.output:
            continue
        # the recognized activations compute from the layer's output and constants alone, so every
        # tensor met here has an activation node as its producer
        n = producer[t]
        found[n.name] = n
        stack.extend(i for i in n.inputs if not _is_const(structure, i))
    return sorted(found.values(), key=lambda n: order[n.name])


def _is_const(structure: Structure, tensor: str) -> bool:
    t = structure.tensors.get(tensor)
    return t is None or t.const


def _shape(structure: Structure, tensor: str) -> tuple[int, ...]:
    t = structure.tensors.get(tensor)
    return tuple(t.shape) if t is not None else ()


def _act_of(n: Node) -> str | None:
    return {"Relu": "relu", "Clip": "clip", "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid",
            "HardSwish": "hardswish", "Gelu": "gelu"}.get(n.op)


def _chw(shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    if len(shape) == 4:
        return shape[1], (shape[2], shape[3])
    if len(shape) == 3:
        return shape[1], (shape[2], 1)
    if len(shape) == 2:
        return shape[1], (1, 1)
    if len(shape) == 1:
        return shape[0], (1, 1)
    return 1, (1, 1)


def decompose(structure: Structure, rules: FusionRules) -> list[Kernel]:
    """Split a model into the kernels the target runs, in execution order."""
    producer: dict[str, Node] = {}
    consumers: dict[str, list[Node]] = {}
    for n in structure.nodes:
        for o in n.outputs:
            producer[o] = n
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    outputs = {name for name, _ in structure.outputs}
    order = {n.name: i for i, n in enumerate(structure.nodes)}

    claimed: set[str] = set()
    layer_kernels: dict[str, Kernel] = {}
    for layer in structure.layers:
        names = [layer.id]  # a layer is named after its node
        act = layer.activation
        act_nodes = _act_nodes(structure, layer, producer, order)
        if act is not None and act not in rules.activations:
            act = None
            act_nodes = []
        names += [n.name for n in act_nodes]
        end = layer.act_output if act is not None and layer.act_output else layer.output
        fused_add, post_act = False, None
        if rules.residual_add and not rules.layers_only and act is None and end and end not in outputs:
            cons = consumers.get(end, [])
            if len(cons) == 1 and cons[0].op == "Add" and len(cons[0].inputs) == 2:
                add = cons[0]
                other = add.inputs[1] if add.inputs[0] == end else add.inputs[0]
                other_prod = producer.get(other)
                same_shape = _shape(structure, other) == _shape(structure, end)
                # the add runs with the conv that finishes last
                end_prod = producer.get(end)
                finishes_last = other_prod is None or (
                    end_prod is not None and order[other_prod.name] < order[end_prod.name]
                )
                if same_shape and not _is_const(structure, other) and finishes_last:
                    fused_add = True
                    names.append(add.name)
                    nxt = consumers.get(add.outputs[0], [])
                    if add.outputs[0] not in outputs and len(nxt) == 1:
                        pa = _act_of(nxt[0])
                        if pa == "clip":
                            pa = "relu6"
                        if pa in rules.post_add_activations:
                            post_act = pa
                            names.append(nxt[0].name)
        claimed.update(names)
        layer_kernels[names[0]] = Kernel(
            id=layer.id,
            kind=layer_kind(layer),
            op=layer.op,
            nodes=tuple(names),
            layers=(layer.id,),
            cin=layer.cin,
            cout=layer.cout,
            kernel=tuple(layer.kernel),
            stride=tuple(layer.stride),
            groups=layer.groups,
            in_hw=tuple(layer.in_hw),
            out_hw=tuple(layer.out_hw),
            act=act,
            fused_add=fused_add,
            post_act=post_act,
        )

    slice_partition = _slice_partitions(structure, consumers) if rules.split_slices else {}
    kernels: list[Kernel] = []
    for n in structure.nodes:
        if n.name in layer_kernels:
            kernels.append(layer_kernels[n.name])
            continue
        if n.name in claimed or rules.layers_only or n.layer is not None:
            continue
        ins = [i for i in n.inputs if i and not _is_const(structure, i)]
        in_shapes = [_shape(structure, i) for i in ins]
        out_shapes = [_shape(structure, o) for o in n.outputs if o]
        names = (n.name,)
        if rules.split_slices and n.op == "Slice" and ins:
            split = slice_partition.get(n.name)
            if split is None:
                continue  # a later sibling carries the split
            names, out_shapes = split
            if len(names) > 1:
                n = replace(n, op="Split")
        # an op on constants alone (left unfolded) counts as a 0-d input: 1 channel, 1x1
        cin, in_hw = _chw(in_shapes[0] if in_shapes else ())
        cout, out_hw = _chw(out_shapes[0])  # every node has an output
        kind = OP_KINDS.get(n.op, "other")
        k = n.attr("kernel") or n.attr("kernel_shape") or (1, 1)
        s = n.attr("stride") or n.attr("strides") or (1, 1)
        kernels.append(
            Kernel(
                id=n.name,
                kind=kind,
                op=n.op,
                nodes=names,
                cin=int(cin),
                cout=int(cout),
                kernel=tuple(int(x) for x in k)[:2] if isinstance(k, (tuple, list)) else (int(k), int(k)),
                stride=tuple(int(x) for x in s)[:2] if isinstance(s, (tuple, list)) else (int(s), int(s)),
                in_hw=tuple(int(x) for x in in_hw),
                out_hw=tuple(int(x) for x in out_hw),
                in_elems=int(sum(math.prod(s_) if s_ else 1 for s_ in in_shapes)),
                out_elems=int(sum(math.prod(s_) if s_ else 1 for s_ in out_shapes)),
                n_inputs=len(ins),
            )
        )
    # layers without a node in Structure.nodes (should not happen) still count
    seen = {k.id for k in kernels}
    kernels.extend(k for k in layer_kernels.values() if k.id not in seen)
    names, flags = ("in_from_op", "out_to_op"), _edge_flags(structure, kernels, producer, outputs)
    if not rules.layers_only and rules.nchwc_block > 0:  # the blocked layout is a runtime's (layers-only targets count layers)
        names, flags = names + LAYOUT_FLAGS, flags + layout_flags(structure, kernels, producer, outputs,
                                                                  rules.nchwc_block)
    for i, k in enumerate(kernels):
        for f, v in zip(names, flags):
            if v[i]:
                # the kernels were made above and are not shared yet: set in place (a copy per
                # kernel, dataclasses.replace, took a fifth of a cpu estimate's time)
                object.__setattr__(k, f, True)
    return kernels


CONV_KINDS = ("conv", "dwconv")


def _slice_partitions(structure: Structure, consumers: dict[str, list[Node]]) -> dict[str, tuple]:
    """Sibling Slices that partition one tensor (their outputs add up to it), keyed by the
    last of them in execution order: (their node names, their output shapes).  A Slice
    without such siblings maps to itself."""
    out: dict[str, tuple] = {}
    seen: set[str] = set()
    for n in structure.nodes:
        if n.op != "Slice" or n.name in seen or not n.inputs:
            continue
        src = n.inputs[0]
        sibs = [c for c in consumers.get(src, []) if c.op == "Slice" and c.inputs and c.inputs[0] == src]
        total = math.prod(_shape(structure, src))
        parts = sum(math.prod(_shape(structure, c.outputs[0])) for c in sibs)
        if len(sibs) < 2 or parts != total:
            sibs = [n]
        seen.update(c.name for c in sibs)
        last = sibs[-1]
        out[last.name] = (tuple(c.name for c in sibs), [_shape(structure, c.outputs[0]) for c in sibs])
    return out


def _edge_flags(structure: Structure, kernels: list[Kernel], producer: dict[str, Node],
                outputs: set[str]) -> tuple[list[bool], list[bool]]:
    """``in_from_op`` / ``out_to_op`` of every kernel from its neighbours' kinds (one pass
    over the graph's edges, from the consumer side)."""
    owner = {n: i for i, k in enumerate(kernels) for n in k.nodes}
    conv = [k.kind in CONV_KINDS for k in kernels]
    from_op = [False] * len(kernels)
    to_op = [False] * len(kernels)
    tensors = structure.tensors
    for n in structure.nodes:
        me = owner.get(n.name)
        for i in n.inputs:
            t = tensors.get(i)
            if t is None or t.const:
                continue
            src = producer.get(i)
            them = owner.get(src.name) if src is not None else None
            if them is not None and them == me:
                continue  # an edge inside one kernel
            if me is not None and (them is None or not conv[them]):
                from_op[me] = True
            if them is not None and (me is None or not conv[me]):
                to_op[them] = True
    for o in outputs:
        src = producer.get(o)
        if src is not None and owner.get(src.name) is not None:
            to_op[owner[src.name]] = True
    return from_op, to_op


# ---------------------------------------------------------------- blocked layout
#: ops that run on blocked tensors as they are (onnxruntime 1.32, measured here): pooling,
#: and unary activations (fused into the conv or run elementwise on the blocked tensor)
LAYOUT_FREE_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "Clip",
                             "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Identity", "Dropout"})
ELEMENTWISE_OPS = frozenset({"Add", "Sum", "Mul", "Sub", "Div"})


def blocked_conv(k: Kernel, block: int = NCHWC_BLOCK) -> bool:
    """Whether onnxruntime runs a conv kernel in its NCHWc layout of ``block`` channels
    (measured on onnxruntime 1.32: a dense conv with a multiple of 4 input channels or
    fewer than a block, a depthwise conv with a multiple of 4 channels, a grouped conv
    whose groups are whole blocks on both sides; others run as plain convs)."""
    if k.kind not in CONV_KINDS or k.op != "Conv" or block <= 0:
        return False
    g = max(k.groups, 1)
    if g == 1:
        return k.cin < block or k.cin % 4 == 0
    if k.kind == "dwconv" or (g == k.cin and k.cout == k.cin):
        return k.cin % 4 == 0 and k.cout == k.cin
    return (k.cin // g) % block == 0 and (k.cout // g) % block == 0


def layout_flags(structure: Structure, kernels: list[Kernel], producer: dict[str, Node],
                 outputs: set[str], block: int = NCHWC_BLOCK) -> tuple[list[bool], list[bool], list[bool]]:
    """``blocked`` / ``in_reorder`` / ``out_reorder`` of every kernel (see :class:`Kernel`):
    follow onnxruntime's NCHWc rewrite over the graph in execution order (the rules
    measured on onnxruntime 1.32).  A blocked conv (:func:`blocked_conv`) makes a blocked tensor; its
    fused activations and fused elementwise ops over blocked tensors of one shape (a
    residual add) keep it (but an activation after the add other than ReLU).  Standalone
    pooling and unary activations (:data:`LAYOUT_FREE_OPS`), elementwise ops over blocked
    tensors of one shape, and concatenations keep blocked tensors blocked when their
    channels are whole blocks of ``block``; anything else, and a dense conv with
    fewer input channels than a block, reads plain tensors.  A blocked tensor read as
    plain (or a model output) is converted once, timed with the kernel that made it; a
    blocked conv reading a plain tensor converts it first, timed with the first conv
    that reads it."""
    owner = {n: i for i, k in enumerate(kernels) for n in k.nodes}
    conv_at = {k.nodes[0]: i for i, k in enumerate(kernels) if k.kind in CONV_KINDS}
    blocked_k = [blocked_conv(k, block) for k in kernels]
    blocked_t: dict[str, bool] = {}
    in_re = [False] * len(kernels)
    out_re = [False] * len(kernels)
    converted: set[str] = set()
    into: set[str] = set()

    def plain_read(t: str) -> None:
        if blocked_t.get(t) and t not in converted:
            converted.add(t)
            src = producer.get(t)
            i = owner.get(src.name) if src is not None else None
            if i is not None:
                out_re[i] = True

    def whole(t: str) -> bool:
        shape = _shape(structure, t)
        return bool(blocked_t.get(t)) and len(shape) == 4 and shape[1] % block == 0

    for n in structure.nodes:
        me = owner.get(n.name)
        data = [t for t in n.inputs if t and not _is_const(structure, t)]
        if n.name in conv_at:
            i = conv_at[n.name]
            k = kernels[i]
            src = data[0] if data else None
            direct = max(k.groups, 1) == 1 and k.cin < block  # reads the plain tensor as it is
            if src is not None and (direct or not blocked_k[i]):
                plain_read(src)
            elif src is not None and not blocked_t.get(src) and src not in into:
                into.add(src)  # one conversion per tensor, timed with its first reader
                in_re[i] = True
            out = blocked_k[i]
        elif me is not None and kernels[me].kind in CONV_KINDS and n.op in LAYOUT_FREE_OPS:
            # an activation fused into the conv (after a fused add only ReLU stays blocked)
            src = producer.get(data[0]) if data else None
            after_add = n.op != "Relu" and src is not None and src.op in ELEMENTWISE_OPS
            out = bool(data) and not after_add and bool(blocked_t.get(data[0]))
        elif n.op in ELEMENTWISE_OPS:
            # over tensors of one shape only (a broadcast, the squeeze-excitation gate, reads
            # plain ones); fused into a conv (a residual add, a swish) on any channel count
            fused = me is not None and kernels[me].kind in CONV_KINDS
            out = (len(data) == len([t for t in n.inputs if t]) and len({_shape(structure, t) for t in data}) == 1
                   and all(blocked_t.get(t) if fused else whole(t) for t in data))
        elif n.op in LAYOUT_FREE_OPS:
            out = bool(data) and whole(data[0])
        elif n.op == "Concat":
            out = bool(data) and len(data) == len(n.inputs) and all(whole(t) for t in data)
        else:
            out = False
        if not out and n.name not in conv_at:
            for t in data:
                plain_read(t)
        for o in n.outputs:
            blocked_t[o] = bool(out)
            if me is not None and out:
                blocked_k[me] = True  # an op kernel is blocked when it makes a blocked tensor
    for o in outputs:
        plain_read(o)
    return blocked_k, in_re, out_re
