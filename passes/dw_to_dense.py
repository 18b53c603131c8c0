"""``dw_to_dense``: a depthwise conv becomes a dense conv with block-diagonal weights (exact).

``W[o, i] = Wdw[o, 0]`` where ``i == o // multiplier``, zero elsewhere, ``group = 1``.
The function is unchanged; what changes is that the conv's output channels are no
longer tied to its input channels, so later passes (``channels``,
``width_multiplier``) can size them on their own.

Ids: the layer keeps its id.  Its output channels (and everything downstream that was
coupled to them only through the depthwise conv: activations, SE, the project conv's
input) move to a **new channel group** ``group<max+1>``; the input side keeps the old
group id.  When the output is still coupled to the input some other way (e.g. a
residual Add around the conv) both stay one group; an Add after a later layer (a residual
around dw -> 1x1) does not couple them.  The old group's fixes (``ChannelGroup.fixes``)
follow their sources to either side; the fix of a channel multiplier goes.  The block the conv belonged to
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


def _linked(s: Structure, g: str, start: str, cut: str) -> set[str]:
    """The tensors carrying group ``g`` that stay tied to tensor ``start`` once conv ``cut`` is dense:
    connected through nodes that tie their channels together (every op but a layer that is not a
    plain depthwise conv, as analysis unites them)."""
    def ties(n) -> bool:
        if n.name == cut:
            return False
        if n.layer is None:
            return True
        l = s.layer(n.layer)
        return l.groups > 1 and l.groups == l.cin == l.cout

    touching: dict[str, list] = {}
    for n in s.nodes:
        for t in (*n.inputs, *n.outputs):
            touching.setdefault(t, []).append(n)
    found, frontier = {start}, [start]
    while frontier:
        for n in touching.get(frontier.pop(), ()):
            if ties(n):
                for u in (*n.inputs, *n.outputs):
                    if u and u not in found and u in s.tensors and g in s.tensors[u].segments:
                        found.add(u)
                        frontier.append(u)
    return found


def _split(s: Structure, g: str, moved_t: set[str], d: Layer) -> tuple[list[Member], list[Member], list, list]:
    """Group ``g``'s members and fixes that follow the tensors ``moved_t`` (the dense conv's output side)
    and those that stay: a member or fix moves when the tensors of its node (for a producer its
    outputs, a consumer its inputs; a model input/output is its tensor) lie there."""
    nodes = {n.name: n for n in s.nodes}

    def tensors_of(name: str, role: str | None = None) -> set[str]:
        n = nodes.get(name)
        if n is None:
            return {name}  # a model input or output
        ts = n.outputs if role == "producer" else n.inputs if role == "consumer" else (*n.inputs, *n.outputs)
        return {t for t in ts if t in s.tensors and g in s.tensors[t].segments}

    old = s.group(g)
    moved, kept = [Member(d.id, "Conv", "producer")], []
    for m in old.members:
        if m.node != d.id:
            (moved if tensors_of(m.node, m.role) & moved_t else kept).append(m)
    kept.append(Member(d.id, "Conv", "consumer", 0))
    fixes_new = [f for f in old.fixes if tensors_of(f.source) & moved_t]
    fixes_old = [f for f in old.fixes if not tensors_of(f.source) <= moved_t or not tensors_of(f.source)]
    return moved, kept, fixes_new, fixes_old


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
            linked = _linked(s, g, d.output, d.id)
            if d.input not in linked:  # nothing else (a residual Add around the conv) ties output to input
                split = (next_group_id(s), linked)
        if split:
            gnew, g_cone = split
            moved, kept, fixes_new, fixes_old = _split(s, g, g_cone, d)
            new_groups = tuple(replace(x, members=tuple(kept)).with_fixes(fixes_old) if x.id == g else x
                               for x in s.groups) + (
                ChannelGroup(gnew, s.group(g).channels, tuple(moved), True).with_fixes(fixes_new),)
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
        tensors[w_name] = Tensor(w_name, (d.cout, d.cin, *tensors[d.weight].shape[2:]), tensors[d.weight].elem_bytes,
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
