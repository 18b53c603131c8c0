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


def _op_net(kind: str):
    """conv0 (8 channels, the group grown) -> the op under test -> a consumer, on a 1x4x8x8 input."""
    import numpy as np

    rng = np.random.default_rng(11)
    b = NetBuilder((1, 4, 8, 8), seed=11)

    def const(name, shape):
        return b.tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    if kind == "conv_without_bias_or_group_attr":
        b.x = b.node("Relu", [b.node("Conv", [b.x, const("c0_w", (8, 4, 3, 3))], "conv0", pads=[1, 1, 1, 1])], "r0")
        b.shape = [1, 8, 8, 8]
        return b.conv(6, 3, act=None, bias=False, name="cons").build()
    b.conv(8, 3, act="relu", name="conv0")
    if kind == "lrn":
        b.x = b.node("LRN", [b.x], "lrn", size=3)
        b.conv(6, 1, act=None, name="cons")
    elif kind == "resize_sizes":
        sizes = b.tensor("sizes", np.array([1, 8, 16, 16], np.int64))
        b.x = b.node("Resize", [b.x, "", "", sizes], "up", mode="nearest")
        b.shape = [1, 8, 16, 16]
        b.conv(6, 1, act=None, name="cons")
    elif kind in ("gemm_without_c", "matmul"):
        b.x = b.node("GlobalAveragePool", [b.x], "pool")
        b.x = b.node("Flatten", [b.x], "flat", axis=1)
        if kind == "gemm_without_c":  # (cin, cout) weights (transB=0), no bias
            b.x = b.node("Gemm", [b.x, const("fc1_w", (8, 16))], "fc1")
        else:
            b.x = b.node("MatMul", [b.x, const("fc1_w", (8, 16))], "fc1")
        b.x = b.node("Relu", [b.x], "fc1_act")
        b.x = b.node("Gemm", [b.x, const("fc2_w", (5, 16)), const("fc2_b", (5,))], "fc2", transB=1)
        b.shape = [1, 5]
    elif kind == "layernorm_channels_last":  # ConvNeXt style: LayerNorm (default axis -1, no bias) on NHWC
        b.x = b.node("Transpose", [b.x], "to_nhwc", perm=[0, 2, 3, 1])
        ln_w = b.tensor("ln_w", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32))
        b.x = b.node("LayerNormalization", [b.x, ln_w], "ln")
        b.x = b.node("Transpose", [b.x], "to_nchw", perm=[0, 3, 1, 2])
        b.conv(6, 1, act=None, name="cons")
    elif kind == "instancenorm":
        b.x = b.node("InstanceNormalization", [b.x, const("in_s", (8,)), const("in_b", (8,))], "inorm")
        b.conv(6, 1, act=None, name="cons")
    elif kind == "resize_scales":  # Resize(x, roi, scales): three inputs, nothing to edit
        scales = b.tensor("scales", np.array([1, 1, 2, 2], np.float32))
        b.x = b.node("Resize", [b.x, "", scales], "up", mode="nearest")
        b.shape = [1, 8, 16, 16]
        b.conv(6, 1, act=None, name="cons")
    elif kind.startswith("gemm_c"):  # Gemm fc1 with a bias C: (1, 16) 2-D; (2,) on 2 outputs; 12x12 (cin, cout) once conv0 grew
        b.x = b.node("Flatten", [b.node("GlobalAveragePool", [b.x], "pool")], "flat", axis=1)
        w, c, tb = {"gemm_c_2d": ((16, 8), (1, 16), 1), "gemm_c_two_outputs": ((2, 8), (2,), 1),
                    "gemm_c_square": ((8, 12), (12,), 0), "gemm_c_one_output": ((1, 8), (1,), 1)}[kind]
        b.x = b.node("Gemm", [b.x, const("fc1_w", w), const("fc1_b", c)], "fc1", transB=tb)
        b.x = b.node("Relu", [b.x], "fc1_act")
        b.x = b.node("Gemm", [b.x, const("fc2_w", (5, c[-1])), const("fc2_b", (5,))], "fc2", transB=1)
        b.shape = [1, 5]
    return b.build()


@pytest.mark.parametrize("kind,exact", [("instancenorm", True), ("resize_scales", True), ("gemm_c_2d", True),
                                        ("gemm_c_two_outputs", True), ("gemm_c_square", True), ("gemm_c_one_output", True),
                                        ("lrn", False), ("resize_sizes", True), ("conv_without_bias_or_group_attr", True),
                                        ("gemm_without_c", True), ("matmul", True), ("layernorm_channels_last", False)])
