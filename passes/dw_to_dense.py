"""``dw_to_dense``: a depthwise conv becomes a dense conv with block-diagonal weights (exact).

``W[o, i] = Wdw[o, 0]`` where ``i == o // multiplier``, zero elsewhere, ``group = 1``.
The function is unchanged; what changes is that the conv's output channels are no
longer tied to its input channels, so later passes (``channels``,
``width_multiplier``) can size them on their own.

Ids: the layer keeps its id.  Its output channels (and everything downstream that was
coupled to them only through the depthwise conv: activations, SE, the project conv's
input) move to a **new channel group** ``group<max+1>``; the input side keeps the old
group id.  When the output is still coupled to the input some other way (e.g. a
residual Add around the conv) both stay one group.  The block the conv belonged to
(``ibn`` or ``depthwise``) is no longer one of those kinds and leaves the block list;
other block ids do not change.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from archpass.passes.base import GraphResult, Match, Pass, ShapeResult, Site, register, tag
from archpass.passes.graphutil import const_value, fresh_const, node_named
from archpass.passes.structedit import drop_unused_consts, edit_members, next_group_id
from archpass.analysis import multiplier_reason
from archpass.structure import ChannelGroup, Fix, Layer, Member, Structure, Tensor


def _summary(l: Layer) -> str:
    return f"{l.cin}->{l.cout} k{l.kernel[0]}x{l.kernel[1]} groups={l.groups}"


def _cone(s: Structure, start: str) -> tuple[set[str], set[str]]:
    """Every node and tensor downstream of tensor ``start``."""
    cons: dict[str, list] = {}
    for n in s.nodes:
        for i in n.inputs:
            cons.setdefault(i, []).append(n)
    nodes: set[str] = set()
    tensors = {start}
    frontier = [start]
    while frontier:
        t = frontier.pop()
        for n in cons.get(t, ()):
            if n.name in nodes:
                continue
            nodes.add(n.name)
            for o in n.outputs:
                if o and o not in tensors:
                    tensors.add(o)
                    frontier.append(o)
    return nodes, tensors


@register
class DwToDense(Pass):
    name = "dw_to_dense"
    summary = "turn a depthwise conv into a dense conv with block-diagonal weights, so its channels can change"
    exactness = "exact"
    site_kind = "layer"
    choice_keys = ()

    def sites(self, structure: Structure) -> list[Site]:
        return [self.site(l.id, {}, _summary(l)) for l in structure.layers if l.depthwise]

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        if site is None or not structure.has_layer(site):
            return f"'{site}' is not a layer of this model"
        l = structure.layer(site)
        if not l.depthwise:
            return f"layer '{site}' is not a depthwise conv (op {l.op}, groups={l.groups})"
        if choice:
            return f"dw_to_dense takes no choice, got {', '.join(choice)}"
        return self.match(site, choice, layer=l)

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        s = structure
        site, d = match.site, match.found["layer"]
        w_name = f"{d.id}.dense_weight"
        new_groups = s.groups
        tensors = dict(s.tensors)
        layers = s.layers
        g = d.out_group
        split = None
        if len(d.in_groups) == 1 and d.in_groups[0] == g and g:
            cone_nodes, cone_t = _cone(s, d.output)
            g_cone = {t for t in cone_t if g in tensors[t].segments}
            coupled = any(
                n.name in cone_nodes and any(i and i not in cone_t and i in tensors and g in tensors[i].segments
                                             for i in n.inputs)
                for n in s.nodes)
            if not coupled:
                split = (next_group_id(s), cone_nodes, g_cone)
        if split:
            gnew, cone_nodes, g_cone = split
            old = s.group(g)
            moved = [m for m in old.members
                     if m.node != d.id and (m.node in cone_nodes or (m.role == "output" and m.node in g_cone))]
            kept = [m for m in old.members if m not in moved and m.node != d.id]
            kept.append(Member(d.id, "Conv", "consumer", 0))
            moved.insert(0, Member(d.id, "Conv", "producer"))
            # a fix moves with what made it: a node of the cone, or a model output the cone feeds
            inside = [f.source in cone_nodes or f.source in g_cone for f in old.fixes]
            new_groups = tuple(
                replace(x, members=tuple(kept)).with_fixes(f for f, i in zip(old.fixes, inside) if not i) if x.id == g else x
                for x in s.groups) + (
                ChannelGroup(gnew, old.channels, tuple(moved), True).with_fixes(f for f, i in zip(old.fixes, inside) if i),)
            for t in g_cone:
                tensors[t] = replace(tensors[t], segments=tuple(gnew if x == g else x for x in tensors[t].segments))
            ls = []
            for l in s.layers:
                if l.input in g_cone or l.output in g_cone:
                    l = replace(l, in_groups=tensors[l.input].segments if l.input in g_cone else l.in_groups,
                                out_group=gnew if l.output in g_cone else l.out_group)
                ls.append(l)
            layers = tuple(ls)
        else:
            def members(gid: str, m: Member) -> Member | None:
                return replace(m, role="consumer") if m.node == d.id and m.role == "depthwise" else m

            new_groups = edit_members(new_groups, members)
            if d.cout != d.cin:  # a dense conv does not tie its channels to a multiplier
                gone_fix = Fix(d.id, multiplier_reason(d.id, d.cout // d.cin))
                new_groups = tuple(x.with_fixes(f for f in x.fixes if f != gone_fix) if gone_fix in x.fixes else x
                                   for x in new_groups)
            if g and not any(m.node == d.id and m.role == "producer" for m in s.group(g).members):
                new_groups = tuple(replace(x, members=x.members + (Member(d.id, "Conv", "producer"),)) if x.id == g else x
                                   for x in new_groups)
        dense = replace(layers[[l.id for l in layers].index(d.id)], groups=1, weight=w_name,
                        provenance=f"{self.name}:{site}")
        layers = tuple(dense if l.id == d.id else l for l in layers)
        nodes = tuple(replace(n, inputs=(n.inputs[0], w_name, *n.inputs[2:])) if n.name == d.id else n for n in s.nodes)
        tensors[w_name] = Tensor(w_name, (d.cout, d.cin, *d.kernel), tensors[d.weight].elem_bytes if d.weight in tensors else 4,
                                 const=True)
        drop_unused_consts(tensors, nodes, [d.weight])
        gone = {b.id for b in s.blocks if d.id in b.layers}
        blocks = tuple(b for b in s.blocks if b.id not in gone)
        stages = tuple(replace(st, blocks=tuple(x for x in st.blocks if x not in gone)) if gone.intersection(st.blocks) else st
                       for st in s.stages)
        out = replace(s, layers=layers, nodes=nodes, groups=new_groups, tensors=tensors, blocks=blocks, stages=stages)
        after = {"layer": _summary(dense)}
        if split:
            after["new_group"] = split[0]
        return ShapeResult(out, True, True, before={"layer": _summary(d)}, after=after)

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        site, d = match.site, match.found["layer"]
        node = node_named(graph, d.id)
        wd = const_value(node.inputs[1])  # [cout, 1, kh, kw]
        mult = d.cout // d.cin
        w = np.zeros((d.cout, d.cin, *wd.shape[2:]), dtype=wd.dtype)
        o = np.arange(d.cout)
        w[o, o // mult] = wd[:, 0]
        node.inputs[1] = fresh_const(f"{d.id}.dense_weight", w)
        node.attrs["group"] = 1
        tag(node, self.name, site)
        return GraphResult(True, True)
