"""Applying a recipe: validation and the shape-only path, then the ONNX path.

:func:`plan` validates a recipe against an analyzed :class:`Structure` and applies
every rewrite to the structure alone (``Pass.check``, once per rewrite, then
``Pass.apply_shapes`` with the :class:`Match` it returned), so a bad recipe is refused
before any ONNX is touched.  Each :class:`Step` keeps its Match.  Site ids are those of the input
model; passes keep ids stable, so they still resolve after earlier rewrites.
:func:`apply_recipe_shapes` is that path for the search (no ONNX, no weights).

:func:`apply_recipe` then replays the validated steps on an onnx-graphsurgeon graph
(``Pass.apply_graph`` with the step's Match), runs one ``cleanup().toposort()``, exports, re-infers shapes,
writes provenance (node ``doc_string`` and the ``archpass.provenance`` metadata map)
and the record of applied rewrites (:mod:`archpass.record`), runs
``onnx.checker.check_model(full_check=True)`` and verifies that every layer of the
emitted ONNX has exactly the shape the shape-only path predicted.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

import archpass
from archpass.analysis import analyze
from archpass.errors import RecipeError
from archpass.model import Model
from archpass.passes.base import Match, Pass, ShapeResult, provenance, registry
from archpass.recipe import Recipe, Rewrite
from archpass.record import read_provenance, read_record, write_provenance, write_record
from archpass.structure import Layer, Structure

_KIND_LOOKUP = {"block": "has_block", "group": "has_group", "layer": "has_layer"}
_KIND_IDS = {"block": "blocks", "group": "groups", "layer": "layers"}


@dataclass(frozen=True)
class Step:
    """One validated rewrite: the structure it applies to, what ``check`` found there and
    its shape-only result."""

    index: int
    rewrite: Rewrite
    pass_: Pass
    before: Structure
    result: ShapeResult
    match: Match

    def record(self, exact: bool | None = None) -> dict:
        r = self.rewrite
        return {
            "pass": r.pass_name,
            "site": r.site,
            "choice": {k: v for k, v in r.to_json().items() if k not in ("pass", "site")},
            "exact": self.result.exact if exact is None else exact,
            "before": dict(self.result.before),
            "after": dict(self.result.after),
        }


@dataclass(frozen=True)
class Plan:
    source: Structure
    recipe: Recipe
    steps: tuple[Step, ...]

    @property
    def structure(self) -> Structure:
        return self.steps[-1].result.structure if self.steps else self.source


def _nearest(site: str, ids: list[str]) -> list[str]:
    close = difflib.get_close_matches(site, ids, n=3, cutoff=0.5)
    if close:
        return close
    m = re.search(r"(\d+)$", site)
    if m:  # numbered ids (block7, group12): show the valid range
        same = [i for i in ids if re.sub(r"\d+$", "", i) == site[: m.start()]]
        if same:
            return [same[0], same[-1]]
    return ids[:3]


def _site_error(i: int, rw: Rewrite, p: Pass, s: Structure, source: Structure, steps: list[Step]) -> RecipeError:
    kind = p.site_kind
    ids = [x.id for x in getattr(s, _KIND_IDS[kind])]
    where = f"rewrite #{i} ({rw.pass_name})"
    if rw.site is None:
        return RecipeError(f"{where} needs a \"site\": a {kind} id",
                           f"e.g. {', '.join(_nearest(kind, ids)) or 'none in this model'} (see `archpass inspect --json`)")
    if getattr(source, _KIND_LOOKUP[kind])(rw.site):
        by = next((st for st in reversed(steps) if not getattr(st.result.structure, _KIND_LOOKUP[kind])(rw.site)), None)
        cause = f" by rewrite #{by.index} ({by.rewrite.describe()})" if by else ""
        return RecipeError(f"{where}: {kind} '{rw.site}' no longer exists: it was rewritten away{cause}",
                           "reorder or drop one of the two rewrites")
    near = _nearest(rw.site, ids)
    return RecipeError(f"{where}: unknown site '{rw.site}': expected a {kind} id of this model",
                       f"nearest: {', '.join(near)} (see `archpass inspect --json`)" if near else "this model has none")


def _already_applied(recipe: Recipe, previous: list[dict]) -> None:
    seen = {json.dumps({"pass": r.get("pass"), "site": r.get("site"), "choice": r.get("choice") or {}}, sort_keys=True)
            for r in previous}
    for i, rw in enumerate(recipe):
        key = json.dumps({"pass": rw.pass_name, "site": rw.site,
                          "choice": {k: v for k, v in rw.to_json().items() if k not in ("pass", "site")}}, sort_keys=True)
        if key in seen:
            raise RecipeError(f"rewrite #{i} ({rw.describe()}) was already applied to this model (see its archpass record)",
                              "apply the recipe to the source model instead of its rewritten output")


def plan(structure: Structure, recipe: Recipe, *, previous: list[dict] | None = None) -> Plan:
    """Validate ``recipe`` on ``structure`` and apply it shape-only; raises RecipeError."""
    if previous:
        _already_applied(recipe, previous)
    reg = registry()
    steps: list[Step] = []
    s = structure
    seen: dict[tuple[str, str | None], int] = {}
    for i, rw in enumerate(recipe):
        if rw.pass_name not in reg:
            near = difflib.get_close_matches(rw.pass_name, list(reg), n=1)
            raise RecipeError(f"rewrite #{i}: unknown pass '{rw.pass_name}'"
                              + (f" (did you mean '{near[0]}'?)" if near else ""),
                              f"known passes: {', '.join(reg)}")
        p = reg[rw.pass_name]
        extra = sorted(set(rw.choice) - set(p.choice_keys))
        if extra:
            raise RecipeError(f"rewrite #{i} ({rw.pass_name}): unknown key(s) {', '.join(repr(k) for k in extra)}",
                              f"{rw.pass_name} takes " + (", ".join(("site",) + tuple(p.choice_keys)) if p.site_kind != "model"
                                                          else ", ".join(p.choice_keys) or "no keys"))
        key = (rw.pass_name, rw.site)
        if key in seen:
            raise RecipeError(f"rewrite #{i} ({rw.describe()}) conflicts with rewrite #{seen[key]}: "
                              f"{rw.pass_name} on {rw.site or 'the model'} twice",
                              "keep one of them")
        seen[key] = i
        if p.site_kind in _KIND_LOOKUP and (rw.site is None or not getattr(s, _KIND_LOOKUP[p.site_kind])(rw.site)):
            raise _site_error(i, rw, p, s, structure, steps)
        match = p.check(s, rw.site, rw.choice)
        if not isinstance(match, Match):
            raise RecipeError(f"rewrite #{i} ({rw.describe()}): {match}", "change or drop this rewrite")
        res = p.apply_shapes(s, match)
        steps.append(Step(i, rw, p, s, res, match))
        s = res.structure
    return Plan(structure, recipe, tuple(steps))


def apply_recipe_shapes(structure: Structure, recipe: Recipe | list | dict) -> Structure:
    """The structure ``recipe`` produces, without ONNX or weights (what the search scores)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_json(recipe) if isinstance(recipe, dict) else Recipe.of(recipe)
    return plan(structure, recipe).structure


