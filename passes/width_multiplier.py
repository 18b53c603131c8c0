"""`width_multiplier`: scale the channel groups of the whole model, or of one stage.

Site kind ``stage``: site ``None`` scales every adjustable channel group; site
``stage<N>`` scales the adjustable groups that have at least one producer among the
layers of that stage.  A stage's layers are those of its blocks plus the layers outside
any block attributed to it: **a layer outside a block belongs to the stage of the next
block in execution order, and layers after the last block (the head) to the last stage**.
So the stem conv belongs to the first stage, and the union of the stage sites covers
every group the whole-model site covers (every adjustable group has a producer layer,
see :mod:`archpass.passes.resize`).  A stage whose blocks an earlier rewrite removed
(``dw_to_dense`` takes its block out of the block list) has no layers of its own; its
outside layers then go to the next stage.

Each group's new size is ``channels * multiplier`` rounded to the nearest multiple of
``parallelism`` (halves round up), never below ``parallelism`` itself; a multiplier above
1 may grow groups.  The resizing is :mod:`archpass.passes.resize`, applied to all the
groups at once, so the rewrite is exact only when every group that changes grows (zero
padding) and none reaches an op that mixes channels; otherwise it is lossy (shrunk groups
keep their highest-L1 channels).

Domains: ``multiplier`` is a float in ``0.1..2.0`` on a log scale (the range of the
published width-multiplier families, MobileNet 0.35..1.4 and EfficientNet 1.0..2.0, with
room below; beyond 2 the model is a different size class); ``parallelism`` is an integer in
``1..256`` (targets' array widths: 8 for CPUs and the Edge TPU, 32 for the TPU target,
up to 256 for systolic arrays), default 8.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from archpass.structure import Structure

from .base import FloatDomain, GraphResult, IntDomain, Match, Pass, ShapeResult, Site, as_int, as_real, outside, register
from .resize import resize_exact, resize_graph, resize_shapes

DEFAULT_PARALLELISM = 8
MULTIPLIER = FloatDomain(0.1, 2.0, log=True, current=1.0)
PARALLELISM = IntDomain(1, 256, 1, current=DEFAULT_PARALLELISM)


def snap(channels: int, multiplier: float, parallelism: int) -> int:
    """``channels * multiplier`` to the nearest multiple of ``parallelism`` (at least ``parallelism``)."""
    scaled = channels * multiplier / parallelism
    return max(parallelism, int(math.floor(scaled + 0.5)) * parallelism)


def layer_stages(structure: Structure) -> dict[str, str]:
    """The stage id of every layer (see the module doc for layers outside blocks)."""
    if not structure.stages:
        return {}
    in_block = {lid: st.id for st in structure.stages for b in st.blocks for lid in structure.block(b).layers}
    out: dict[str, str] = {}
    pending: list[str] = []
    for l in structure.layers:
        sid = in_block.get(l.id)
        if sid is None:
            pending.append(l.id)
            continue
        for p in pending:
            out[p] = sid
        pending.clear()
        out[l.id] = sid
    last = structure.stages[-1].id
    for p in pending:
        out[p] = last
    return out


def site_groups(structure: Structure, site: str | None) -> list[str]:
    """Ids of the adjustable groups a site covers (see the module doc)."""
    if site is None:
        return [g.id for g in structure.groups if g.adjustable]
    stages = layer_stages(structure)
    return [g.id for g in structure.groups
            if g.adjustable and any(stages.get(m.node) == site for m in g.producers)]


def _number_problem(choice: Mapping[str, Any]) -> str | None:
    if "multiplier" not in choice:
        return "the width_multiplier pass needs a 'multiplier' value"
    extra = set(choice) - {"multiplier", "parallelism"}
    if extra:
        return f"the width_multiplier pass does not take {', '.join(sorted(extra))}"
    m = as_real(choice["multiplier"])
    if m is None or m <= 0:
        return f"multiplier must be a positive number, got {choice['multiplier']!r}"
    p = as_int(choice.get("parallelism", DEFAULT_PARALLELISM))
    if p is None or p < 1:
        return f"parallelism must be a positive integer, got {choice.get('parallelism')!r}"
    return (outside("multiplier", MULTIPLIER, choice["multiplier"])
            or outside("parallelism", PARALLELISM, choice.get("parallelism", DEFAULT_PARALLELISM)))


@register
class WidthMultiplierPass(Pass):
    name = "width_multiplier"
    summary = "scale every adjustable channel group (or one stage's) and snap to a multiple of the parallelism factor"
    exactness = "exact when every group grows, lossy otherwise"
    site_kind = "stage"
    choice_keys = ("multiplier", "parallelism")

    def sites(self, structure: Structure) -> list[Site]:
        domains = {"multiplier": MULTIPLIER, "parallelism": PARALLELISM}
        n_all = len(site_groups(structure, None))
        out = [self.site(None, domains, f"whole model: {n_all} adjustable groups")] if n_all else []
        stages = layer_stages(structure)
        for st in structure.stages:
            n = sum(1 for g in structure.groups if g.adjustable and any(stages.get(m.node) == st.id for m in g.producers))
            if n:
                out.append(self.site(st.id, domains, f"{n} adjustable groups produced in {st.id}"))
        return out

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        if site is not None and not any(st.id == site for st in structure.stages):
            known = ", ".join(st.id for st in structure.stages)
            return f"unknown stage '{site}' (the width_multiplier site is a stage id or none for the whole model; stages: {known or 'none'})"
        why = _number_problem(choice)
        if why:
            return why
        groups = site_groups(structure, site)
        if not groups:
            where = f"stage '{site}'" if site else "the model"
            return f"{where} has no adjustable channel group to scale"
        m = float(choice["multiplier"])
        p = int(choice.get("parallelism", DEFAULT_PARALLELISM))
        sizes = {gid: snap(structure.group(gid).channels, m, p) for gid in groups}
        return self.match(site, choice, sizes=sizes, exact=resize_exact(structure, sizes))

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        sizes = match.found["sizes"]
        result = resize_shapes(structure, sizes)
        return ShapeResult(result, result is not structure, match.found["exact"],
                           {"channels": {gid: structure.group(gid).channels for gid in sizes}},
                           {"channels": dict(sizes)})

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        sizes = match.found["sizes"]
        result = resize_graph(graph, structure, sizes, self.name, match.site)
        return GraphResult(result is not structure, match.found["exact"])
