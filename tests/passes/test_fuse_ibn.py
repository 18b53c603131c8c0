"""fuse_ibn: 1x1 expand + KxK depthwise -> one KxK dense conv."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx import numpy_helper

from apply_helpers import apply_checked, assert_exact, built, loaded, rel_err, run
from archpass.errors import RecipeError
from archpass.passes.engine import apply_recipe, apply_recipe_shapes
from archpass.recipe import Recipe
from archpass.structure import Block
from builders import NetBuilder


def _inits(proto) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _ibn_net(se=None, act="relu6"):
    b = NetBuilder((1, 3, 24, 24), seed=1).conv(16, 3, stride=2, act="relu")
    b.ibn(16, expand=4, act=act, se=se).ibn(24, expand=6, k=5, stride=2, act=act, se=se)
    return b.head(10).build()


def test_structure_after_fusion_and_emitted_weights_are_the_composition():
    model, s = built(_ibn_net())
    b = s.block("block0")
    assert b.kind == "ibn" and b.residual
    e, d, p = (s.layer(b.role(r)) for r in ("expand", "depthwise", "project"))
    applied = apply_checked(model, s, [{"pass": "fuse_ibn", "site": "block0"}])
    assert applied.rewrites[0]["exact"] is False  # relu6 sits between expand and depthwise
    t = applied.structure
    fb = t.block("block0")
    assert fb.kind == "fused_ibn" and fb.residual and fb.role("fused") == d.id and fb.role("project") == p.id
    assert not t.has_layer(e.id)
    f = t.layer(d.id)
    assert (f.cin, f.cout, f.kernel, f.stride, f.groups, f.activation) == (e.cin, d.cout, d.kernel, d.stride, 1, d.activation)
    assert f.in_groups == e.in_groups and f.out_group == d.out_group
    expanded = t.group(d.out_group)
    assert {m.node for m in expanded.producers} == {d.id}
    assert e.id not in {m.node for g in t.groups for m in g.members}
    # the emitted weights are exactly the composition of the original convs
    src, out = _inits(model.proto), _inits(applied.proto)
    node = next(n for n in applied.proto.graph.node if n.name == d.id)
    we, be = src[e.weight][:, :, 0, 0].astype(np.float64), src[next(n for n in model.proto.graph.node if n.name == e.id).input[2]]
    wd = src[d.weight].astype(np.float64)
    bd = src[next(n for n in model.proto.graph.node if n.name == d.id).input[2]]
    np.testing.assert_allclose(out[node.input[1]], wd[:, 0][:, None] * we[:, :, None, None], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[node.input[2]], bd + be * wd[:, 0].sum(axis=(1, 2)), rtol=1e-6, atol=1e-7)
    assert "fuse_ibn:block0" in node.doc_string
    # untouched block keeps its ids and kind
    assert t.block("block1") == s.block("block1")


def test_se_block_fuses_and_reanalyzes_as_fused_ibn():
    model, s = built(_ibn_net(se="hardsigmoid", act="hardswish"))
    recipe = [{"pass": "fuse_ibn", "site": b.id} for b in s.blocks if b.kind == "ibn"]
    assert len(recipe) == 2
    applied = apply_checked(model, s, recipe)
    from archpass.analysis import analyze

    again = analyze(applied.proto)
    assert [(b.id, b.kind, b.layers, b.roles) for b in again.blocks] == [
        (b.id, b.kind, b.layers, b.roles) for b in applied.structure.blocks]
    assert all(b.kind == "fused_ibn" for b in again.blocks)


def _no_act_ibn(expand_bias: bool, dw_pad: bool = True):
    """1x1 expand (no activation) -> 3x3 depthwise -> 1x1 project: the composition is exact
    unless the expand bias leaks through the depthwise zero padding."""
    b = NetBuilder((1, 8, 12, 12), seed=3)
    b.conv(32, 1, act=None, bias=expand_bias, name="exp")
    if dw_pad:
        b.dw(3, act="relu", name="dw")
    else:  # a 'valid' 3x3 depthwise: no padding for the bias to leak through
        w = b.tensor("dw_w", np.random.default_rng(4).standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3)
        b.x = b.node("Relu", [b.node("Conv", [b.x, w], "dw", group=32, kernel_shape=[3, 3])], "dw_act")
        b.shape = [1, 32, 10, 10]
    b.conv(8, 1, act=None, name="proj")
    model, s = built(b.build())
    # the analysis (rightly) needs an activation after the expand conv to call it an IBN; declare the block by hand
    blk = Block("block0", "ibn", ("exp", "dw", "proj"), False, 0,
                (("expand", "exp"), ("depthwise", "dw"), ("project", "proj")))
    return model, replace(s, blocks=(blk,))


def test_exact_without_activation_between():
    model, s = _no_act_ibn(expand_bias=False)
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}]), structure=s)
    assert applied.rewrites[0]["exact"] is True
    assert assert_exact(model, applied) <= 1e-5


def test_expand_bias_with_padding_is_lossy_only_at_the_border():
    model, s = _no_act_ibn(expand_bias=True)
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}]), structure=s)
    assert applied.rewrites[0]["exact"] is False
    a, b = run(applied.proto)[0], run(model.proto)[0]
    assert rel_err(a[:, :, 1:-1, 1:-1], b[:, :, 1:-1, 1:-1]) <= 1e-5  # interior: same function
    assert rel_err(a, b) > 1e-4  # border: the expand bias no longer passes through zero padding


def test_expand_bias_without_padding_is_exact():
    model, s = _no_act_ibn(expand_bias=True, dw_pad=False)
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}]), structure=s)
    assert applied.rewrites[0]["exact"] is True
    assert assert_exact(model, applied) <= 1e-5


def _manual_ibn(expand_stride: int = 1, dw_kernel=(3, 3), dw_stride=(1, 1)):
    """stem -> 1x1 expand (stride ``expand_stride``) -> relu -> KhxKw depthwise -> relu -> 1x1 project."""
    rng = np.random.default_rng(6)
    b = NetBuilder((1, 3, 16, 16), seed=6).conv(8, 3, act="relu", name="stem")
    b.conv(32, 1, stride=expand_stride, act="relu", name="exp")
    kh, kw = dw_kernel
    w = b.tensor("dw_w", rng.standard_normal((32, 1, kh, kw)).astype(np.float32) * 0.3)
    dw = b.node("Conv", [b.x, w], "dw", group=32, kernel_shape=[kh, kw], pads=[kh // 2, kw // 2, kh // 2, kw // 2],
                strides=list(dw_stride))
    b.shape = [1, 32, *((d + 2 * (k // 2) - k) // st + 1 for d, k, st in zip(b.shape[2:], dw_kernel, dw_stride))]
    b.x = b.node("Relu", [dw], "dw_act")
    b.conv(8, 1, act=None, name="proj")
    return built(b.head(3).build())


def test_a_strided_expand_is_refused():
    from archpass.passes.base import registry

    model, s = _manual_ibn(expand_stride=2)
    blk = next(b for b in s.blocks if b.kind == "ibn")
    with pytest.raises(RecipeError, match="expand conv of .* is not a plain 1x1 stride-1 conv"):
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": blk.id}])
    assert registry()["fuse_ibn"].sites(s) == []  # a site is an ibn block the pass accepts


def test_a_depthwise_with_a_channel_multiplier_is_refused():
    b = NetBuilder((1, 3, 16, 16), seed=2).conv(8, 3, act="relu", name="stem").conv(16, 1, act="relu", name="exp")
    b.conv(32, 3, groups=16, act="relu", name="dwm").conv(8, 1, act=None, name="proj")
    model, s = built(b.head(3).build())
    blk = next(b for b in s.blocks if b.kind == "ibn")
    assert blk.role("depthwise") == "dwm"
    with pytest.raises(RecipeError, match="depthwise conv of .* has a channel multiplier"):
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": blk.id}])


def test_a_depthwise_without_bias_fuses_to_the_composition():
    b = NetBuilder((1, 3, 16, 16), seed=3).conv(8, 3, act="relu", name="stem").conv(24, 1, act="relu", name="exp")
    b.conv(24, 3, groups=24, act="relu", bias=False, name="dw").conv(8, 1, act=None, name="proj")
    model, s = built(b.head(3).build())
    blk = next(b for b in s.blocks if b.kind == "ibn")
    applied = apply_checked(model, s, [{"pass": "fuse_ibn", "site": blk.id}])
    src, out = _inits(model.proto), _inits(applied.proto)
    we, be, wd = src["exp_w"][:, :, 0, 0], src["exp_b"], src["dw_w"]
    assert np.allclose(out["dw.fused_bias"], be * wd[:, 0].sum(axis=(1, 2)), atol=1e-5)
    assert np.allclose(out["dw.fused_weight"], wd[:, 0][:, None] * we[:, :, None, None], atol=1e-6)


def test_non_square_kernels_in_the_record():
    model, s = _manual_ibn(dw_kernel=(3, 5))
    blk = next(b for b in s.blocks if b.kind == "ibn")
    applied = apply_checked(model, s, [{"pass": "fuse_ibn", "site": blk.id}])
    r = applied.rewrites[0]
    assert " k3x5 " in r["before"]["depthwise"] and " k3x5 " in r["after"]["fused"]
    assert r["after"]["fused"].startswith("8->32 k3x5 s1 g1 16x16->16x16")
    model, s = _manual_ibn(dw_stride=(2, 1))
    blk = next(b for b in s.blocks if b.kind == "ibn")
    r = apply_checked(model, s, [{"pass": "fuse_ibn", "site": blk.id}]).rewrites[0]
    assert r["after"]["fused"] == "8->32 k3x3 s2x1 g1 16x16->8x16"


def test_refusals():
    model, s = built(NetBuilder((1, 3, 16, 16)).conv(8, 3).dw_separable(16).fused_ibn(16).head(4).build())
    kinds = {b.id: b.kind for b in s.blocks}
    assert kinds == {"block0": "depthwise", "block1": "fused_ibn"}
    with pytest.raises(RecipeError, match="depthwise block, not an inverted bottleneck"):
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": "block0"}])
    with pytest.raises(RecipeError, match="already a fused"):
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": "block1"}])
    with pytest.raises(RecipeError, match="takes no choice|unknown key"):
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": "block1", "kernel": 3}])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0"])
def test_real_architectures_fuse_every_ibn(name):
    model, s = loaded(name)
    recipe = [{"pass": "fuse_ibn", "site": b.id} for b in s.blocks if b.kind == "ibn"]
    assert len(recipe) >= 10
    applied = apply_checked(model, s, recipe)
    assert all(b.kind in ("fused_ibn", "depthwise") for b in applied.structure.blocks)
    assert len(applied.structure.layers) == len(s.layers) - len(recipe)


def test_sites_are_the_ibn_blocks_and_check_names_unknown_sites():
    from archpass.passes.base import registry

    _, s = built(NetBuilder((1, 3, 24, 24)).conv(16, 3, stride=2).dw_separable(16).ibn(16, expand=4).head(4).build())
    p = registry()["fuse_ibn"]
    assert [x.id for x in p.sites(s)] == [b.id for b in s.blocks if b.kind == "ibn"] == ["block1"]
    assert p.check(s, "block9", {}) == "'block9' is not a block of this model"
    assert "depthwise block" in p.check(s, "block0", {})


def test_record_shapes_on_a_rectangular_input():
    b = NetBuilder((1, 3, 24, 32), seed=1).conv(16, 3, stride=2, act="relu").ibn(16, expand=4, k=5)
    model, s = built(b.head(4).build())
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block0"}]), structure=s)
    assert applied.rewrites[0]["before"] == {"expand": "16->64 k1x1 s1 g1 12x16->12x16",
                                             "depthwise": "64->64 k5x5 s1 g64 12x16->12x16"}
    assert applied.rewrites[0]["after"] == {"fused": "16->64 k5x5 s1 g1 12x16->12x16"}


@pytest.mark.parametrize("site", ["block0", "block1"])
def test_shape_path_groups_match_a_reanalysis(site):
    from apply_helpers import groups_as_analyzed

    model, s = built(_ibn_net(se="hardsigmoid"))
    ours, reanalyzed = groups_as_analyzed(apply_checked(model, s, [{"pass": "fuse_ibn", "site": site}]))
    assert ours == reanalyzed


def test_a_1d_ibn_fuses_into_a_1d_conv():
    """A 1-D network's IBN (keyword spotting, time series): its convs are 2-D layers of
    height 1 to the analysis, and the fused weight stays 1-D, (C, cin, k)."""
    from builders import conv1d_net

    model, s = built(conv1d_net(expand_act=False, expand_bias=False))
    assert s.layer("dw").kernel == (1, 5) and s.layer("dw").in_hw == (1, 32) and s.layer("dw").pads == (0, 2, 0, 2)
    blk = Block("block0", "ibn", ("exp", "dw", "proj"), True, 0,
                (("expand", "exp"), ("depthwise", "dw"), ("project", "proj")))
    s = replace(s, blocks=(blk,))  # no activation after the expand: declared by hand, as above
    applied = apply_checked(model, s, [{"pass": "fuse_ibn", "site": "block0"}])
    (w,) = [t for t in applied.proto.graph.initializer if t.name.endswith("fused_weight")]
    assert tuple(w.dims) == (64, 16, 5)
    assert applied.structure.layer("dw").macs == 64 * 32 * 16 * 5
    assert applied.rewrites[0]["exact"] is True
    assert_exact(model, applied)
    model, s = built(conv1d_net(expand_act=True))
    applied = apply_checked(model, s, [{"pass": "fuse_ibn", "site": "block0"}])  # found by the analysis
    assert applied.rewrites[0]["exact"] is False
