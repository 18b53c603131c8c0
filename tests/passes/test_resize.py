"""passes/resize.py: the one group-resizing implementation (shape and graph paths).

Most of its behaviour is tested through the passes that use it (test_channels.py,
test_width_multiplier.py).  Here: the invariant that made the consumer-weight importance
fallback unreachable (every adjustable group has a producer layer with a constant
weight, also after rewrites), and that a group breaking it is refused, not guessed."""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs
import pytest

from apply_helpers import built, loaded
from archpass.errors import RecipeError
from archpass.passes.engine import plan
from archpass.passes.resize import resize_graph, resize_shapes
from archpass.recipe import Recipe
from builders import NetBuilder


def _assert_every_adjustable_group_has_a_weighted_producer(s):
    layers = {l.id: l for l in s.layers}
    for g in s.groups:
        if not g.adjustable:
            continue
        producers = [layers[m.node] for m in g.producers if m.node in layers]
        assert producers, g.id
        assert all(s.tensors[l.weight].const for l in producers), g.id


def _net():
    b = NetBuilder((1, 3, 16, 16), seed=9).conv(16, 3, 2, act="relu")
    b.ibn(16, expand=3, se="hardsigmoid", act="hardswish").dw(act="relu").conv(24, 1)
    b.concat(lambda b: b.conv(8, 1), lambda b: b.conv(12, 3))
    return b.head(10).build()


def test_invariant_on_built_models_and_after_rewrites():
    _, s = built(_net())
    _assert_every_adjustable_group_has_a_weighted_producer(s)
    dw = next(l.id for l in s.layers if l.depthwise and not any(l.id in b.layers and b.kind == "ibn" for b in s.blocks))
    after = plan(s, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}, {"pass": "dw_to_dense", "site": dw}])).structure
    _assert_every_adjustable_group_has_a_weighted_producer(after)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "googlenet", "shufflenet_v2_x1_0"])
def test_invariant_on_real_models(name):
    _assert_every_adjustable_group_has_a_weighted_producer(loaded(name)[1])


def test_group_without_producer_is_refused_not_guessed():
    """Shrinking ranks channels by the producers' weights; a group without one (which
    analyze never gives) is refused with one line instead of ranking by a guess."""
    model, s = built(_net())
    g = next(g for g in s.groups if g.adjustable and len(g.producers) == 1 and g.channels > 4)
    broken = replace(s, groups=tuple(replace(x, members=tuple(m for m in x.members if m.role != "producer"))
                                     if x.id == g.id else x for x in s.groups))
    graph = gs.import_onnx(model.proto)
    with pytest.raises(RecipeError, match="no producer layer"):
        resize_graph(graph, broken, {g.id: g.channels // 2}, "channels", g.id)
    resize_graph(gs.import_onnx(model.proto), broken, {g.id: g.channels + 4}, "channels", g.id)  # growing needs no ranking


def test_resize_shapes_same_sizes_is_identity():
    _, s = built(_net())
    assert resize_shapes(s, {g.id: g.channels for g in s.groups}) is s