# ---------------------------------------------------------------------------- ONNX path
@dataclass(frozen=True)
class Applied:
    proto: onnx.ModelProto
    plan: Plan
    rewrites: tuple[dict, ...]  # record entries of this application
    #: for each resized channel group: the source channel of every new channel (-1 = padding)
    channel_maps: Mapping[str, np.ndarray]

    @property
    def structure(self) -> Structure:
        return self.plan.structure


def _geometry(l: Layer) -> tuple:
    return (l.op, l.cin, l.cout, l.kernel, l.stride, l.groups, l.in_hw, l.out_hw, l.pads, l.dilation, l.bias)


def verify_shapes(proto: onnx.ModelProto, expected: Structure) -> None:
    """Raise AssertionError unless every layer and every activation tensor of ``proto`` has the
    geometry and shape ``expected`` predicts."""
    got = analyze(proto)
    want = {l.id: _geometry(l) for l in expected.layers}
    have = {l.id: _geometry(l) for l in got.layers}
    if set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise AssertionError(f"layers differ between the emitted ONNX and the shape-only structure: "
                             f"missing {missing[:3]}, unexpected {extra[:3]}")
    for lid, g in want.items():
        if have[lid] != g:
            raise AssertionError(f"layer '{lid}': emitted ONNX has {have[lid]}, shape-only structure {g}")
    for name, t in expected.tensors.items():
        other = got.tensors.get(name)
        if other is not None and not t.const and other.shape != t.shape:
            raise AssertionError(f"tensor '{name}': emitted ONNX has shape {other.shape}, shape-only structure {t.shape}")
    if tuple(got.outputs) != tuple(expected.outputs):
        raise AssertionError(f"outputs: emitted ONNX {got.outputs}, shape-only structure {expected.outputs}")


