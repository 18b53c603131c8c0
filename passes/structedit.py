"""Helpers for shape-only rewrites: small, allocation-light edits of a Structure."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

from archpass.structure import ChannelGroup, Member, Node, Structure, Tensor


def chain_between(s: Structure, start: str, end: str) -> tuple[list[Node], set[str]] | None:
    """The nodes and tensors strictly between tensor ``start`` and tensor ``end`` when every
    path from ``start`` leads to ``end`` (an activation chain); None when ``start`` escapes."""
    cons = s._edges()[1]
    nodes: list[Node] = []
    seen_nodes: set[str] = set()
    tensors = {start}
    frontier = [start]
    outputs = {o for o, _ in s.outputs}
    while frontier:
        t = frontier.pop()
        if t == end:
            continue
        if t in outputs:
            return None
        users = cons.get(t, [])
        if not users:
            return None
        for n in users:
            if n.name in seen_nodes:
                continue
            if n.layer is not None:
                return None
            seen_nodes.add(n.name)
            nodes.append(n)
            for o in n.outputs:
                if o and o not in tensors:
                    tensors.add(o)
                    frontier.append(o)
    if end not in tensors:
        return None
    # every input of a chain node must come from the chain or be a constant
    for n in nodes:
        for i in n.inputs:
            if i and i not in tensors and not (i in s.tensors and s.tensors[i].const):
                return None
    return nodes, tensors - {start, end}


def edit_members(groups: Iterable[ChannelGroup], fn: Callable[[str, Member], Member | None]) -> tuple[ChannelGroup, ...]:
    """Map every member through ``fn(group_id, member)`` (None drops it)."""
    out = []
    for g in groups:
        ms = []
        changed = False
        for m in g.members:
            m2 = fn(g.id, m)
            if m2 is not m:
                changed = True
            if m2 is not None:
                ms.append(m2)
        out.append(replace(g, members=tuple(ms)) if changed else g)
    return tuple(out)


def drop_unused_consts(tensors: dict[str, Tensor], nodes: Iterable[Node], candidates: Iterable[str]) -> None:
    cands = {c for c in candidates if c and c in tensors and tensors[c].const}
    if not cands:
        return
    for n in nodes:
        cands.difference_update(n.inputs)
        if not cands:
            return
    for c in cands:
        del tensors[c]


def next_group_id(s: Structure) -> str:
    nums = [int(g.id[5:]) for g in s.groups if g.id.startswith("group") and g.id[5:].isdigit()]
    return f"group{max(nums, default=-1) + 1}"
