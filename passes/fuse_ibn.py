"""``fuse_ibn``: an inverted bottleneck's 1x1 expand + KxK depthwise become one KxK dense conv.

The fused conv maps the block input (cin) to the expanded channels with the depthwise
conv's kernel, stride, padding, dilation and activation.  Its initial weights are the
composition of the two convs::

    W[o, i, kh, kw] = Wdw[o, 0, kh, kw] * Wexp[o, i]
    b[o]            = bdw[o] + bexp[o] * sum(Wdw[o, 0])

The composition is the same function only when nothing sits between the two convs
(no activation) and the expand bias cannot leak through the depthwise conv's zero
padding (no expand bias, or no padding); every IBN archpass recognizes has an
activation there, so in practice the rewrite is **lossy**: the weights are a starting
point to recover or fine-tune.

Ids: the fused layer keeps the **depthwise layer's id** (and ONNX node name), the
expand layer disappears, the block keeps its id and becomes ``fused_ibn`` with roles
``fused``/``project`` (and ``se_reduce``/``se_expand``).  Channel group ids do not
change: the expanded group now has the fused conv as its producer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from archpass.passes.base import GraphResult, Match, Pass, ShapeResult, Site, register, tag
from archpass.passes.graphutil import const_value, fresh_const, node_named
from archpass.passes.structedit import chain_between, drop_unused_consts, edit_members
from archpass.structure import Layer, Member, Structure, Tensor


def _summary(l: Layer) -> str:
    stride = f"{l.stride[0]}" if l.stride[0] == l.stride[1] else f"{l.stride[0]}x{l.stride[1]}"
    return (f"{l.cin}->{l.cout} k{l.kernel[0]}x{l.kernel[1]} s{stride} g{l.groups} "
            f"{l.in_hw[0]}x{l.in_hw[1]}->{l.out_hw[0]}x{l.out_hw[1]}")


@register
class FuseIBN(Pass):
    name = "fuse_ibn"
    summary = "merge an inverted bottleneck's 1x1 expand and KxK depthwise conv into one KxK dense conv"
    exactness = "lossy (exact only without an activation between the two convs)"
    site_kind = "block"
    choice_keys = ()

    def sites(self, structure: Structure) -> list[Site]:
        return [self.site(b.id, {}, f"{b.role('expand')} + {b.role('depthwise')}")
                for b in structure.blocks if b.kind == "ibn" and isinstance(self.check(structure, b.id, {}), Match)]

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        if site is None or not structure.has_block(site):
            return f"'{site}' is not a block of this model"
        b = structure.block(site)
        if b.kind == "fused_ibn":
            return f"{site} is already a fused inverted bottleneck (fused_ibn)"
        if b.kind != "ibn":
            return f"{site} is a {b.kind} block, not an inverted bottleneck with an expand conv (ibn)"
        if choice:
            return f"fuse_ibn takes no choice, got {', '.join(choice)}"
        e, d = structure.layer(b.role("expand")), structure.layer(b.role("depthwise"))
        if not (e.pointwise and e.stride == (1, 1) and e.pads == (0, 0, 0, 0)):
            return f"the expand conv of {site} is not a plain 1x1 stride-1 conv"
        if not (d.depthwise and d.cout == d.cin == e.cout):
            return f"the depthwise conv of {site} has a channel multiplier"
        chain = chain_between(structure, e.output, d.input)
        if chain is None:
            return f"the expand conv's output of {site} is used outside the block"
        return self.match(site, choice, block=b, expand=e, depthwise=d, chain=chain, exact=self._exact(e, d))

    @staticmethod
    def _exact(e: Layer, d: Layer) -> bool:
        return e.output == d.input and (not e.bias or d.pads == (0, 0, 0, 0))

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        s = structure
        f = match.found
        site, b, e, d, exact = match.site, f["block"], f["expand"], f["depthwise"], f["exact"]
        chain_nodes, chain_tensors = f["chain"]
        w_name, b_name = f"{d.id}.fused_weight", f"{d.id}.fused_bias"
        has_bias = e.bias or d.bias
        fused = replace(d, cin=e.cin, groups=1, in_hw=e.in_hw, input=e.input, weight=w_name, bias=has_bias,
                        in_groups=e.in_groups, provenance=f"{self.name}:{site}")
        removed = {e.id} | {n.name for n in chain_nodes}
        layers = tuple(fused if l.id == d.id else l for l in s.layers if l.id != e.id)
        nodes = []
        for n in s.nodes:
            if n.name in removed:
                continue
            if n.name == d.id:
                n = replace(n, inputs=(e.input, w_name) + ((b_name,) if has_bias else ()))
            nodes.append(n)
        exp_group = d.out_group

        def members(gid: str, m: Member) -> Member | None:
            if m.node in removed and not (m.node == e.id and m.role == "consumer"):
                return None
            if m.node == e.id:  # expand consumed the block input: the fused conv does now
                return replace(m, node=d.id)
            if m.node == d.id and m.role == "depthwise" and gid == exp_group:
                return replace(m, role="producer")
            return m

        groups = edit_members(s.groups, members)
        tensors = dict(s.tensors)
        for t in chain_tensors | {e.output, d.input}:  # the expand's output and activation are gone
            tensors.pop(t, None)
        old_w = [n.inputs[1:] for n in s.nodes if n.name in (e.id, d.id)] + [n.inputs for n in chain_nodes]
        elem = tensors[d.weight].elem_bytes  # every layer's weight is a tensor of its structure
        # (C, cin, kh, kw), or (C, cin, k) for a 1-D conv: the depthwise weight's own kernel axes
        tensors[w_name] = Tensor(w_name, (d.cout, e.cin, *tensors[d.weight].shape[2:]), elem, const=True)
        if has_bias:
            tensors[b_name] = Tensor(b_name, (d.cout,), elem, const=True)
        drop_unused_consts(tensors, nodes, [t for ins in old_w for t in ins])
        roles = tuple(("fused", d.id) if r == "depthwise" else (r, lid) for r, lid in b.roles if r != "expand")
        block = replace(b, kind="fused_ibn", layers=tuple(l for l in b.layers if l != e.id), roles=roles)
        blocks = tuple(block if x.id == b.id else x for x in s.blocks)
        out = replace(s, layers=layers, nodes=tuple(nodes), groups=groups, tensors=tensors, blocks=blocks)
        return ShapeResult(out, True, exact,
                           before={"expand": _summary(e), "depthwise": _summary(d)},
                           after={"fused": _summary(fused)})

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        e, d = match.found["expand"], match.found["depthwise"]
        en, dn = node_named(graph, e.id), node_named(graph, d.id)
        w_e = const_value(en.inputs[1])
        we = w_e.astype(np.float64).reshape(w_e.shape[:2])  # [C, cin] (a 1x1 or, 1-D, a size-1 kernel)
        wd = const_value(dn.inputs[1]).astype(np.float64)  # [C, 1, kh, kw], or [C, 1, k] for a 1-D conv
        be = const_value(en.inputs[2]).astype(np.float64) if len(en.inputs) > 2 else np.zeros(we.shape[0])
        bd = const_value(dn.inputs[2]).astype(np.float64) if len(dn.inputs) > 2 else np.zeros(we.shape[0])
        dtype = np.asarray(en.inputs[1].values).dtype
        taps = wd.ndim - 2
        w = wd[:, 0][:, None] * we.reshape(*we.shape, *(1,) * taps)  # [C, cin, *kernel]
        inputs = [en.inputs[0], fresh_const(f"{d.id}.fused_weight", w.astype(dtype))]
        if e.bias or d.bias:
            bias = bd + be * wd[:, 0].sum(axis=tuple(range(1, 1 + taps)))
            inputs.append(fresh_const(f"{d.id}.fused_bias", bias.astype(dtype)))
        dn.inputs.clear()
        dn.inputs.extend(inputs)
        dn.attrs["group"] = 1
        # the expand conv and its activation are now dead; the engine's cleanup() removes them
        tag(dn, self.name, match.site)
        return GraphResult(True, match.found["exact"])