def test_growing_a_group_through_each_op(kind, exact):
    """The group conv0 produces grows 8 -> 12 (and 16 -> 24 for the fully connected layer): padding
    is exact unless an op mixes the channels (LRN across neighbours, LayerNorm over them); the
    emitted model checks, runs, and re-analyzes to the shape path (apply_checked)."""
    from apply_helpers import apply_checked, assert_exact

    model, s = built(_op_net(kind))
    recipe = [{"pass": "channels", "site": s.layer("conv0").out_group, "channels": 12}]
    if kind in ("gemm_without_c", "matmul") or kind.startswith("gemm_c"):
        fc1 = s.layer("fc1").cout
        recipe.append({"pass": "channels", "site": s.layer("fc1").out_group, "channels": fc1 + max(fc1 // 2, 1)})
    applied = apply_checked(model, s, recipe)
    assert [r["exact"] for r in applied.rewrites] == [exact] * len(recipe)
    if exact:
        assert_exact(model, applied)
    assert applied.structure.layer("conv0").cout == 12
    assert all(type(d) is int for t in applied.structure.tensors.values() for d in t.shape)  # JSON shows "12", not "12.0"


def test_an_lrn_on_another_group_keeps_growing_exact():
    """LRN mixes the channels of the group it reads (conv0's) only: growing the next group is exact."""
    from apply_helpers import apply_checked, assert_exact

    b = NetBuilder((1, 4, 8, 8), seed=16).conv(8, 3, act="relu", name="conv0")
    b.x = b.node("LRN", [b.x], "lrn", size=3)
    model, s = built(b.conv(6, 1, act="relu", name="mid").conv(5, 1, act=None, name="cons").build())
    applied = apply_checked(model, s, [{"pass": "channels", "site": s.layer("mid").out_group, "channels": 9}])
    assert applied.rewrites[0]["exact"] is True
    assert_exact(model, applied)


def _concat_split_net(split: str | None = None, slice_: bool = False, opset: int = 17):
    """a (4 channels) and b (8) from the input, Concat [b, a, b, b] (b three times), then a Split of
    it back into its four parts (``split``: "input" sizes, or None: equal parts, unnamed, at ``opset``),
    or a Slice of the last b (two axes, no axes input), or else a BatchNormalization; then a 1x1 conv."""
    import numpy as np
    from onnx import helper

    b = NetBuilder((1, 3, 8, 8), seed=17)
    x = b.x
    a = b.conv(4, 3, act="relu", name="a").x
    b.x, b.shape = x, [1, 3, 8, 8]
    bb = b.conv(4 if split == "equal" else 8, 3, act="relu", name="b").x
    b.x = b.node("Concat", [bb, a, bb, bb], "cat", axis=1)
    c = 16 if split == "equal" else 28
    b.shape = [1, c, 8, 8]
    if split is not None:
        outs = ["sp_split", "sp_a", "sp_b", "sp_c"]  # "sp_split" is also the first name a sizes input would take
        ins = [b.x] if split == "equal" else [b.x, b.tensor("sizes", np.array([8, 4, 8, 8], np.int64))]
        b.nodes.append(helper.make_node("Split", ins, outs, name="sp", axis=1))
        b.x = b.node("Concat", [outs[2], outs[0], outs[1], outs[3]], "cat2", axis=1)
    elif slice_:
        starts, ends = b.tensor("starts", np.array([0, 20], np.int64)), b.tensor("ends", np.array([1, 28], np.int64))
        b.x = b.node("Slice", [b.x, starts, ends], "sl")
        b.shape = [1, 8, 8, 8]
    else:
        b.batchnorm(name="cat_bn")  # per-segment params (offset 0 each) on the concatenated tensor
    model = b.conv(5, 1, act=None, name="cons").build(check=False)
    model.opset_import[0].version = opset
    return model


@pytest.mark.parametrize("split,slice_,opset", [(None, False, 17), ("input", False, 17), ("equal", False, 13),
                                                (None, True, 17)])
@pytest.mark.parametrize("layer", ["a", "b"])
def test_a_group_thrice_in_a_concat_split_or_sliced_back(split, slice_, opset, layer):
    """Growing a or b: every occurrence of b in the Concat moves to its new offset, a Split gets the
    new sizes (a new, uniquely named sizes input when it had none, at opset 13), a Slice of the
    last b its new bounds; exact, and the offsets agree with a re-analysis (apply_checked)."""
    import onnx

    from apply_helpers import apply_checked, assert_exact, groups_as_analyzed
    from archpass.passes.engine import apply_recipe

    model, s = built(_concat_split_net(split, slice_, opset))
    g = s.layer(layer).out_group
    recipe = [{"pass": "channels", "site": g, "channels": s.group(g).channels + 2}]
    if split != "equal":
        applied = apply_checked(model, s, recipe)
    else:  # the shape path does not list the sizes constant the graph path adds (see notes): groups only
        applied = apply_recipe(model, Recipe.of(recipe), structure=s)
        onnx.checker.check_model(applied.proto, full_check=True)
        ours, reanalyzed = groups_as_analyzed(applied)
        assert ours == reanalyzed
        (sp,) = [n for n in applied.proto.graph.node if n.name == "sp"]
        assert list(sp.input)[1:] == ["sp_split_1"]
    assert applied.rewrites[0]["exact"] is True
    assert_exact(model, applied)


def test_a_slice_stepping_over_channels_is_refused():
    import numpy as np

    b = NetBuilder((1, 3, 8, 8), seed=18).conv(8, 3, act="relu", name="conv0")
    arr = {n: b.tensor(n, np.array(v, np.int64)) for n, v in
           [("starts", [0, 0]), ("ends", [8, 8]), ("axes", [1, 2]), ("steps", [2, 1])]}
    b.x = b.node("Slice", [b.x, arr["starts"], arr["ends"], arr["axes"], arr["steps"]], "sl")
    b.shape = [1, 4, 8, 8]
    model, s = built(b.conv(5, 1, act=None, name="cons").build())
    g = s.layer("conv0").out_group
    assert "Slice 'sl' takes channels at offsets or strides" in s.group(g).reason  # what the passes see
    with pytest.raises(RecipeError, match="Slice 'sl' steps over channels"):  # resize itself refuses too
        resize_graph(gs.import_onnx(model.proto), s, {g: 12}, "channels", g)


def test_two_resizes_of_one_group_compose_their_channel_maps():
    """8 -> 6 (width multiplier) -> 4 (channels), keeping the heaviest channels: the channel map names, for each channel left, the original channel it
    holds; conv0's weights are the original ones at those channels."""
    import numpy as np
    from onnx import numpy_helper

    from archpass.passes.engine import apply_recipe

    proto = NetBuilder((1, 3, 8, 8), seed=19).conv(8, 3, act="relu", name="conv0").conv(5, 1, act=None, name="cons").build()
    for t in proto.graph.initializer:  # conv0's channel i weighs i + 1: each shrink keeps the last channels
        if t.name == "conv0_w":
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.sign(w) * np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1, 1), t.name))
    model, s = built(proto)
    g = s.layer("conv0").out_group
    applied = apply_recipe(model, Recipe.of([{"pass": "width_multiplier", "site": s.stages[0].id, "multiplier": 0.75,
                                              "parallelism": 2},
                                             {"pass": "channels", "site": g, "channels": 4}]), structure=s)
    assert applied.rewrites[0]["after"]["channels"][g] == 6 and applied.structure.group(g).channels == 4
    m = applied.channel_maps[g]
    weight = {t.name: numpy_helper.to_array(t) for t in applied.proto.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    w = s.layer("conv0").weight
    assert w == "conv0_w" and m.tolist() == [4, 5, 6, 7] and np.array_equal(weight[w], orig[w][m])


def test_a_computed_gemm_c_is_refused_not_left_behind():
    """fc1's C comes out of a Relu of the input's pooled channels (not a constant): growing fc1 cannot
    remap it, so resize refuses, naming the node, instead of emitting a model whose C is too short."""
    import numpy as np

    b = NetBuilder((1, 8, 4, 4), seed=20)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [b.x], "pool")], "flat", axis=1)
    c = b.node("Relu", [flat], "c_act")
    w = b.tensor("fc1_w", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    b.x = b.node("Relu", [b.node("Gemm", [flat, w, c], "fc1", transB=1)], "fc1_act")
    b.x = b.node("Gemm", [b.x, b.tensor("fc2_w", np.ones((5, 8), np.float32))], "fc2", transB=1)
    b.shape = [1, 5]
    model, s = built(b.build())
    g = s.layer("fc1").out_group
    with pytest.raises(RecipeError, match="Gemm 'fc1' has a non-constant input 2"):
        resize_graph(gs.import_onnx(model.proto), s, {g: 12}, "channels", g)


@pytest.mark.parametrize("channels", [8, 32], ids=["down", "up"])
def test_depthwise_conv_over_a_group_concatenated_with_itself(channels):
    """GhostNet's ghost module: a 1x1 conv, a depthwise conv of its output, both
    concatenated (one group twice), then a stride-2 depthwise conv over the concatenation.
    That conv's output channels are twice the group's (the shape path gave it the group's
    once, and timm's ghostnet_100 failed every width multiplier at emit)."""
    from resize_helpers import assert_same_function, assert_shapes_agree, outputs, rewrite_one

    b = NetBuilder((1, 3, 16, 16), seed=5).conv(16, 3, 2, act="relu").conv(24, 1, act="relu")
    b.concat(lambda b: None, lambda b: b.dw(3, act="relu"))
    m, s = built(b.dw(3, stride=2, act=None).conv(16, 1, act=None).head(10).build())
    dw = next(l for l in s.layers if l.depthwise and l.stride == (2, 2))
    group = dw.in_groups[0]
    assert dw.in_groups == (group, group) and dw.cout == 48
    r = rewrite_one(m, s, "channels", group, {"channels": channels})
    new = assert_shapes_agree(r.shapes.structure, r.proto)
    assert next(l for l in new.layers if l.id == dw.id).cout == 2 * channels
    if channels > 24:
        assert r.exact
        assert_same_function(m.proto, r.proto, s)
    else:
        outputs(r.proto, s)
