"""Resizing channel groups: the one implementation, shape path and graph path.

Used by the ``channels`` pass (one group) and ``width_multiplier`` (many groups at once).
A channel group (see :mod:`archpass.analysis`) is a set of tensor channel dimensions that
must change together.  :func:`resize_shapes` gives the :class:`Structure` after resizing
(tensor and layer shapes, weight shapes, member offsets in concatenated tensors), without
ONNX; :func:`resize_graph` rewrites every node of an onnx-graphsurgeon graph that touches
one of the groups' tensors:

* producers (Conv, Gemm, MatMul with a constant weight) get output channels added or
  removed in their weight and bias;
* consumers (Conv, Gemm after Flatten/GlobalPool, MatMul) get input channels added or
  removed, at the group's offset inside a concatenated input (Concat offsets follow
  implicitly: the parts before the group keep their place, the parts after it move);
* depthwise convs get kernels added or removed and their ``group`` attribute updated;
* per-channel constants (BatchNormalization/InstanceNormalization parameters, constant
  operands of Add/Sub/Mul/Div/Pow/Max/Min/PRelu, LayerNormalization weight and bias)
  follow the channels;
* Reshape shape constants that spell the channel count, Split sizes, Slice bounds on
  the channel axis and Resize ``sizes`` get the new count.

**Rounding up is exact.**  New channels are appended at the end of the group's block of
channels.  Producers emit exactly 0 there (zero weights and zero bias).  Per-channel
constants are padded with values that keep a zero channel at zero or make it zero:
BatchNorm scale 0, bias 0, mean 0, variance 1 (output exactly 0 whatever the input);
InstanceNorm/LayerNorm scale 0 and bias 0; Add/Sub/Mul/Max/Min/PRelu constants 0;
Div and Pow constants 1 (no division by zero, 0**1 = 0).  An activation with
f(0) != 0 (sigmoid, hardsigmoid) can still turn a padded channel non-zero, for instance
an SE gate of 0.5; that is harmless because such a value only ever meets (a) an
elementwise product with the zero channel of the same group, (b) a consumer or Gemm
whose weights for padded channels are zero, or (c) a depthwise conv whose padded
kernel and bias are zero.  Exactness is claimed only where padding cannot leak across
channels: a group that reaches an op mixing channels of one tensor (a reduction over the
channel axis, LayerNormalization or Softmax over it, LRN) is reported lossy even when
rounding up, because the padded channels change that op's statistics.

**Rounding down is lossy** and keeps the most important channels, chosen once per group
and applied consistently to every member.  Criterion: the L1 norm of each output
channel's weights summed over all producers of the group (with BatchNorm folded by
canonicalization, a conv's weight norm includes the BN scale; in a residual group every
project conv contributes; in an SE block the SE expand conv, which produces into the
same group through the Mul, contributes too).  Every adjustable group has at least one
producer layer with constant weights: analysis opens a channel slot only at a producing
Conv/Gemm/MatMul layer (whose weight is constant, or it is not a layer), and every other
slot (graph inputs, unknown ops, fixed cuts) is fixed.  Rewrites keep that: ``fuse_ibn``
makes the fused conv the expanded group's producer, ``dw_to_dense`` makes the dense conv
one.  So there is no fallback for a group without producers (a consumer-weight fallback
was unreachable and has been removed; such a group is refused).  Ties keep the lower
index.  The kept channels stay in their original order.

Constants shared by several nodes (onnxslim deduplicates identical initializers) are
never edited in place: each use gets its own new constant.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np

from archpass.errors import RecipeError
from archpass.structure import ChannelGroup, Member, Structure

from .base import tag
from .graphutil import const_value

#: Member roles whose channel offset within a concatenated tensor moves when a group before it changes size.
_OFFSET_ROLES = ("consumer", "concat", "split")
_PAD_ONE = {"Div", "Pow"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"}


def mixing_reason(structure: Structure, group: ChannelGroup) -> str | None:
    """Why padding this group could change the function (an op mixes its channels), or None."""
    for m in group.members:
        if m.role == "reduce":
            return f"{m.op} '{m.node}' reduces over the channel axis"
        if m.op == "LayerNormalization" and m.role == "param":
            return f"LayerNormalization '{m.node}' normalizes over the channel axis"
        if m.op in ("Softmax", "LogSoftmax"):
            return f"{m.op} '{m.node}' normalizes over the channel axis"
    gid = group.id
    for n in structure.nodes:
        if n.op == "LRN":
            t = structure.tensors.get(n.inputs[0])
            if t is not None and gid in t.segments:
                return f"LRN '{n.name}' mixes neighbouring channels"
    return None


# ---------------------------------------------------------------------------- shape path
def resize_shapes(structure: Structure, sizes: Mapping[str, int]) -> Structure:
    """A copy of ``structure`` in which the given channel groups have new sizes: every
    tensor and layer that carries them is resized, the changed layers' weight shapes
    follow, and members sitting behind a changed group in a concatenated tensor get their
    new offsets.  Fast: no ONNX, no weights."""
    sizes = {g: int(n) for g, n in sizes.items() if structure.group(g).channels != int(n)}
    if not sizes:
        return structure
    changed = set(sizes)
    gsize = {g.id: g.channels for g in structure.groups}
    gsize.update(sizes)
    groups = tuple(replace(g, channels=gsize[g.id]) if g.id in changed else g for g in structure.groups)
    tensors = dict(structure.tensors)
    multi = []
    for name, t in structure.tensors.items():
        if t.channel_axis is not None and t.segments and not changed.isdisjoint(t.segments):
            shape = list(t.shape)
            shape[t.channel_axis] = sum(gsize[s] for s in t.segments)
            tensors[name] = replace(t, shape=tuple(shape))
            if len(t.segments) > 1:
                multi.append(t)
    layers = []
    nodes_by_name: dict | None = None  # built on first use (the search's hot path)
    for l in structure.layers:
        if changed.isdisjoint(l.in_groups) and l.out_group not in changed:
            layers.append(l)
            continue
        cin = sum(gsize[g] for g in l.in_groups) if l.in_groups else l.cin
        # a depthwise conv's output carries its input's segments: after a Concat of one group
        # with itself (GhostNet's primary and cheap halves), twice that group
        out_t = structure.tensors.get(l.output)
        cout = (sum(gsize[g] for g in out_t.segments) if out_t is not None and len(out_t.segments) > 1
                else gsize[l.out_group] if l.out_group else l.cout)
        new_l = replace(l, cin=cin, cout=cout, groups=cin if l.depthwise else l.groups)
        layers.append(new_l)
        w = tensors.get(l.weight) if l.weight else None
        if w is None:
            continue
        if l.op == "Conv":
            shape = (new_l.cout, new_l.cin // max(new_l.groups, 1), *w.shape[2:])
        else:
            nodes_by_name = nodes_by_name if nodes_by_name is not None else {n.name: n for n in structure.nodes}
            out_axis = _linear_out_axis(l, nodes_by_name[l.id], len(w.shape))
            shape = tuple(new_l.cout if d == l.cout and i == out_axis else new_l.cin if d == l.cin else d
                          for i, d in enumerate(w.shape))
        tensors[l.weight] = replace(w, shape=shape)
        if l.bias and new_l.cout != l.cout:  # the bias (Conv B, Gemm C) follows the output channels
            nodes_by_name = nodes_by_name if nodes_by_name is not None else {n.name: n for n in structure.nodes}
            node = nodes_by_name.get(l.id)
            bias = tensors.get(node.inputs[2]) if node is not None and len(node.inputs) > 2 else None
            if bias is not None and bias.shape and bias.shape[-1] == l.cout:
                tensors[bias.name] = replace(bias, shape=(*bias.shape[:-1], new_l.cout))
    outputs = tuple((n, tensors[n].shape if n in tensors else s) for n, s in structure.outputs)
    if multi:  # offsets of members that sit behind a changed group in a concatenated tensor
        touched = {s for t in multi for s in t.segments}
        nodes = {n.name: n for n in structure.nodes}
        groups = tuple(
            replace(g, members=_recompute_offsets(g, structure, nodes, gsize)) if g.id in touched else g
            for g in groups
        )
    return replace(structure, layers=tuple(layers), groups=groups, tensors=tensors, outputs=outputs)


def _linear_out_axis(l, node, ndim: int) -> int:
    """The output-channel axis of a Gemm/MatMul layer's weight: MatMul (..., cin, cout); Gemm
    (cout, cin) with transB, (cin, cout) without (from the node: a square weight's shape cannot tell)."""
    if l.op == "MatMul":
        return ndim - 1
    return 0 if node.attr("transB", 0) else 1


def _recompute_offsets(g: ChannelGroup, structure: Structure, nodes: dict, gsize: Mapping[str, int]) -> tuple[Member, ...]:
    seen: dict[tuple[str, str], int] = {}
    out = []
    for m in g.members:
        if m.role not in _OFFSET_ROLES or m.node not in nodes:
            out.append(m)
            continue
        n = nodes[m.node]
        tensor = n.outputs[0] if m.role == "concat" else n.inputs[0]
        t = structure.tensors.get(tensor)
        if t is None or not t.segments:
            out.append(m)
            continue
        k = seen.get((m.node, m.role), 0)
        seen[(m.node, m.role)] = k + 1
        offsets = []
        off = 0
        for s in t.segments:
            if s == g.id:
                offsets.append(off)
            off += gsize[s]
        if m.role == "split":
            # a split member records where its output starts: keep it if the segment moved as a whole
            old_offsets, off = [], 0
            for s in t.segments:
                if s == g.id:
                    old_offsets.append(off)
                off += structure.group(s).channels
            new_off = offsets[old_offsets.index(m.offset)] if m.offset in old_offsets else m.offset
            out.append(replace(m, offset=new_off))
            continue
        out.append(replace(m, offset=offsets[k] if k < len(offsets) else m.offset))
    return tuple(out)


# ---------------------------------------------------------------------------- graph path
def _remap(arr: np.ndarray, axis: int, idx: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Take ``idx`` along ``axis`` (index -1 = a new channel filled with ``fill``)."""
    out = np.take(arr, np.maximum(idx, 0), axis=axis)
    pad = idx < 0
    if pad.any():
        sl = [slice(None)] * arr.ndim
        sl[axis] = pad
        out[tuple(sl)] = fill
    return np.ascontiguousarray(out, dtype=arr.dtype)


class _Editor:
    """Resizes several channel groups of a graphsurgeon graph at once."""

    def __init__(self, graph, structure: Structure, sizes: Mapping[str, int], pass_name: str, site: str | None):
        import onnx_graphsurgeon as gs

        self.gs = gs
        self.graph = graph
        self.s = structure
        self.sizes = dict(sizes)
        self.pass_name, self.site = pass_name, site
        self.gnodes = {n.name: n for n in graph.nodes}
        self.gtensors = graph.tensors()
        self.names = set(self.gtensors)
        self.old = {g.id: g.channels for g in structure.groups}
        self._axis_maps: dict[str, np.ndarray | None] = {}
        self.maps = {g: self._group_map(g, n) for g, n in self.sizes.items()}

    # ---- constants
    def const(self, node, i: int) -> np.ndarray | None:
        return const_value(node.inputs[i]) if i < len(node.inputs) else None

    def set_const(self, node, i: int, value: np.ndarray) -> None:
        old = node.inputs[i]
        if isinstance(old, self.gs.Constant) and len(old.outputs) == 1:
            name = old.name  # sole use: keep its name (layers refer to weights by name)
        else:
            base = f"{old.name}__{node.name}" if old.name else f"{node.name}_in{i}"
            name, k = base, 1
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        node.inputs[i] = self.gs.Constant(name, np.ascontiguousarray(value))

    # ---- channel maps
    def _group_map(self, gid: str, new: int) -> np.ndarray:
        old = self.old[gid]
        if new >= old:
            return np.concatenate([np.arange(old), -np.ones(new - old, dtype=np.int64)]).astype(np.int64)
        imp = self.importance(self.s.group(gid))
        keep = np.argsort(-imp, kind="stable")[:new]
        return np.sort(keep).astype(np.int64)

    def importance(self, g: ChannelGroup) -> np.ndarray:
        """L1 norm per channel of the producers' weights, summed over producers (see module doc)."""
        total = np.zeros(g.channels, dtype=np.float64)
        found = False
        for m in g.producers:
            node = self.gnodes.get(m.node)
            w = self.const(node, 1) if node is not None else None
            if w is None:
                continue
            axis = self._out_axis(node, w)
            total += np.abs(w.astype(np.float64)).sum(axis=tuple(a for a in range(w.ndim) if a != axis))
            found = True
        if not found:  # unreachable from analyze() (see the module doc); refuse rather than guess
            raise RecipeError(f"channel group '{g.id}' has no producer layer with constant weights to rank its channels",
                              "only groups produced by a Conv/Gemm/MatMul layer can be shrunk")
        return total

    @staticmethod
    def _axes(node, w: np.ndarray) -> tuple[int, int]:
        """(input-channel axis, output-channel axis) of a layer's weight."""
        if node.op == "Conv":
            return 1, 0
        if node.op == "Gemm":
            return (1, 0) if node.attrs.get("transB", 0) else (0, 1)
        return w.ndim - 2, w.ndim - 1  # MatMul

    def _out_axis(self, node, w: np.ndarray) -> int:
        return self._axes(node, w)[1]

    def _in_axis(self, node, w: np.ndarray) -> int:
        return self._axes(node, w)[0]

    def axis_map(self, tensor: str) -> np.ndarray | None:
        """Old index of every new position along ``tensor``'s channel axis (-1 = padding), or
        None when none of its segments changes."""
        if tensor in self._axis_maps:
            return self._axis_maps[tensor]
        t = self.s.tensors.get(tensor)
        result = None
        if t is not None and t.channel_axis is not None and any(s in self.maps for s in t.segments):
            parts, off = [], 0
            for s in t.segments:
                if s in self.maps:
                    m = self.maps[s]
                    parts.append(np.where(m >= 0, m + off, -1))
                else:
                    parts.append(np.arange(off, off + self.old[s]))
                off += self.old[s]
            result = np.concatenate(parts).astype(np.int64)
        self._axis_maps[tensor] = result
        return result

    # ---- the rewrite
    def run(self) -> None:
        for sn in self.s.nodes:
            names = [i for i in sn.inputs if i] + [o for o in sn.outputs if o]
            if not any(self.axis_map(n) is not None for n in names):
                continue
            gn = self.gnodes.get(sn.name)
            if gn is None:
                raise RecipeError(f"node '{sn.name}' of the analyzed model is missing from the graph",
                                  "apply rewrites to the graph the structure was analyzed from")
            self.edit(sn, gn)
            tag(gn, self.pass_name, self.site)
        # variable shapes are left stale: no pass reads them, and the engine drops and re-infers every
        # intermediate shape after the last rewrite (engine._reinfer)

    def edit(self, sn, gn) -> None:
        op = sn.op
        x = sn.inputs[0] if sn.inputs else ""
        y = sn.outputs[0] if sn.outputs else ""
        in_map, out_map = self.axis_map(x), self.axis_map(y)
        if op == "Conv":
            self.edit_conv(sn, gn, in_map, out_map)
        elif op in ("Gemm", "MatMul"):
            self.edit_linear(sn, gn, in_map, out_map)
        elif op == "BatchNormalization" and out_map is not None:
            for i, fill in zip(range(1, 5), (0.0, 0.0, 0.0, 1.0)):
                self.set_const(gn, i, _remap(self._need(gn, i, sn), 0, out_map, fill))
        elif op == "InstanceNormalization" and out_map is not None:
            for i in (1, 2):
                self.set_const(gn, i, _remap(self._need(gn, i, sn), 0, out_map, 0.0))
        elif op == "LayerNormalization" and out_map is not None:
            t = self.s.tensors[x]
            r = len(t.shape)
            first = int(gn.attrs.get("axis", -1)) % r
            if t.channel_axis >= first:
                for i in (1, 2):
                    if i < len(gn.inputs) and gn.inputs[i].name:
                        self.set_const(gn, i, _remap(self._need(gn, i, sn), t.channel_axis - first, out_map, 0.0))
        elif op in _BINARY and out_map is not None:
            self.edit_binary(sn, gn, out_map)
        elif op == "Reshape" and out_map is not None:
            self.edit_reshape(sn, gn, out_map)
        elif op == "Split" and in_map is not None:
            self.edit_split(sn, gn)
        elif op == "Slice" and in_map is not None:
            self.edit_slice(sn, gn)
        elif op == "Resize" and out_map is not None and len(gn.inputs) > 3 and gn.inputs[3].name:
            sizes = self._need(gn, 3, sn)  # computed sizes could not follow: refuse rather than break the model
            if sizes.size:
                sizes = sizes.copy()
                sizes[self.s.tensors[y].channel_axis] = len(out_map)
                self.set_const(gn, 3, sizes)
        # everything else (Concat, pooling, activations, Flatten, Transpose, Pad, ...) follows its inputs

    def _need(self, gn, i: int, sn) -> np.ndarray:
        v = self.const(gn, i)
        if v is None:
            raise RecipeError(f"{sn.op} '{sn.name}' has a non-constant input {i}", "only constant parameters can be resized")
        return v

    def edit_conv(self, sn, gn, in_map, out_map) -> None:
        w = self._need(gn, 1, sn)
        group = int(gn.attrs.get("group", 1))
        bias = self.const(gn, 2) if len(gn.inputs) > 2 and gn.inputs[2].name else None
        if group == 1:
            if out_map is not None:
                w = _remap(w, 0, out_map)
                if bias is not None:
                    self.set_const(gn, 2, _remap(bias, 0, out_map))
            if in_map is not None:
                w = _remap(w, 1, in_map)
            self.set_const(gn, 1, w)
            return
        if w.shape[1] == 1 and group == w.shape[0] and out_map is not None:  # depthwise: in = out
            self.set_const(gn, 1, _remap(w, 0, out_map))
            if bias is not None:
                self.set_const(gn, 2, _remap(bias, 0, out_map))
            gn.attrs["group"] = int(len(out_map))
            return
        raise RecipeError(f"Conv '{sn.name}' is a grouped convolution", "grouped convolutions cannot be resized")

    def edit_linear(self, sn, gn, in_map, out_map) -> None:
        w = self._need(gn, 1, sn)
        if out_map is not None:
            old_out = w.shape[self._out_axis(gn, w)]
            w2 = _remap(w, self._out_axis(gn, w), out_map)
            if sn.op == "Gemm" and len(gn.inputs) > 2 and gn.inputs[2].name:
                c = self._need(gn, 2, sn)  # a computed C could not follow: refuse rather than break the model
                if c.ndim >= 1 and c.shape[-1] == old_out:  # per output (1 output: (1,) too)
                    self.set_const(gn, 2, _remap(c, c.ndim - 1, out_map))
            w = w2
        if in_map is not None:
            w = _remap(w, self._in_axis(gn, w), in_map)
        self.set_const(gn, 1, w)

    def edit_binary(self, sn, gn, out_map) -> None:
        t = self.s.tensors[sn.outputs[0]]
        r = len(t.shape)
        old_c = t.shape[t.channel_axis]
        fill = 1.0 if sn.op in _PAD_ONE else 0.0
        for i in range(len(gn.inputs)):
            v = self.const(gn, i)
            if v is None:
                continue
            cax = t.channel_axis - (r - v.ndim)
            if 0 <= cax < v.ndim and v.shape[cax] == old_c and old_c > 1:
                self.set_const(gn, i, _remap(v, cax, out_map, fill))

    def edit_reshape(self, sn, gn, out_map) -> None:
        t = self.s.tensors[sn.outputs[0]]
        target = self.const(gn, 1)
        if target is None:
            return
        j = t.channel_axis
        if target.size == len(t.shape) and int(target.reshape(-1)[j]) == t.shape[j]:
            target = target.copy()
            target.reshape(-1)[j] = len(out_map)
            self.set_const(gn, 1, target)

    def _new_size(self, tensor: str) -> int:
        m = self.axis_map(tensor)
        t = self.s.tensors[tensor]
        return len(m) if m is not None else t.shape[t.channel_axis]

    def edit_split(self, sn, gn) -> None:
        t = self.s.tensors[sn.inputs[0]]
        axis = int(gn.attrs.get("axis", 0)) % len(t.shape)
        if axis != t.channel_axis:
            return
        sizes = np.array([self._new_size(o) for o in sn.outputs], dtype=np.int64)
        if self.graph.opset >= 13:
            if len(gn.inputs) > 1 and gn.inputs[1].name:
                self.set_const(gn, 1, sizes)
            else:
                name, k = f"{sn.name}_split", 1
                while name in self.names:
                    name, k = f"{sn.name}_split_{k}", k + 1
                self.names.add(name)
                gn.inputs.append(self.gs.Constant(name, sizes))
            gn.attrs.pop("num_outputs", None)
        else:
            gn.attrs["split"] = [int(v) for v in sizes]

    def edit_slice(self, sn, gn) -> None:
        t = self.s.tensors[sn.inputs[0]]
        rank = len(t.shape)
        starts, ends = self.const(gn, 1), self.const(gn, 2)
        axes = self.const(gn, 3) if len(gn.inputs) > 3 and gn.inputs[3].name else None
        steps = self.const(gn, 4) if len(gn.inputs) > 4 and gn.inputs[4].name else None
        if starts is None or ends is None:
            raise RecipeError(f"Slice '{sn.name}' has non-constant bounds", "only constant slices can be resized")
        axes_l = list(range(starts.size)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
        if t.channel_axis not in axes_l:
            return
        k = axes_l.index(t.channel_axis)
        if steps is not None and int(steps.reshape(-1)[k]) != 1:
            raise RecipeError(f"Slice '{sn.name}' steps over channels", "only unit-step channel slices can be resized")
        c_old = t.shape[t.channel_axis]
        start_old = int(np.clip(int(starts.reshape(-1)[k]), -c_old, c_old)) % c_old
        old_offs, new_offs, o_old, o_new = {}, {}, 0, 0
        for idx, s in enumerate(t.segments):
            old_offs[o_old] = idx
            new_offs[idx] = o_new
            o_old += self.old[s]
            o_new += int(self.sizes.get(s, self.old[s]))
        if start_old not in old_offs:
            raise RecipeError(f"Slice '{sn.name}' cuts inside a channel group", "only slices on group edges can be resized")
        new_start = new_offs[old_offs[start_old]]
        new_end = new_start + self._new_size(sn.outputs[0])
        starts, ends = starts.copy(), ends.copy()
        starts.reshape(-1)[k] = new_start
        ends.reshape(-1)[k] = new_end
        self.set_const(gn, 1, starts)
        self.set_const(gn, 2, ends)


def resize_graph(graph, structure: Structure, sizes: Mapping[str, int], pass_name: str, site: str | None) -> Structure:
    """Resize the given groups of ``graph`` in place (see the module doc); returns the new structure."""
    sizes = {g: int(n) for g, n in sizes.items() if structure.group(g).channels != int(n)}
    if not sizes:
        return structure
    new = resize_shapes(structure, sizes)
    editor = _Editor(graph, structure, sizes, pass_name, site)
    editor.run()
    record_channel_maps(graph, editor.maps)
    return new


CHANNEL_MAPS_ATTR = "_archpass_channel_maps"  # Python attribute on the graphsurgeon graph


def record_channel_maps(graph, maps: Mapping[str, np.ndarray]) -> None:
    """Remember, on ``graph``, which source channel each new channel of a resized group
    holds (-1 = a padded channel), composed over several resizes of the same group.
    The engine hands them out as ``Applied.channel_maps``; weight recovery reads them to
    line a resized tensor up with the original one."""
    have = dict(vars(graph).get(CHANNEL_MAPS_ATTR, {}))  # getattr would hit graphsurgeon's op registry
    for gid, m in maps.items():
        prev = have.get(gid)
        have[gid] = m if prev is None else np.where(m >= 0, prev[np.maximum(m, 0)], -1)
    setattr(graph, CHANNEL_MAPS_ATTR, have)


def resize_exact(structure: Structure, sizes: Mapping[str, int]) -> bool:
    """Whether resizing the groups keeps the function: every change grows its group by
    zero padding and no group reaches an op that mixes its channels."""
    for gid, n in sizes.items():
        g = structure.group(gid)
        if n == g.channels:
            continue
        if n < g.channels or mixing_reason(structure, g) is not None:
            return False
    return True
