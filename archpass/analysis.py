"""Structural analysis: layers, channel groups, blocks and stages of a canonical model.

The channel-group analysis is the dependency-graph problem structural-pruning tools
solve for PyTorch, solved here on ONNX.  Each tensor's channel axis is tracked as a list
of *segments* (several after a Concat), each a slot in a union-find; ops that force two
channel dimensions to agree (residual Add, SE Mul, depthwise conv, BatchNorm,
elementwise ops, Flatten/GlobalPool into Gemm, Transpose/Reshape that keep the axis)
unite their slots.  A slot that reaches something archpass cannot rewrite through (a
graph input or output, a Reshape that merges channels, a grouped conv, an op it does
not know) makes its whole group not adjustable, with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from archpass.activations import attr, find_activation
from archpass.blocks import find_blocks
from archpass.errors import AnalysisError, ArchpassError
from archpass.model import Model
from archpass.record import read_provenance
from archpass.spatial import linear_hw, model_batch
from archpass.structure import ChannelGroup, Fix, Layer, Member, Node, Structure, Tensor

ELEMENTWISE_UNARY = {
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "Erf",
    "Softplus", "Softsign", "Exp", "Log", "Sqrt", "Neg", "Abs", "Identity", "Dropout", "Cast", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Celu", "Mish", "ThresholdedRelu", "Not", "IsNaN", "Sin", "Cos",
}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less", "And", "Or"}
CHANNEL_PRESERVING = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample",
    "Pad", "Softmax", "LogSoftmax", "LRN", "MaxUnpool",
}
NORMS = {"BatchNormalization", "InstanceNormalization"}
#: ops of an already-quantized graph (QDQ pairs around the layers, or quantized kernels)
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                           "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul"})
QUANTIZED_PREFIX = "the model is already quantized"
QUANTIZED_NOTE = (QUANTIZED_PREFIX + " ({ops}): archpass rewrites float layers and leaves quantized "
                  "ones alone, so optimize the float export and quantize the optimized model after")
ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def multiplier_reason(conv: str, multiplier: int) -> str:
    """Why a depthwise conv with a channel multiplier fixes its input and output groups
    (``dw_to_dense`` removes exactly this fix)."""
    return f"Conv '{conv}' is a depthwise convolution with channel multiplier {multiplier}"


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []  # channel count of each slot
        self.fixes: list[list[Fix]] = []  # every reason a slot is fixed, in the order met
        self.members: list[list[Member]] = []

    def new(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(channels)
        self.fixes.append([])
        self.members.append([])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        lo, hi = min(ra, rb), max(ra, rb)  # the older slot is the root: ids follow topological order
        self.parent[hi] = lo
        self.members[lo].extend(self.members[hi])
        self.members[hi] = []
        self.fixes[lo].extend(f for f in self.fixes[hi] if f not in self.fixes[lo])
        self.fixes[hi] = []
        return lo

    def fix(self, a: int, reason: str, source: str) -> None:
        r = self.find(a)
        if Fix(source, reason) not in self.fixes[r]:
            self.fixes[r].append(Fix(source, reason))

    def add(self, a: int, member: Member) -> None:
        self.members[self.find(a)].append(member)


@dataclass
class _TInfo:
    """Mutable per-tensor bookkeeping during analysis."""

    shape: tuple[int, ...]
    axis: int | None = None
    segs: list[int] = field(default_factory=list)
    spatial: tuple[int, ...] = ()


class _Analyzer:
    def __init__(self, proto: onnx.ModelProto, size_links=()):
        self.proto = proto
        self.size_links = dict(size_links)  # Resize output -> what its sizes were computed from (archpass.sizelinks)
        g = proto.graph
        self.g = g
        self.source = ""  # the node (or graph input) being visited: the source of the fixes it makes
        self.inits = {i.name: i for i in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, int] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
                self.dtypes[vi.name] = tt.elem_type
        for i in g.initializer:
            self.shapes[i.name] = tuple(i.dims)
            self.dtypes[i.name] = i.data_type
        inits = {i.name for i in g.initializer}
        self.batch = model_batch([(vi.name, self.shapes.get(vi.name, ())) for vi in g.input if vi.name not in inits])
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
            for o in n.output:
                self.producer[o] = n
        self._const_cache: dict[str, np.ndarray | None] = {}
        self.uf = _UnionFind()
        self.t: dict[str, _TInfo] = {}
        self.unsupported: list[str] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------ helpers
    def const(self, name: str) -> np.ndarray | None:
        if name in self._const_cache:
            return self._const_cache[name]
        val = None
        if name in self.inits:
            val = numpy_helper.to_array(self.inits[name])
        elif name in self.const_nodes:
            n = self.const_nodes[name]
            for a in n.attribute:
                if a.name == "value":
                    val = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    val = np.array(onnx.helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    val = np.array(onnx.helper.get_attribute_value(a))
        self._const_cache[name] = val
        return val

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        v = self.const(name)
        return tuple(v.shape) if v is not None else ()

    def info(self, name: str) -> _TInfo:
        if name not in self.t:
            self.t[name] = _TInfo(self.shape(name))
        return self.t[name]

    def fix_tensor(self, name: str, reason: str) -> None:
        ti = self.t.get(name)
        if ti is None:
            return
        for s in ti.segs:
            self.uf.fix(s, reason, self.source)

    def _nhwc_axes(self, name: str, shp) -> tuple[int, int, int] | None:
        """(channel, height, width) axes of an image input that one Transpose makes NCHW
        (TensorFlow/Keras exports feed NHWC: (3, 1, 2)), where that Transpose takes them
        from; None for an input read as it is."""
        users = self.consumers.get(name, [])
        if len(shp) != 4 or len(users) != 1 or users[0].op_type != "Transpose":
            return None
        perm = [int(p) for p in attr(users[0], "perm", [])]
        if perm != [0, 3, 1, 2]:  # NHWC -> NCHW only: another permutation says nothing of the layout
            return None
        return 3, 1, 2

    def fresh(self, name: str, axis: int | None, reason: str | None = None, member: Member | None = None) -> None:
        shp = self.shape(name)
        ti = _TInfo(shp)
        if axis is not None and len(shp) > axis >= 0:
            s = self.uf.new(shp[axis])
            if reason:
                self.uf.fix(s, reason, self.source)
            if member:
                self.uf.add(s, member)
            ti.axis, ti.segs = axis, [s]
            ti.spatial = tuple(i for i in range(2, len(shp))) if axis == 1 and len(shp) >= 3 else ()
        self.t[name] = ti

    def same_layout(self, dst: str, src: str, axis_shift: int = 0) -> None:
        s = self.info(src)
        shp = self.shape(dst)
        if s.axis is None:
            self.t[dst] = _TInfo(shp)
            return
        ax = s.axis + axis_shift
        if not (0 <= ax < len(shp)) or shp[ax] != sum(self.uf.size[x] for x in s.segs):
            # channel axis did not survive as we expected: stop tracking, channels are fixed
            for seg in s.segs:
                self.uf.fix(seg, f"shape of '{dst}' does not keep the channel axis", self.source)
            self.fresh(dst, None)
            return
        self.t[dst] = _TInfo(shp, ax, list(s.segs), tuple(a + axis_shift for a in s.spatial))

    def unite_layouts(self, a: list[int], b: list[int], where: str) -> bool:
        if len(a) == len(b) and all(self.uf.size[x] == self.uf.size[y] for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.uf.union(x, y)
            return True
        for x in a + b:
            self.uf.fix(x, f"{where} joins tensors whose channels are concatenated differently", self.source)
        return False

    # ------------------------------------------------------------ main walk
    def run(self) -> Structure:
        g = self.g
        init_names = set(self.inits)
        graph_inputs = [i for i in g.input if i.name not in init_names]
        for vi in graph_inputs:
            shp = self.shape(vi.name)
            nhwc = self._nhwc_axes(vi.name, shp)
            axis = nhwc[0] if nhwc else 1 if len(shp) >= 2 else None
            self.source = vi.name
            self.fresh(vi.name, axis, reason=f"carries the model input '{vi.name}'",
                       member=Member(vi.name, "input", "input"))
            if nhwc:
                self.t[vi.name].spatial = nhwc[1:]
        self.layers: dict[str, Layer] = {}
        self.layer_order: list[str] = []
        self.act_of: dict[str, object] = {}
        nodes: list[Node] = []
        for n in g.node:
            if n.op_type == "Constant":
                continue
            with _unexpected(f"node '{n.name}' ({n.op_type})"):
                self.source = n.name
                self.visit(n)
                nodes.append(self.node_record(n))
        for vi in g.output:
            ti = self.t.get(vi.name)
            if ti and ti.segs:
                for s in ti.segs:
                    self.uf.add(s, Member(vi.name, "output", "output"))
                    self.uf.fix(s, f"feeds model output '{vi.name}'", vi.name)
        # ---- groups, numbered by their oldest slot (topological order)
        roots = sorted({self.uf.find(s) for s in range(len(self.uf.parent))})
        gid = {r: f"group{i}" for i, r in enumerate(roots)}

        def gname(slot: int) -> str:
            return gid[self.uf.find(slot)]

        groups = []
        for r in roots:
            groups.append(ChannelGroup(gid[r], self.uf.size[r], tuple(self.uf.members[r]), True).with_fixes(self.uf.fixes[r]))
        tensors: dict[str, Tensor] = {}
        for name, ti in self.t.items():
            tensors[name] = Tensor(
                name, tuple(ti.shape), ELEM_BYTES.get(self.dtypes.get(name, 1), 4), ti.axis,
                tuple(gname(s) for s in ti.segs), ti.spatial, self.is_const(name),
            )
        for i in g.initializer:
            if i.name not in tensors:
                tensors[i.name] = Tensor(i.name, tuple(i.dims), ELEM_BYTES.get(i.data_type, 4), const=True)
        layers = []
        for lid in self.layer_order:
            l = self.layers[lid]
            ti_in = self.t[l.input]
            ti_out = self.t[l.output]
            # the input's groups are the layer's input channels only where they add up to them:
            # a MatMul that contracts another axis than its input's channel axis (MaxViT's and
            # Swin's attention output projections read (windows, tokens, C) from a reshape whose
            # channel axis is the windows') keeps its input channels whatever that group becomes
            in_groups = tuple(gname(s) for s in ti_in.segs)
            if in_groups and sum(self.uf.size[self.uf.find(s)] for s in ti_in.segs) != l.cin:
                in_groups = ()
            layers.append(Layer(**{**l.__dict__,
                                   "in_groups": in_groups,
                                   "out_group": gname(ti_out.segs[0]) if ti_out.segs else ""}))
        blocks, stages = find_blocks(layers, g.node, self.consumers)
        inputs = tuple((vi.name, self.shape(vi.name)) for vi in graph_inputs)
        outputs = tuple((vi.name, self.shape(vi.name)) for vi in g.output)
        quantized = sorted({n.op_type for n in g.node} & QUANTIZED_OPS)
        if quantized:
            self.notes.append(QUANTIZED_NOTE.format(ops=", ".join(quantized)))
        return Structure(
            inputs=inputs, outputs=outputs, layers=tuple(layers), blocks=tuple(blocks), stages=tuple(stages),
            groups=tuple(groups), nodes=tuple(nodes), tensors=tensors,
            unsupported=tuple(sorted(set(self.unsupported))), notes=tuple(self.notes),
        )

    def node_record(self, n: onnx.NodeProto) -> Node:
        spatial: list[tuple[str, object]] = []
        if n.op_type in ("Conv", "MaxPool", "AveragePool", "LpPool", "ConvTranspose"):
            w = self.shape(n.input[1]) if n.op_type in ("Conv", "ConvTranspose") else None
            k = tuple(attr(n, "kernel_shape", w[2:] if w else ()))
            nd = len(k)
            spatial += [
                ("kernel", k),
                ("strides", tuple(attr(n, "strides", [1] * nd))),
                ("pads", tuple(attr(n, "pads", [0] * (2 * nd)))),
                ("dilations", tuple(attr(n, "dilations", [1] * nd))),
                ("ceil_mode", int(attr(n, "ceil_mode", 0))),
                ("auto_pad", attr(n, "auto_pad", b"NOTSET").decode() if isinstance(attr(n, "auto_pad", b""), bytes) else "NOTSET"),
            ]
        elif n.op_type in ("Resize", "Upsample"):
            scales = self.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            sizes = self.const(n.input[3]) if len(n.input) > 3 and n.input[3] else None
            if n.op_type == "Upsample" and len(n.input) > 1:
                scales = self.const(n.input[1])
            if scales is not None and scales.size:
                spatial.append(("scales", tuple(float(s) for s in scales)))
            if sizes is not None and sizes.size:
                spatial.append(("sizes", tuple(int(s) for s in sizes)))
                if n.output and n.output[0] in self.size_links:  # computed from other tensors' dims in the source
                    spatial.append(("sizes_from", self.size_links[n.output[0]]))
        elif n.op_type == "Gemm":  # the weight layout, which a square weight's shape cannot tell (resize's shape path)
            spatial.append(("transB", int(attr(n, "transB", 0))))
        elif n.op_type == "Einsum":  # what its MACs need (structure.node_compute)
            spatial.append(("equation", attr(n, "equation", b"").decode() if isinstance(attr(n, "equation", b""), bytes)
                            else str(attr(n, "equation", ""))))
        elif n.op_type == "Transpose":
            spatial.append(("perm", tuple(int(p) for p in attr(n, "perm", list(range(len(self.shape(n.input[0]))))[::-1]))))
        elif n.op_type in ("Flatten", "Concat"):
            spatial.append(("axis", int(attr(n, "axis", 1))))
        elif n.op_type in ("Squeeze", "Unsqueeze") or n.op_type.startswith("Reduce"):
            # what archpass.spatial needs to recompute shapes at another input resolution
            rank = len(self.shape(n.output[0] if n.op_type == "Unsqueeze" else n.input[0]))
            axes = self._axes(n, rank) if rank else None
            spatial.append(("axes", None if axes is None else tuple(axes)))
            spatial.append(("keepdims", int(attr(n, "keepdims", 1))))
            spatial.append(("noop_with_empty_axes", int(attr(n, "noop_with_empty_axes", 0))))
        layer = n.name if n.name in self.layers else None
        return Node(n.name, n.op_type, tuple(n.input), tuple(n.output), layer, tuple(spatial))

    def visit(self, n: onnx.NodeProto) -> None:
        op = n.op_type
        ins = [i for i in n.input]
        out = n.output[0] if n.output else None
        if op == "Conv" and self.is_const(ins[1]):
            self.visit_conv(n)
        elif op == "Gemm" and self.is_const(ins[1]):
            self.visit_gemm(n)
        elif op == "MatMul" and self.is_const(ins[1]) and len(self.shape(ins[1])) == 2:
            self.visit_matmul(n)
        elif op in ELEMENTWISE_UNARY or op in NORMS:
            self.same_layout(out, ins[0])
            if op in NORMS:
                for s in self.info(out).segs:
                    self.uf.add(s, Member(n.name, op, "param"))
        elif op in CHANNEL_PRESERVING:
            x = self.info(ins[0])
            if op == "Pad" and x.axis is not None:
                pads = self.const(ins[1]) if len(ins) > 1 and ins[1] else np.array(attr(n, "pads", []))
                r = len(x.shape)
                if pads is not None and pads.size == 2 * r and (pads[x.axis] or pads[x.axis + r]):
                    self.fix_tensor(ins[0], f"Pad node '{n.name}' pads the channel axis")
            if op in ("Softmax", "LogSoftmax") and x.axis is not None:
                ax = attr(n, "axis", -1) % max(len(x.shape), 1)
                if ax == x.axis:
                    for s in x.segs:
                        self.uf.add(s, Member(n.name, op, "elementwise"))
            self.same_layout(out, ins[0])
        elif op in ELEMENTWISE_BINARY:
            self.visit_binary(n)
        elif op == "Concat":
            self.visit_concat(n)
        elif op == "Flatten":
            self.visit_flatten(n)
        elif op == "Reshape":
            self.visit_reshape(n)
        elif op == "Transpose":
            self.visit_transpose(n)
        elif op in ("Squeeze", "Unsqueeze"):
            self.visit_squeeze(n)
        elif op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                    "ReduceLogSumExp", "ReduceSumSquare"):
            self.visit_reduce(n)
        elif op == "LayerNormalization":
            self.visit_layernorm(n)
        elif op in ("Split", "Slice"):
            self.visit_split(n)
        else:
            self.visit_unknown(n)

    def visit_unknown(self, n: onnx.NodeProto, why: str | None = None, label: str | None = None) -> None:
        """``label``: how ``unsupported`` lists the node where its op type alone would
        mislead (a 3-D Conv is not the Conv archpass rewrites)."""
        self.unsupported.append(label or n.op_type)
        custom = n.domain not in ("", "ai.onnx")
        op = f"custom-domain op {n.domain}.{n.op_type}" if custom else n.op_type
        opaque = " (opaque: archpass keeps its declared shapes)" if custom else ""
        for i in n.input:
            if i and i in self.t:
                self.fix_tensor(i, why or f"consumed by {op} node '{n.name}', which archpass cannot rewrite through{opaque}")
        for o in n.output:
            shp = self.shape(o)
            self.fresh(o, 1 if len(shp) >= 2 else None,
                       reason=f"produced by {op} node '{n.name}', which archpass cannot rewrite{opaque}")

    # ------------------------------------------------------------ layers
    def _register_layer(self, n, op, cin, cout, k, s, groups, in_hw, out_hw, pads, dil, bias, x, y, w):
        act = find_activation(y, self.consumers, self.const)
        self.layers[n.name] = Layer(
            id=n.name, op=op, cin=cin, cout=cout, kernel=k, stride=s, groups=groups, in_hw=in_hw, out_hw=out_hw,
            pads=pads, dilation=dil, activation=act.kind if act else None, bias=bias, input=x, output=y,
            act_output=act.output if act else y, weight=w,
        )
        self.layer_order.append(n.name)

    def visit_conv(self, n: onnx.NodeProto) -> None:
        x, w = n.input[0], n.input[1]
        y = n.output[0]
        ws = self.shape(w)
        xs, ys = self.shape(x), self.shape(y)
        one_d = len(ws) == 3 and len(xs) == 3 and len(ys) == 3
        if not one_d and (len(ws) != 4 or len(xs) != 4):
            return self.visit_unknown(n, f"{len(ws) - 2}-D convolution '{n.name}' is not rewritten",
                                      label=f"Conv ({len(ws) - 2}-D)")
        groups = int(attr(n, "group", 1))
        if one_d:  # a 1-D conv is a 2-D one of height 1
            cout, cin_g, kw = ws
            kh = 1
            strides = (1, *attr(n, "strides", [1]))
            dil = (1, *attr(n, "dilations", [1]))
            p = tuple(attr(n, "pads", [0, 0]))
            pads = (0, p[0], 0, p[1])
            in_hw, out_hw = (1, xs[2]), (1, ys[2])
        else:
            cout, cin_g, kh, kw = ws
            strides = tuple(attr(n, "strides", [1, 1]))
            dil = tuple(attr(n, "dilations", [1, 1]))
            pads = tuple(attr(n, "pads", [0, 0, 0, 0]))
            pads = (pads[0], pads[1], pads[2], pads[3])
            in_hw, out_hw = (xs[2], xs[3]), (ys[2], ys[3])
        cin = cin_g * groups
        xi = self.info(x)
        bias = len(n.input) > 2 and bool(n.input[2])
        self._register_layer(n, "Conv", cin, cout, (kh, kw), strides, groups, in_hw, out_hw,
                             pads, dil, bias, x, y, w)
        if xi.axis != 1:
            self.fix_tensor(x, f"Conv '{n.name}' reads a tensor whose channel axis was moved")
            self.fresh(y, 1, reason=f"Conv '{n.name}' reads a tensor whose channel axis was moved",
                       member=Member(n.name, "Conv", "producer"))
            return
        if groups == 1:
            off = 0
            for s in xi.segs:
                self.uf.add(s, Member(n.name, "Conv", "consumer", off))
                off += self.uf.size[s]
            self.fresh(y, 1, member=Member(n.name, "Conv", "producer"))
        elif groups == cin and cout == cin:
            for s in xi.segs:
                self.uf.add(s, Member(n.name, "Conv", "depthwise"))
            self.t[y] = _TInfo(ys, 1, list(xi.segs), (2,) if one_d else (2, 3))
        else:
            why = (f"Conv '{n.name}' is a grouped convolution (groups={groups})" if cout % groups == 0 and groups != cin
                   else multiplier_reason(n.name, cout // max(cin, 1)))
            off = 0
            for s in xi.segs:
                self.uf.add(s, Member(n.name, "Conv", "consumer", off))
                off += self.uf.size[s]
            self.fix_tensor(x, why)
            self.fresh(y, 1, reason=why, member=Member(n.name, "Conv", "producer"))

    def _linear(self, n, cin, cout, x, y, w, bias, in_axis_ok: bool, out_axis: int) -> None:
        in_hw = linear_hw(self.shape(x), self.batch)
        self._register_layer(n, n.op_type, cin, cout, (1, 1), (1, 1), 1, in_hw, in_hw, (0, 0, 0, 0), (1, 1),
                             bias, x, y, w)
        xi = self.info(x)
        if not in_axis_ok:
            self.fix_tensor(x, f"{n.op_type} '{n.name}' contracts an axis that is not the channel axis")
        else:
            off = 0
            for s in xi.segs:
                self.uf.add(s, Member(n.name, n.op_type, "consumer", off))
                off += self.uf.size[s]
        self.fresh(y, out_axis, member=Member(n.name, n.op_type, "producer"))

    def visit_gemm(self, n: onnx.NodeProto) -> None:
        x, w, y = n.input[0], n.input[1], n.output[0]
        ws = self.shape(w)
        tb = int(attr(n, "transB", 0))
        ta = int(attr(n, "transA", 0))
        cout, cin = (ws[0], ws[1]) if tb else (ws[1], ws[0])
        xi = self.info(x)
        ok = ta == 0 and xi.axis == 1 and len(self.shape(x)) == 2
        bias = len(n.input) > 2 and bool(n.input[2])
        self._linear(n, cin, cout, x, y, w, bias, ok, 1)

    def visit_matmul(self, n: onnx.NodeProto) -> None:
        x, w, y = n.input[0], n.input[1], n.output[0]
        cin, cout = self.shape(w)
        xs = self.shape(x)
        xi = self.info(x)
        ok = xi.axis == len(xs) - 1
        self._linear(n, cin, cout, x, y, w, False, ok, len(self.shape(y)) - 1)

    # ------------------------------------------------------------ coupling ops
    def visit_binary(self, n: onnx.NodeProto) -> None:
        out = n.output[0]
        oshape = self.shape(out)
        r = len(oshape)
        full: list[tuple[str, _TInfo, int]] = []  # tensors carrying the channel axis with full size
        consts: list[str] = []
        for i in n.input:
            if not i:
                continue
            shp = self.shape(i)
            shift = r - len(shp)
            if self.is_const(i):
                consts.append(i)
                continue
            ti = self.info(i)
            if ti.axis is not None and shp[ti.axis] > 1:
                full.append((i, ti, shift))
        if not full:
            # nothing carries full channels (a size-1 gate, or constants only): nothing to couple
            self.fresh(out, None)
            return
        base_name, base, shift = full[0]
        ax = base.axis + shift
        for other_name, ti, sh in full[1:]:
            if ti.axis + sh != ax:
                self.fix_tensor(other_name, f"{n.op_type} '{n.name}' broadcasts channels against another axis")
                self.fix_tensor(base_name, f"{n.op_type} '{n.name}' broadcasts channels against another axis")
                continue
            self.unite_layouts(base.segs, ti.segs, f"{n.op_type} '{n.name}'")
        role = "elementwise"
        for s in base.segs:
            self.uf.add(s, Member(n.name, n.op_type, role))
        for c in consts:
            cs = self.shape(c)
            cax = ax - (r - len(cs))
            if 0 <= cax < len(cs) and cs[cax] > 1:
                for s in base.segs:
                    self.uf.add(s, Member(n.name, n.op_type, "param"))
        self.t[out] = _TInfo(oshape, ax, list(base.segs), tuple(a + shift for a in base.spatial))

    def visit_concat(self, n: onnx.NodeProto) -> None:
        out = n.output[0]
        oshape = self.shape(out)
        axis = attr(n, "axis", 0) % max(len(oshape), 1)
        infos = [(i, self.info(i)) for i in n.input if i]
        tracked = [ti for _, ti in infos if ti.axis is not None]
        if len(tracked) != len(infos):
            for i, _ in infos:
                self.fix_tensor(i, f"Concat '{n.name}' joins a tensor without a known channel axis")
            self.fresh(out, 1 if len(oshape) >= 2 else None, reason=f"Concat '{n.name}' has untracked inputs")
            return
        if all(ti.axis == axis for ti in tracked):
            segs: list[int] = []
            off = 0
            for i, ti in infos:
                for s in ti.segs:
                    self.uf.add(s, Member(n.name, "Concat", "concat", off))
                    off += self.uf.size[s]
                segs.extend(ti.segs)
            self.t[out] = _TInfo(oshape, axis, segs, tracked[0].spatial)
            return
        # concatenation along another axis: channels of all inputs must agree
        first = tracked[0]
        for ti in tracked[1:]:
            if ti.axis != first.axis:
                for i, _ in infos:
                    self.fix_tensor(i, f"Concat '{n.name}' joins tensors with different channel axes")
                break
            self.unite_layouts(first.segs, ti.segs, f"Concat '{n.name}'")
        self.t[out] = _TInfo(oshape, first.axis, list(first.segs), first.spatial)

    def visit_flatten(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        xs = self.shape(x)
        axis = attr(n, "axis", 1) % max(len(xs), 1) if xs else 1
        if xi.axis is None:
            return self.fresh(out, None)
        rest = [d for i, d in enumerate(xs) if i >= axis and i != xi.axis]
        if xi.axis == axis and int(np.prod(rest)) == 1 and int(np.prod(xs[:axis])) == self.shape(out)[0]:
            self.t[out] = _TInfo(self.shape(out), 1, list(xi.segs))
            return
        why = f"Flatten '{n.name}' merges channels with spatial dims {tuple(xs[2:])} into one feature axis"
        self.fix_tensor(x, why)
        self.fresh(out, 1, reason=why)

    def visit_reshape(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        xs, os_ = self.shape(x), self.shape(out)
        if xi.axis is None:
            return self.fresh(out, None)
        c = xs[xi.axis]
        before = int(np.prod(xs[: xi.axis]))
        after = int(np.prod(xs[xi.axis + 1:]))
        for j, d in enumerate(os_):
            if d == c and int(np.prod(os_[:j])) == before and int(np.prod(os_[j + 1:])) == after:
                target = self.const(n.input[1]) if len(n.input) > 1 else None
                if target is not None and target.size == len(os_) and int(target[j]) == c:
                    for s in xi.segs:
                        self.uf.add(s, Member(n.name, "Reshape", "reshape", j))
                elif target is not None and target.size == len(os_) and int(target[j]) == -1 and any(
                        int(t) > 0 and k > j for k, t in enumerate(target) if int(t) != 1):
                    break  # -1 on the channel axis relies on other literal sizes; treat as fixed
                spatial = tuple(k for k in range(len(os_)) if k != j and k > 0 and os_[k] > 1)
                self.t[out] = _TInfo(os_, j, list(xi.segs), spatial)
                return
        why = f"Reshape '{n.name}' fixes the channel size ({tuple(xs)} -> {tuple(os_)})"
        self.fix_tensor(x, why)
        self.fresh(out, 1 if len(os_) >= 2 else None, reason=why)

    def visit_transpose(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        perm = list(attr(n, "perm", list(range(len(xi.shape)))[::-1]))
        if xi.axis is None:
            return self.fresh(out, None)
        self.t[out] = _TInfo(self.shape(out), perm.index(xi.axis), list(xi.segs),
                             tuple(perm.index(a) for a in xi.spatial if a in perm))

    def _axes(self, n: onnx.NodeProto, rank: int) -> list[int] | None:
        axes = attr(n, "axes")
        if axes is None and len(n.input) > 1 and n.input[1]:
            v = self.const(n.input[1])
            axes = None if v is None else v.tolist()
        if axes is None:
            return None
        return [int(a) % rank for a in axes]

    def visit_squeeze(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        xs, os_ = self.shape(x), self.shape(out)
        if xi.axis is None:
            return self.fresh(out, None)
        if n.op_type == "Squeeze":
            axes = self._axes(n, len(xs))
            if axes is None:
                axes = [i for i, d in enumerate(xs) if d == 1]
            if xi.axis in axes:
                return self.visit_unknown(n, f"Squeeze '{n.name}' removes the channel axis")
            ax = xi.axis - sum(1 for a in axes if a < xi.axis)
        else:
            axes = self._axes(n, len(os_)) or []
            ax = xi.axis
            for a in sorted(axes):
                if a <= ax:
                    ax += 1
        self.t[out] = _TInfo(os_, ax, list(xi.segs))

    def visit_reduce(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        xs = self.shape(x)
        if xi.axis is None:
            return self.fresh(out, None)
        axes = self._axes(n, len(xs))
        if axes is None:
            axes = [] if attr(n, "noop_with_empty_axes", 0) else list(range(len(xs)))
        keep = int(attr(n, "keepdims", 1))
        if xi.axis in axes:
            for s in xi.segs:
                self.uf.add(s, Member(n.name, n.op_type, "reduce"))
            return self.fresh(out, None)
        ax = xi.axis if keep else xi.axis - sum(1 for a in axes if a < xi.axis)
        self.t[out] = _TInfo(self.shape(out), ax, list(xi.segs))

    def visit_layernorm(self, n: onnx.NodeProto) -> None:
        x, out = n.input[0], n.output[0]
        xi = self.info(x)
        xs = self.shape(x)
        axis = attr(n, "axis", -1) % len(xs)
        self.same_layout(out, x)
        if xi.axis is not None and xi.axis >= axis:
            for s in xi.segs:
                self.uf.add(s, Member(n.name, n.op_type, "param"))
        for o in n.output[1:]:
            if o:
                self.fresh(o, None)

    def _slice_params(self, n: onnx.NodeProto, rank: int) -> tuple[list[int] | None, list[int] | None, list[int]]:
        """A Slice's constant (starts, axes, steps): inputs since opset 10, attributes
        before.  starts is None when not a constant, axes None when unknown."""
        def ints(i: int):
            if len(n.input) > i and n.input[i]:
                v = self.const(n.input[i])
                return None if v is None else [int(x) for x in v.reshape(-1).tolist()], True
            return None, False

        if len(n.input) > 1:  # opset >= 10: starts, ends[, axes[, steps]] are inputs
            starts, _ = ints(1)
            axes, given = ints(3)
            if given and axes is None:
                return starts, None, []
            steps, _ = ints(4)
        else:  # opset < 10: attributes
            starts, axes, steps = attr(n, "starts"), attr(n, "axes"), None
            starts = None if starts is None else [int(v) for v in starts]
        if axes is None:
            if starts is None:
                return None, None, []
            axes = list(range(len(starts)))
        if rank == 0 or (starts is not None and len(axes) != len(starts)):
            return None, None, []
        return starts, [int(a) % rank for a in axes], list(steps or [])

    def visit_split(self, n: onnx.NodeProto) -> None:
        x = n.input[0]
        xi = self.info(x)
        xs = self.shape(x)
        if xi.axis is None:
            for o in n.output:
                self.fresh(o, None)
            return
        if n.op_type == "Split":
            axis = attr(n, "axis", 0) % len(xs)
        else:
            starts, axes, steps = self._slice_params(n, len(xs))
            if axes is None:
                return self.visit_unknown(n)
            if xi.axis not in axes:
                self.same_layout(n.output[0], x)
                return
            k = axes.index(xi.axis)
            if len(n.input) == 1:  # opset < 10: the channel pass rewrites bounds given as inputs only
                return self.visit_unknown(n, f"Slice '{n.name}' (opset < 10) cuts channels with attribute bounds")
            if starts is None or (len(steps) > k and steps[k] != 1):
                return self.visit_unknown(n, f"Slice '{n.name}' takes channels at offsets or strides archpass cannot follow")
            axis = xi.axis
        if axis != xi.axis:
            for o in n.output:
                self.same_layout(o, x)
            return
        # splitting the channel axis: keep whole segments when the cut falls on their edges
        bounds, off = {0: 0}, 0
        for k, s in enumerate(xi.segs):
            off += self.uf.size[s]
            bounds[off] = k + 1
        start = 0
        for o in n.output:
            size = self.shape(o)[axis]
            if n.op_type == "Slice":
                st = int(starts[axes.index(axis)])
                start = int(np.clip(st, -xs[axis], xs[axis])) % xs[axis]
            end = start + size
            if start in bounds and end in bounds:
                segs = xi.segs[bounds[start]:bounds[end]]
                for s in segs:
                    self.uf.add(s, Member(n.name, n.op_type, "split", start))
                self.t[o] = _TInfo(self.shape(o), axis, list(segs), xi.spatial)
            else:
                why = f"{n.op_type} '{n.name}' cuts the channels at fixed offsets"
                self.fix_tensor(x, why)
                self.fresh(o, axis, reason=why)
            start = end


@contextmanager
def _unexpected(where: str) -> Iterator[None]:
    """Analysis raises only archpass's errors: anything else (a graph shape no rule
    expected) becomes an AnalysisError naming ``where``, chained to the original
    exception so ``--debug`` shows its traceback."""
    try:
        yield
    except ArchpassError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise AnalysisError(
            f"archpass cannot analyze {where}: {type(exc).__name__}{': ' + detail if detail else ''}",
            "this is a bug in archpass: report it with the model (--debug shows the traceback)",
        ) from exc


def analyze(model: Model | onnx.ModelProto) -> Structure:
    """Analyze a loaded (canonical, statically shaped) model."""
    proto = model.proto if isinstance(model, Model) else model
    with _unexpected("the model"):
        structure = _Analyzer(proto, model.size_links if isinstance(model, Model) else ()).run()
    tail = getattr(model, "tail", None)
    if tail is not None:
        from dataclasses import replace

        structure = replace(structure, post_processing=tuple(tail.seeds))
    prov = read_provenance(proto)
    if prov:  # layers a pass rewrote carry its tag (see archpass.passes.base.tag)
        from dataclasses import replace

        structure = replace(structure, layers=tuple(
            replace(l, provenance=", ".join(prov[l.id])) if prov.get(l.id) else l for l in structure.layers))
    return structure