def _reinfer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop every stale intermediate/output shape and infer them again (strict); the declared
    shapes of opaque custom ops stay."""
    from archpass.model import declared_custom_shapes, infer_shapes

    declared = declared_custom_shapes(proto)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(declared)
    for vi in proto.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            d.Clear()
    return infer_shapes(proto)


def _check_full(proto: onnx.ModelProto) -> None:
    """``check_model(full_check=True)``; above the 2 GB protobuf limit through a temporary
    copy saved with external data, checked by path (the only way the checker takes it)."""
    from archpass.model import is_large

    if not is_large(proto):
        onnx.checker.check_model(proto, full_check=True)
        return
    import tempfile
    from pathlib import Path

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the tensors it saves
    with tempfile.TemporaryDirectory(prefix="archpass-check-") as d:
        path = Path(d) / "model.onnx"
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        onnx.checker.check_model(str(path), full_check=True)


def apply_recipe(model: Model, recipe: Recipe, *, structure: Structure | None = None, verify: bool = True,
                 allow_growth: bool = False) -> Applied:
    """Rewrite ``model`` (never modified) by ``recipe``; returns the checked output proto.
    An output out of proportion with the input is refused before anything is allocated
    (:mod:`archpass.limits`; ``allow_growth`` lifts the growth and 2 GB limits)."""
    import onnx_graphsurgeon as gs

    from archpass.limits import check_output_size, predict_output_size
    from archpass.model import weight_bytes

    if structure is None:
        structure = analyze(model)
    previous = read_record(model.proto)
    pl = plan(structure, recipe, previous=previous["rewrites"] if previous else None)
    check_output_size(predict_output_size(weight_bytes(model.proto), structure, pl.structure), allow_growth=allow_growth)
    graph = gs.import_onnx(model.proto)
    entries = []
    for st in pl.steps:
        gr = st.pass_.apply_graph(graph, st.before, st.match)
        if gr.exact != st.result.exact:
            raise AssertionError(f"{st.rewrite.pass_name}: graph and shape paths disagree on exactness")
        entries.append(st.record(gr.exact))
    graph.cleanup().toposort()
    tags = {n.name: provenance(n) for n in graph.nodes if provenance(n)}
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = model.proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.proto.opset_import)
    out.producer_name = model.proto.producer_name
    out.producer_version = model.proto.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.proto.metadata_props)
    out = _reinfer(out)
    prov = read_provenance(model.proto)
    for name, labels in tags.items():
        prov[name] = prov.get(name, []) + [x for x in labels if x not in prov.get(name, [])]
    for n in out.graph.node:
        if n.name in prov:
            n.doc_string = "archpass: " + ", ".join(prov[n.name])
    write_record(
        out,
        version=archpass.__version__,
        source_sha256=(previous or {}).get("source_sha256") or model.sha256,
        rewrites=(previous["rewrites"] if previous else []) + entries,
        recipe=recipe.to_json() if not previous else {"rewrites": (previous.get("recipe") or {}).get("rewrites", []) + recipe.to_json()["rewrites"]},
    )
    write_provenance(out, prov)
    _check_full(out)
    if verify:
        verify_shapes(out, pl.structure)
    from archpass.passes.resize import CHANNEL_MAPS_ATTR

    return Applied(out, pl, tuple(entries), dict(vars(graph).get(CHANNEL_MAPS_ATTR, {})))


def describe_passes() -> list[dict]:
    return [{"name": p.name, "summary": p.summary, "exactness": p.exactness, "site_kind": p.site_kind,
             "choice_keys": list(p.choice_keys)} for p in registry().values()]
