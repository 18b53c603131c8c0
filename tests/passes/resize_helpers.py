"""Shared checks for the channel-resizing passes' tests (channels, width_multiplier).

``rewrite`` applies rewrites through the recipe engine (shape-only plan, then the
onnx-graphsurgeon path, export, checker); ``assert_shapes_agree`` is stricter than the
engine's own layer check: it also compares every channel group (size, members, Concat
offsets), every activation tensor's shape and every layer weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from apply_helpers import RTOL, built, loaded, rel_err  # noqa: F401  (re-exported for the tests)
from archpass.analysis import analyze
from archpass.model import Model, model_from_proto
from archpass.passes.base import ShapeResult
from archpass.passes.engine import apply_recipe
from archpass.recipe import Recipe
from archpass.structure import Structure
from builders import random_input, run_ort


@dataclass
class Rewritten:
    proto: onnx.ModelProto
    shapes: ShapeResult  # the shape-only result
    exact: bool  # what the graph path reported (the engine checks it equals shapes.exact)


def rewrite(model: Model, structure: Structure, steps) -> tuple[onnx.ModelProto, list[ShapeResult], list[bool]]:
    """Apply ``steps`` = [(pass, site, choice), ...] as one recipe through the engine."""
    recipe = Recipe.of([{"pass": p, **({"site": site} if site is not None else {}), **choice} for p, site, choice in steps])
    applied = apply_recipe(model, recipe, structure=structure)
    return applied.proto, [st.result for st in applied.plan.steps], [r["exact"] for r in applied.rewrites]


def rewrite_one(model: Model, structure: Structure, name: str, site, choice) -> Rewritten:
    out, srs, exact = rewrite(model, structure, [(name, site, choice)])
    return Rewritten(out, srs[0], exact[0])


def feeds(structure: Structure, seed: int = 0) -> dict[str, np.ndarray]:
    return {n: random_input(shape, seed) for n, shape in structure.inputs}


def outputs(proto: onnx.ModelProto, structure: Structure) -> list[np.ndarray]:
    """Check with full_check and run in onnxruntime (graph optimizations disabled)."""
    onnx.checker.check_model(proto, full_check=True)
    out = run_ort(proto, feeds(structure))
    assert all(np.all(np.isfinite(o)) for o in out)
    return out


def assert_same_function(original: onnx.ModelProto, rewritten: onnx.ModelProto, structure: Structure) -> None:
    ref = run_ort(original, feeds(structure))
    got = outputs(rewritten, structure)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert rel_err(a, b) <= RTOL, rel_err(a, b)


def _group_key(g):
    return g.id, g.channels, g.adjustable, sorted((m.node, m.role, m.offset) for m in g.members)


def assert_shapes_agree(predicted: Structure, emitted: onnx.ModelProto) -> Structure:
    """The shape-only result equals the analysis of the emitted ONNX: every layer's
    geometry, every channel group (size, members, offsets), every activation's shape and
    every layer weight's shape."""
    actual = analyze(model_from_proto(emitted, canonical=False))
    geo = lambda l: (l.id, l.op, l.cin, l.cout, l.kernel, l.stride, l.groups, l.in_hw, l.out_hw, l.in_groups, l.out_group)
    assert [geo(l) for l in actual.layers] == [geo(l) for l in predicted.layers]
    assert [_group_key(g) for g in actual.groups] == [_group_key(g) for g in predicted.groups]
    for name, t in actual.tensors.items():
        if not t.const:
            assert predicted.tensors[name].shape == t.shape, name
    for l in predicted.layers:
        assert predicted.tensors[l.weight].shape == param(emitted, l.id, 1).shape, l.id
    assert predicted.outputs == actual.outputs
    return actual


def node(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name == name)


def param(proto: onnx.ModelProto, node_name: str, i: int) -> np.ndarray:
    """Input ``i`` of node ``node_name`` (an initializer)."""
    name = node(proto, node_name).input[i]
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
