"""``resolution``: change the static input height/width of the model.

Valid where the network is fully convolutional up to a global pooling: every tensor's
shape is recomputed along the graph (:mod:`archpass.spatial`; a Resize to another tensor's
size follows that tensor, see :mod:`archpass.sizelinks`, and its sizes constant is
rewritten), and the pass refuses,
naming the node, where a Reshape, a Flatten of a spatial map, a Gemm fed by one, or a
window larger than its input would make the model invalid.  Weights do not change; the
function is not the same (other pixels), so the rewrite counts as **lossy** for
accuracy even though no weight has to be recovered.

Domains: ``height`` and ``width`` are integers from the smallest size the network accepts
(found by bisection with the other side at its current size; 1 for most convolutional
nets, whose padded convs accept any size) up to twice the current size (four times the
pixels, beyond which the cost of a model outgrows any search for a faster one).  A size
inside the domain can still be refused with the node that forbids it, where acceptance is
not monotonic (branches whose rounding disagrees at a Concat or Add).  The site exists
only when the network runs at twice its current size, i.e. does not fix its spatial size.
The propagated Structure travels in the Match, so ``check`` then ``apply_shapes``
propagate once and the pass keeps no state.
"""

from __future__ import annotations

from typing import Any, Mapping

from archpass.passes.base import GraphResult, IntDomain, Match, Pass, ShapeResult, Site, register, tag
from archpass.spatial import SpatialError, propagate_hw
from archpass.structure import Structure

#: The domain's upper bound is GROWTH times the current size (see the module doc).
GROWTH = 2


def _propagate(structure: Structure, hw: tuple[int, int]) -> Structure | str:
    try:
        return propagate_hw(structure, hw)
    except SpatialError as exc:
        return str(exc)


def _smallest(structure: Structure, axis: int, current: tuple[int, int]) -> int:
    """The smallest size along ``axis`` (0 = height, 1 = width; the other at its current
    value) the network accepts, by bisection between 1 and the current size."""
    def ok(x: int) -> bool:
        hw = (x, current[1]) if axis == 0 else (current[0], x)
        return not isinstance(_propagate(structure, hw), str)

    if ok(1):
        return 1
    lo, hi = 1, current[axis]  # lo refused, hi accepted
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def fixed_reason(structure: Structure) -> str | None:
    """Why the model's input size cannot change (None when it can): no 4-D image input, or
    what keeps it from running at twice its current size."""
    hw = structure.input_hw
    if hw is None:
        return "the model has no 4-D image input"
    if structure.post_processing:
        return ("its post-processing (after " + ", ".join(structure.post_processing[:2]) +
                f"{', ...' if len(structure.post_processing) > 2 else ''}) may hold sizes computed for this input size")
    out = _propagate(structure, (GROWTH * hw[0], GROWTH * hw[1]))
    return out if isinstance(out, str) else None


def domains(structure: Structure) -> dict[str, IntDomain] | None:
    """The height/width domains of the resolution site, or None when the network fixes its
    spatial size (it cannot run at twice its current size)."""
    hw = structure.input_hw
    if fixed_reason(structure) is not None:
        return None
    return {"height": IntDomain(_smallest(structure, 0, hw), GROWTH * hw[0], 1, hw[0]),
            "width": IntDomain(_smallest(structure, 1, hw), GROWTH * hw[1], 1, hw[1])}


@register
class Resolution(Pass):
    name = "resolution"
    summary = "change the static input height/width (fully convolutional nets up to a global pooling)"
    exactness = "lossy (same weights, different input)"
    site_kind = "model"
    choice_keys = ("height", "width")

    def sites(self, structure: Structure) -> list[Site]:
        dom = domains(structure)
        if dom is None:
            return []
        hw = structure.input_hw
        return [self.site(None, dom, f"input is {hw[0]}x{hw[1]}")]

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        if site is not None:
            return f"resolution applies to the whole model; drop \"site\": \"{site}\""
        missing = [k for k in self.choice_keys if k not in choice]
        if missing:
            return f"resolution needs {' and '.join(missing)}"
        for k in self.choice_keys:
            v = choice[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"{k} must be a positive integer, got {v!r}"
        hw0 = structure.input_hw
        if hw0 is None:
            return "the model has no 4-D image input"
        hw = (choice["height"], choice["width"])
        for k, v, cur in zip(self.choice_keys, hw, hw0):
            if v > GROWTH * cur:
                return f"{k} must be at most {GROWTH * cur} ({GROWTH}x the current {cur}), got {v}"
        out = _propagate(structure, hw)
        if isinstance(out, str):
            return f"cannot run at {hw[0]}x{hw[1]}: {out}"
        return self.match(site, choice, hw=hw, structure=out)

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        out = match.found["structure"]
        modified = out is not structure
        return ShapeResult(out, modified, not modified, before={"input_hw": list(structure.input_hw)},
                           after={"input_hw": list(match.found["hw"])})

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        h, w = match.found["hw"]
        h_axis, w_axis = structure.input_hw_axes
        changed = False
        for t in graph.inputs:
            if len(t.shape) == 4:  # loading pinned every input's shape
                if (t.shape[h_axis], t.shape[w_axis]) != (h, w):
                    shape = list(t.shape)
                    shape[h_axis], shape[w_axis] = h, w
                    t.shape = shape
                    changed = True
                for n in t.outputs:
                    tag(n, self.name, None)
                break
        changed |= _write_linked_sizes(graph, structure, match.found["structure"], self.name)
        # intermediate shapes are now stale; the engine re-infers every shape after the last rewrite
        return GraphResult(changed, not changed)


def _write_linked_sizes(graph, before: Structure, after: Structure, pass_name: str) -> bool:
    """Give every Resize whose sizes the source computed from other tensors' dims
    (``sizes_from``, :mod:`archpass.sizelinks`) the spatial sizes of its new output; its
    batch and channel entries stay as the graph has them (a channel pass may have changed
    them).  Returns whether a constant changed."""
    import numpy as np
    import onnx_graphsurgeon as gs

    linked = {n.outputs[0]: n for n in before.nodes if n.attr("sizes_from") and n.outputs}
    if not linked:
        return False
    taken = set(graph.tensors())
    changed = False
    for gn in graph.nodes:
        if gn.op != "Resize" or not gn.outputs or gn.outputs[0].name not in linked or len(gn.inputs) < 4:
            continue
        old = gn.inputs[3]
        if not isinstance(old, gs.Constant):
            continue
        values = np.array(old.values, dtype=np.int64).copy()
        new = after.tensors[gn.outputs[0].name].shape
        if tuple(values[2:]) == tuple(new[2:]):
            continue
        values[2:] = new[2:]
        # its sole user keeps the name, a shared one gets a copy '<name>__<node>' (as the channel passes do)
        name = old.name if len(old.outputs) == 1 else f"{old.name}__{gn.name}"
        base, k = name, 1
        while len(old.outputs) > 1 and name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        gn.inputs[3] = gs.Constant(name, values)
        tag(gn, pass_name, None)
        changed = True
    return changed
