"""`width_multiplier`: scale the channel groups of the whole model, or of one stage.

Site ``None`` scales every adjustable channel group; site ``stage<N>`` scales the
adjustable groups that have at least one producer among the layers of that stage's
blocks.  Each group's new size is ``channels * multiplier`` rounded to the nearest
multiple of ``parallelism`` (halves round up), never below ``parallelism`` itself; a
multiplier above 1 may grow groups.  The resizing is the `channels` pass's, applied to
all the groups at once, so the rewrite is exact only when every group that changes
grows (zero padding) and none reaches an op that mixes channels; otherwise it is lossy
(shrunk groups keep their highest-L1 channels, see :mod:`archpass.passes.channels`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from archpass.errors import RecipeError
from archpass.structure import Structure

from .base import GraphResult, Pass, ShapeResult, Site, register
from .channels import resize_exact, resize_graph, resize_shapes

DEFAULT_PARALLELISM = 8


def snap(channels: int, multiplier: float, parallelism: int) -> int:
    """``channels * multiplier`` to the nearest multiple of ``parallelism`` (at least ``parallelism``)."""
    scaled = channels * multiplier / parallelism
    return max(parallelism, int(math.floor(scaled + 0.5)) * parallelism)


def site_groups(structure: Structure, site: str | None) -> list[str]:
    """Ids of the adjustable groups a site covers (see the module doc)."""
    if site is None:
        return [g.id for g in structure.groups if g.adjustable]
    stage = next(st for st in structure.stages if st.id == site)
    layers = {lid for b in stage.blocks for lid in structure.block(b).layers}
    return [g.id for g in structure.groups if g.adjustable and any(m.node in layers for m in g.producers)]


def _number_problem(choice: Mapping[str, Any]) -> str | None:
    if "multiplier" not in choice:
        return "the width_multiplier pass needs a 'multiplier' value"
    extra = set(choice) - {"multiplier", "parallelism"}
    if extra:
        return f"the width_multiplier pass does not take {', '.join(sorted(extra))}"
    m = choice["multiplier"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        return f"multiplier must be a positive number, got {m!r}"
    p = choice.get("parallelism", DEFAULT_PARALLELISM)
    if isinstance(p, float) and p.is_integer():
        p = int(p)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        return f"parallelism must be a positive integer, got {p!r}"
    return None


@register
class WidthMultiplierPass(Pass):
    name = "width_multiplier"
    summary = "scale every adjustable channel group (or one stage's) and snap to a multiple of the parallelism factor"
    exactness = "exact when every group grows, lossy otherwise"
    site_kind = "model"
    choice_keys = ("multiplier", "parallelism")

    def sites(self, structure: Structure) -> list[Site]:
        allows = {"multiplier": {"min_exclusive": 0.0}, "parallelism": {"min": 1, "default": DEFAULT_PARALLELISM}}
        n_all = len(site_groups(structure, None))
        out = [Site(self.name, None, allows, f"whole model: {n_all} adjustable groups")] if n_all else []
        for st in structure.stages:
            n = len(site_groups(structure, st.id))
            if n:
                out.append(Site(self.name, st.id, allows, f"{n} adjustable groups produced in {st.id}"))
        return out

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> str | None:
        if site is not None and not any(st.id == site for st in structure.stages):
            known = ", ".join(st.id for st in structure.stages)
            return f"unknown stage '{site}' (the width_multiplier site is a stage id or none for the whole model; stages: {known or 'none'})"
        why = _number_problem(choice)
        if why:
            return why
        if not site_groups(structure, site):
            where = f"stage '{site}'" if site else "the model"
            return f"{where} has no adjustable channel group to scale"
        return None

    def sizes(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> dict[str, int]:
        """The new size of every group the rewrite covers (validates first)."""
        why = self.check(structure, site, choice)
        if why:
            raise RecipeError(why)
        m = float(choice["multiplier"])
        p = int(choice.get("parallelism", DEFAULT_PARALLELISM))
        return {gid: snap(structure.group(gid).channels, m, p) for gid in site_groups(structure, site)}

    def _summary(self, structure: Structure, sizes: Mapping[str, int], new: bool) -> dict:
        return {gid: (n if new else structure.group(gid).channels) for gid, n in sizes.items()}

    def apply_shapes(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> ShapeResult:
        sizes = self.sizes(structure, site, choice)
        result = resize_shapes(structure, sizes)
        return ShapeResult(result, result is not structure, resize_exact(structure, sizes),
                           {"channels": self._summary(structure, sizes, False)},
                           {"channels": self._summary(structure, sizes, True)})

    def apply_graph(self, graph, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> GraphResult:
        sizes = self.sizes(structure, site, choice)
        result = resize_graph(graph, structure, sizes, self.name, site)
        return GraphResult(result is not structure, resize_exact(structure, sizes))
