"""``resolution``: change the static input height/width of the model.

Valid where the network is fully convolutional up to a global pooling: every tensor's
shape is recomputed along the graph (:mod:`archpass.spatial`), and the pass refuses,
naming the node, where a Reshape, a Flatten of a spatial map, a Gemm fed by one, or a
window larger than its input would make the model invalid.  Weights do not change; the
function is not the same (other pixels), so the rewrite counts as **lossy** for
accuracy even though no weight has to be recovered.
"""

from __future__ import annotations

from typing import Any, Mapping

from archpass.passes.base import GraphResult, Pass, ShapeResult, Site, register, tag
from archpass.spatial import SpatialError, propagate_hw
from archpass.structure import Structure


def _hw(choice: Mapping[str, Any]) -> tuple[int, int]:
    return int(choice["height"]), int(choice["width"])


@register
class Resolution(Pass):
    name = "resolution"
    summary = "change the static input height/width (fully convolutional nets up to a global pooling)"
    exactness = "lossy (same weights, different input)"
    site_kind = "model"
    choice_keys = ("height", "width")

    def sites(self, structure: Structure) -> list[Site]:
        hw = structure.input_hw
        if hw is None:
            return []
        why = self._refusal(structure, (max(hw[0] // 2, 1), max(hw[1] // 2, 1)))
        if why:
            return []
        return [Site(self.name, None, {"height": {"min": 1}, "width": {"min": 1}}, f"input is {hw[0]}x{hw[1]}")]

    _last: tuple = (None, None, None)  # (structure, hw, Structure or refusal): check then apply_shapes propagate once

    def _propagate(self, structure: Structure, hw: tuple[int, int]) -> Structure | str:
        s, h, out = self._last
        if s is structure and h == hw:
            return out
        try:
            out = propagate_hw(structure, hw)
        except SpatialError as exc:
            out = str(exc)
        self._last = (structure, hw, out)
        return out

    def _refusal(self, structure: Structure, hw: tuple[int, int]) -> str | None:
        out = self._propagate(structure, hw)
        return out if isinstance(out, str) else None

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> str | None:
        if site is not None:
            return f"resolution applies to the whole model; drop \"site\": \"{site}\""
        missing = [k for k in self.choice_keys if k not in choice]
        if missing:
            return f"resolution needs {' and '.join(missing)}"
        for k in self.choice_keys:
            v = choice[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"{k} must be a positive integer, got {v!r}"
        if structure.input_hw is None:
            return "the model has no NCHW image input"
        why = self._refusal(structure, _hw(choice))
        if why:
            return f"cannot run at {choice['height']}x{choice['width']}: {why}"
        return None

    def apply_shapes(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> ShapeResult:
        before = structure.input_hw
        out = self._propagate(structure, _hw(choice))
        if isinstance(out, str):
            raise SpatialError(out)
        modified = out is not structure
        return ShapeResult(out, modified, not modified, before={"input_hw": list(before)},
                           after={"input_hw": list(_hw(choice))})

    def apply_graph(self, graph, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> GraphResult:
        h, w = _hw(choice)
        changed = False
        for t in graph.inputs:
            if t.shape is not None and len(t.shape) == 4:
                if tuple(t.shape[2:]) != (h, w):
                    t.shape = [t.shape[0], t.shape[1], h, w]
                    changed = True
                for n in t.outputs:
                    tag(n, self.name, None)
                break
        # intermediate shapes are now stale; the engine re-infers every shape after the last rewrite
        return GraphResult(changed, not changed)
