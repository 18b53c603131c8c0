"""Shared checks for the tests of fuse_ibn, dw_to_dense, resolution and the recipe engine.

``loaded(name)`` loads and analyzes a zoo architecture once per test session;
``apply_checked`` applies a recipe through the engine and checks what every emitted
model must satisfy (checker with full_check, runs in onnxruntime, shape-only path agrees
with the emitted ONNX); ``rel_err`` is the error metric exact rewrites are held to.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx

from archpass.analysis import analyze
from archpass.model import Model, load_model, model_from_proto
from archpass.passes.engine import Applied, apply_recipe, verify_shapes
from archpass.recipe import Recipe
from archpass.structure import Structure
from builders import random_input, run_ort

RTOL = 1e-5


@lru_cache(maxsize=None)
def loaded(name: str) -> tuple[Model, Structure]:
    import zoo

    model = load_model(zoo.model_path(name))
    return model, analyze(model)


def built(proto: onnx.ModelProto) -> tuple[Model, Structure]:
    model = model_from_proto(proto)
    return model, analyze(model)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def run(proto: onnx.ModelProto, shape=None, seed: int = 0) -> list[np.ndarray]:
    inp = proto.graph.input[0]
    if shape is None:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return run_ort(proto, {inp.name: random_input(shape, seed)})


def apply_checked(model: Model, structure: Structure, recipe: Recipe | list) -> Applied:
    """Apply and check: full checker, shape agreement (again, independently of the engine), ORT runs."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.of(recipe)
    applied = apply_recipe(model, recipe, structure=structure)
    onnx.checker.check_model(applied.proto, full_check=True)
    verify_shapes(applied.proto, applied.structure)
    # the emitted model re-analyzes to the same layer geometry after canonicalization too
    reloaded = analyze(model_from_proto(applied.proto))
    assert {l.id: (l.cin, l.cout, l.kernel, l.stride, l.groups, l.in_hw, l.out_hw) for l in reloaded.layers} == {
        l.id: (l.cin, l.cout, l.kernel, l.stride, l.groups, l.in_hw, l.out_hw) for l in applied.structure.layers}
    # ... and to the same channel groups (members, adjustable, channels)
    ours, reanalyzed = groups_as_analyzed(applied)
    assert ours == reanalyzed
    # ... and to the same tensors (shape, constness, element size, channel segments, spatial axes) and
    # nodes, wired the same way.  Not modelled by the shape path: the shapes of constants other than
    # the layers' weights and biases (per-channel parameters, Resize sizes: the graph path edits
    # them; only their names are compared), and a constant several nodes share (onnxslim dedups
    # equal initializers) that the graph path resizes gets a copy per node, '<name>__<node>':
    # compared by its source name.
    again = analyze(applied.proto)
    uses: dict[str, int] = {}
    for n in applied.plan.source.nodes:
        for i in set(n.inputs):
            uses[i] = uses.get(i, 0) + 1
    shared = {i for i, k in uses.items() if k > 1 and i in applied.plan.source.tensors
              and applied.plan.source.tensors[i].const}

    def source_name(name: str, node: str) -> str:
        base = name.rsplit(f"__{node}", 1)[0]
        return base if base != name and base in shared else name

    params = {i for n in applied.structure.nodes if n.layer is not None for i in n.inputs[1:3]}

    def tensor_key(t):
        if t.const and t.name not in params:
            return True
        return t.shape, t.const, t.elem_bytes, t.channel_axis, len(t.segments), t.spatial_axes

    def is_shared(name: str) -> bool:
        return name in shared or name.split("__")[0] in shared

    assert {n: tensor_key(t) for n, t in applied.structure.tensors.items() if not is_shared(n)} == {
        n: tensor_key(t) for n, t in again.tensors.items() if not is_shared(n)}
    assert [(n.name, n.op, n.inputs, n.outputs, n.layer) for n in applied.structure.nodes] == [
        (n.name, n.op, tuple(source_name(i, n.name) for i in n.inputs), n.outputs, n.layer) for n in again.nodes]
    out = run(applied.proto)
    for o, (_, shape) in zip(out, applied.structure.outputs):
        assert o.shape == tuple(shape)
        assert np.all(np.isfinite(o))
    return applied


def assert_exact(model: Model, applied: Applied, rtol: float = RTOL) -> float:
    """Outputs of the rewritten model match the original's (ORT, optimizations disabled)."""
    a, b = run(applied.proto), run(model.proto)
    errs = [rel_err(x, y) for x, y in zip(a, b)]
    assert max(errs) <= rtol, errs
    return max(errs)


def groups_as_analyzed(applied: Applied) -> tuple[list, list]:
    """The channel groups of the shape path and of a re-analysis of the emitted ONNX, id-free:
    (members, adjustable, channels) per group, sorted.  A pass keeps them equal."""
    def key(s: Structure) -> list:
        return sorted((sorted((m.node, m.role, m.offset) for m in g.members), g.adjustable, g.channels) for g in s.groups)

    return key(applied.structure), key(analyze(model_from_proto(applied.proto)))
