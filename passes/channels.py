"""`channels`: set the channel count of one channel group.

A channel group (see :mod:`archpass.analysis`) is a set of tensor channel dimensions that
must change together.  The resizing itself (every node that touches the group, why
rounding up is exact and rounding down keeps the highest-L1 channels) is
:mod:`archpass.passes.resize`, shared with ``width_multiplier``.

Domain: ``channels`` is an integer in ``1..max(4 * current, 64)``.  Four times the
current count covers every width the search explores (width multipliers up to 2 with
room to snap to a parallelism factor), and the floor of 64 lets a thin group (3 or 8
channels) still round up to any common parallelism factor (8, 16, 32, 64).  Larger
values are refused by ``check``: they are out of proportion with the model (a
``channels: 1000000000`` rewrite would otherwise try to allocate gigabytes).
"""

from __future__ import annotations

from typing import Any, Mapping

from archpass.structure import Structure

from .base import GraphResult, IntDomain, Match, Pass, ShapeResult, Site, as_int, register
from .resize import mixing_reason, resize_exact, resize_graph, resize_shapes

#: The domain's upper bound is max(GROWTH * current, FLOOR) channels (see the module doc).
GROWTH = 4
FLOOR = 64


def channels_domain(current: int) -> IntDomain:
    return IntDomain(1, max(GROWTH * current, FLOOR), 1, current)


def group_problem(structure: Structure, site: str | None) -> str | None:
    """Why ``site`` is not an adjustable channel group of ``structure`` (None when it is)."""
    if site is None:
        return "the channels pass needs a channel group site such as 'group3'"
    if not structure.has_group(site):
        known = [g.id for g in structure.groups if g.adjustable]
        hint = f" (adjustable groups: {', '.join(known[:8])}{'...' if len(known) > 8 else ''})" if known else ""
        return f"unknown channel group '{site}'{hint}"
    g = structure.group(site)
    if not g.adjustable:
        return f"channel group '{site}' is not adjustable: {g.reason}"
    return None


@register
class ChannelsPass(Pass):
    name = "channels"
    summary = "set the channel count of one channel group (pads with zero channels, or keeps the highest-L1 channels)"
    exactness = "exact when rounding up, lossy when rounding down"
    site_kind = "group"
    choice_keys = ("channels",)

    def sites(self, structure: Structure) -> list[Site]:
        out = []
        for g in structure.groups:
            if not g.adjustable:
                continue
            why = mixing_reason(structure, g)
            note = f"{g.channels} channels" + (f"; lossy even when rounding up: {why}" if why else "")
            out.append(self.site(g.id, {"channels": channels_domain(g.channels)}, note))
        return out

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        why = group_problem(structure, site)
        if why:
            return why
        if "channels" not in choice:
            return "the channels pass needs a 'channels' value"
        extra = set(choice) - {"channels"}
        if extra:
            return f"the channels pass does not take {', '.join(sorted(extra))}"
        value = as_int(choice["channels"])
        if value is None or value < 1:
            return f"channels must be a positive integer, got {choice['channels']!r}"
        old = structure.group(site).channels
        dom = channels_domain(old)
        if not dom.contains(value):
            return (f"channels must be at most {dom.high} for group '{site}' ({GROWTH}x its {old} channels, "
                    f"at least {FLOOR}), got {value}")
        sizes = {site: value}
        return self.match(site, choice, group=site, old=old, new=value, exact=resize_exact(structure, sizes))

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        f = match.found
        result = resize_shapes(structure, {f["group"]: f["new"]})
        return ShapeResult(result, f["old"] != f["new"], f["exact"],
                           {"group": f["group"], "channels": f["old"]}, {"group": f["group"], "channels": f["new"]})

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        f = match.found
        resize_graph(graph, structure, {f["group"]: f["new"]}, self.name, f["group"])
        return GraphResult(f["old"] != f["new"], f["exact"])
