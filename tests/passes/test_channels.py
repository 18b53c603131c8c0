"""The `channels` pass: every coupling kind on small built models, and real exports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # apply_helpers, resize_helpers

from builders import NetBuilder  # noqa: E402
from resize_helpers import (  # noqa: E402
    assert_same_function,
    assert_shapes_agree,
    built,
    loaded,
    node,
    outputs,
    param,
    rewrite,
    rewrite_one,
)

from archpass.errors import RecipeError  # noqa: E402
from archpass.passes.base import IntDomain, Match, get_pass  # noqa: E402
from archpass.passes.engine import apply_recipe_shapes  # noqa: E402

CHANNELS = get_pass("channels")


# ----------------------------------------------------------------------------- models
def mixed_net():
    """Residual IBN with HardSigmoid SE, IBN with SiLU and Sigmoid SE, a residual Add
    followed by an unfusable BatchNorm, a Concat, and a Reshape(-1, C) head."""
    b = NetBuilder((1, 3, 16, 16), seed=1)
    b.conv(16, 3, 2, act="hardswish")
    b.ibn(16, expand=3, se="hardsigmoid", act="hardswish")
    b.ibn(24, expand=2, stride=2, se="sigmoid", act="silu")
    b.add(lambda b: b.conv(24, 1, act=None), lambda b: None).batchnorm().activation("relu")
    b.concat(lambda b: b.conv(8, 1), lambda b: b.conv(12, 3))
    b.conv(16, 1)
    b.head(10, flatten="reshape")
    return b.build()


def const_net():
    """Per-channel Mul/Div constants, NHWC LayerNorms sharing deduplicated weights, a Split
    and a Slice of a Concat, and a two-Gemm head (Gemm producer feeding a Gemm)."""
    b = NetBuilder((1, 3, 8, 8), seed=2)
    b.conv(16, 3, act="relu")
    for tag in ("ln0", "ln1"):
        t = b.node("Transpose", [b.x], f"{tag}_t1", perm=[0, 2, 3, 1])
        scale = b.tensor(f"{tag}_scale", np.ones(16, np.float32))
        bias = b.tensor(f"{tag}_bias", np.zeros(16, np.float32))
        y = b.node("LayerNormalization", [t, scale, bias], f"{tag}_ln", axis=-1, epsilon=1e-5)
        b.x = b.node("Transpose", [y], f"{tag}_t2", perm=[0, 3, 1, 2])
        b.conv(16, 3, act="relu", name=f"{tag}_conv")
    rng = np.random.default_rng(3)
    b.x = b.node("Mul", [b.x, b.tensor("ls", rng.uniform(0.5, 2, (1, 16, 1, 1)).astype(np.float32))], "layerscale")
    b.x = b.node("Div", [b.x, b.tensor("dv", rng.uniform(0.5, 2, (16, 1, 1)).astype(np.float32))], "divide")
    b.x = b.node("Add", [b.x, b.tensor("sh", rng.normal(0, 1, (16, 1, 1)).astype(np.float32))], "shift")
    b.conv(16, 1, act="sigmoid", name="gate_conv")
    b.concat(lambda b: b.conv(8, 1, name="cat_a"), lambda b: b.conv(12, 3, name="cat_b"))
    p0, p1 = b.node("Split", [b.x, b.tensor("split_sizes", np.array([8, 12], np.int64))], "split", n_out=2, axis=1)
    sl = b.node("Slice", [b.x, b.tensor("st", np.array([8], np.int64)), b.tensor("en", np.array([20], np.int64)),
                          b.tensor("ax", np.array([1], np.int64))], "slice")
    b.x, b.shape = p0, [1, 8, 8, 8]
    b.conv(8, 1, name="after_split0")
    y0 = b.x
    b.x, b.shape = p1, [1, 12, 8, 8]
    b.conv(12, 1, name="after_split1")
    b.x = b.node("Add", [b.x, sl], "merge_slice")
    b.x, b.shape = b.node("Concat", [y0, b.x], "cat2", axis=1), [1, 20, 8, 8]
    b.head(16, name="h1")
    b.activation("relu")
    w = b.tensor("fc2_w", b._rand((10, 16), 16))
    b.x, b.shape = b.node("Gemm", [b.x, w, b.tensor("fc2_b", np.zeros(10, np.float32))], "fc2", transB=1), [1, 10]
    return b.build()


@pytest.fixture(scope="module")
def mixed():
    return built(mixed_net())


@pytest.fixture(scope="module")
def consts():
    return built(const_net())


def group_of(structure, node_name: str, role: str = "producer") -> str:
    return next(g.id for g in structure.groups if any(m.node == node_name and m.role == role for m in g.members))


def concat_parts(structure, a: str, b: str) -> tuple[str, str, int, int]:
    """The groups produced by layers ``a`` and ``b`` (two Concat parts) and their sizes."""
    ga, gb = group_of(structure, a), group_of(structure, b)
    return ga, gb, structure.group(ga).channels, structure.group(gb).channels


def grow(m, s, node_name: str, role: str = "producer", *, by: int):
    """Resize the group of ``node_name`` (as ``role``) to ``by`` more channels: (group, old size, result)."""
    gid = group_of(s, node_name, role)
    old = s.group(gid).channels
    return gid, old, rewrite_one(m, s, "channels", gid, {"channels": old + by})


def up(c: int, p: int = 8) -> int:
    """The next multiple of ``p`` strictly above ``c``."""
    return (c // p + 1) * p


# ----------------------------------------------------------------------------- contract
def test_sites_are_the_adjustable_groups(mixed, consts):
    m, s = mixed
    sites = CHANNELS.sites(s)
    assert [x.id for x in sites] == [g.id for g in s.groups if g.adjustable]
    for x in sites:
        c = s.group(x.id).channels
        assert x.kind == "group" and x.domains == {"channels": IntDomain(1, max(4 * c, 64), 1, c)}
        assert x.to_json()["domains"]["channels"] == {"type": "int", "low": 1, "high": max(4 * c, 64), "step": 1,
                                                      "current": c}
    _, s2 = consts
    ln_group = group_of(s2, "conv0")
    note = next(x.note for x in CHANNELS.sites(s2) if x.id == ln_group)
    assert "lossy even when rounding up" in note and "LayerNormalization" in note


def test_check_refuses_bad_choices(mixed):
    _, s = mixed
    fixed = [g for g in s.groups if not g.adjustable]
    assert fixed
    for g in fixed:
        why = CHANNELS.check(s, g.id, {"channels": 64})
        assert isinstance(why, str) and "not adjustable" in why and g.reason in why
    gid = group_of(s, "conv0")
    for bad in (0, -3, 2.5, "8", True, None):
        assert isinstance(CHANNELS.check(s, gid, {"channels": bad}), str), bad
    assert "unknown channel group" in CHANNELS.check(s, "group999", {"channels": 8})
    assert isinstance(CHANNELS.check(s, None, {"channels": 8}), str)
    assert isinstance(CHANNELS.check(s, gid, {}), str)
    assert isinstance(CHANNELS.check(s, gid, {"channels": 8, "multiplier": 2}), str)
    match = CHANNELS.check(s, gid, {"channels": 8})
    assert isinstance(match, Match) and match.site == gid and match.found["new"] == 8
    assert isinstance(CHANNELS.check(s, gid, {"channels": 1}), Match)
    assert isinstance(CHANNELS.check(s, gid, {"channels": 8.0}), Match)  # JSON may spell integers as floats
    with pytest.raises(RecipeError, match="positive integer"):
        apply_recipe_shapes(s, [{"pass": "channels", "site": gid, "channels": 0}])
    with pytest.raises(RecipeError, match="not adjustable"):
        apply_recipe_shapes(s, [{"pass": "channels", "site": fixed[0].id, "channels": 8}])


def test_check_agrees_with_the_domain(mixed):
    """check() accepts the domain's bounds and refuses one past them (an absurd count too)."""
    _, s = mixed
    for site in CHANNELS.sites(s):
        dom = site.domains["channels"]
        for v in (dom.low, dom.current, dom.high):
            assert dom.contains(v) and isinstance(CHANNELS.check(s, site.id, {"channels": v}), Match), v
        for v in (dom.low - 1, dom.high + 1, 1_000_000_000):
            assert not dom.contains(v)
            assert isinstance(CHANNELS.check(s, site.id, {"channels": v}), str), v
    with pytest.raises(RecipeError, match="at most"):
        apply_recipe_shapes(s, [{"pass": "channels", "site": site.id, "channels": 1_000_000_000}])


def test_same_size_is_a_noop(mixed):
    m, s = mixed
    gid = group_of(s, "conv0")
    r = rewrite_one(m, s, "channels", gid, {"channels": s.group(gid).channels})
    assert not r.shapes.modified and r.shapes.exact and r.exact
    assert r.shapes.structure is s
    assert_same_function(m.proto, r.proto, s)


# ----------------------------------------------------------------------------- rounding up
@pytest.mark.parametrize("net", ["mixed", "consts"])
def test_round_up_every_group(net, request):
    """Each adjustable group padded to the next multiple of 8: exact (same outputs) unless
    the group reaches a LayerNorm over channels, and the shape path agrees with the ONNX."""
    m, s = request.getfixturevalue(net)
    lossy_expected = {g.id for g in s.groups if any(x.op == "LayerNormalization" for x in g.members)}
    if net == "consts":
        assert lossy_expected
    for g in s.groups:
        if not g.adjustable:
            continue
        r = rewrite_one(m, s, "channels", g.id, {"channels": up(g.channels)})
        assert r.shapes.modified
        assert r.shapes.structure.group(g.id).channels == up(g.channels)
        assert r.shapes.exact == r.exact == (g.id not in lossy_expected), g.id
        if r.exact:
            assert_same_function(m.proto, r.proto, s)
        else:
            outputs(r.proto, s)
        assert_shapes_agree(r.shapes.structure, r.proto)
        assert r.shapes.before == {"group": g.id, "channels": g.channels}
        assert r.shapes.after == {"group": g.id, "channels": up(g.channels)}


def test_round_up_pads_zero_channels(mixed):
    """Producers get zero weights and bias, consumers zero input weights, depthwise zero
    kernels; the SE expand conv (producing into the group through the Mul) too."""
    m, s = mixed
    gid, old, r = grow(m, s, "ibn0_expand", by=5)
    for prod in ("ibn0_expand", "ibn0_se_expand", "ibn0_dw"):
        w, b = param(r.proto, prod, 1), param(r.proto, prod, 2)
        np.testing.assert_array_equal(w[:old], param(m.proto, prod, 1))
        assert not w[old:].any() and not b[old:].any()
    assert f"channels:{gid}" in node(r.proto, "ibn0_dw").doc_string  # provenance tag
    assert not node(r.proto, "conv0").doc_string  # untouched node
    dw = next(a for a in node(r.proto, "ibn0_dw").attribute if a.name == "group")
    assert dw.i == old + 5
    for cons in ("ibn0_se_reduce", "ibn0_project"):
        w = param(r.proto, cons, 1)
        np.testing.assert_array_equal(w[:, :old], param(m.proto, cons, 1))
        assert not w[:, old:].any()


def test_round_up_batchnorm_params_make_padding_zero(mixed):
    m, s = mixed
    gid, old, r = grow(m, s, "bn0", "param", by=3)
    assert r.exact
    scale, bias, mean, var = (param(r.proto, "bn0", i) for i in range(1, 5))
    assert scale.shape == (old + 3,)
    assert not scale[old:].any() and not bias[old:].any() and not mean[old:].any()
    np.testing.assert_array_equal(var[old:], 1.0)
    np.testing.assert_array_equal(scale[:old], param(m.proto, "bn0", 1))
    assert_same_function(m.proto, r.proto, s)


def test_concat_offsets_shift(mixed):
    """Growing the first part of a Concat moves the second part's slice in the consumer."""
    m, s = mixed
    first, second, c1, c2 = concat_parts(s, "conv2", "conv3")
    r = rewrite_one(m, s, "channels", first, {"channels": c1 + 3})
    w_old, w = param(m.proto, "conv4", 1), param(r.proto, "conv4", 1)
    assert w.shape[1] == c1 + 3 + c2
    np.testing.assert_array_equal(w[:, :c1], w_old[:, :c1])
    assert not w[:, c1:c1 + 3].any()
    np.testing.assert_array_equal(w[:, c1 + 3:], w_old[:, c1:])
    members = r.shapes.structure.group(second).members
    assert {(x.node, x.offset) for x in members if x.role in ("concat", "consumer")} == {
        ("concat0", c1 + 3), ("conv4", c1 + 3)}
    assert_same_function(m.proto, r.proto, s)


def test_reshape_literal_gets_new_count(mixed):
    m, s = mixed
    gid, old, r = grow(m, s, "head_reshape", "reshape", by=8)
    assert list(param(r.proto, "head_reshape", 1)) == [-1, old + 8]
    assert param(r.proto, "head_fc", 1).shape == (10, old + 8)
    assert_same_function(m.proto, r.proto, s)


def test_per_channel_constants_padding(consts):
    m, s = consts
    gid, old, r = grow(m, s, "layerscale", "param", by=4)
    assert r.exact
    ls, dv, sh = param(r.proto, "layerscale", 1), param(r.proto, "divide", 1), param(r.proto, "shift", 1)
    assert ls.shape == (1, old + 4, 1, 1) and dv.shape == (old + 4, 1, 1) and sh.shape == (old + 4, 1, 1)
    assert not ls[:, old:].any() and not sh[old:].any()
    np.testing.assert_array_equal(dv[old:], 1.0)  # no division by zero
    assert_same_function(m.proto, r.proto, s)


def test_split_and_slice_follow(consts):
    m, s = consts
    first, second, c1, c2 = concat_parts(s, "cat_a", "cat_b")
    r = rewrite_one(m, s, "channels", first, {"channels": c1 + 2})
    assert list(param(r.proto, "split", 1)) == [c1 + 2, c2]
    assert list(param(r.proto, "slice", 1)) == [c1 + 2] and list(param(r.proto, "slice", 2)) == [c1 + 2 + c2]
    assert_same_function(m.proto, r.proto, s)
    r = rewrite_one(m, s, "channels", second, {"channels": c2 - 5})
    assert list(param(r.proto, "split", 1)) == [c1, c2 - 5]
    assert list(param(r.proto, "slice", 2)) == [c1 + c2 - 5]
    outputs(r.proto, s)
    assert_shapes_agree(r.shapes.structure, r.proto)


def test_shared_constant_is_copied_not_edited(consts):
    """onnxslim dedups the two LayerNorms' identical weights; resizing one group gives that
    LayerNorm its own constant and leaves the other one's intact."""
    m, s = consts
    assert node(m.proto, "ln0_ln").input[1] == node(m.proto, "ln1_ln").input[1]
    gid = group_of(s, "ln0_ln", "param")
    assert gid != group_of(s, "ln1_ln", "param")
    r = rewrite_one(m, s, "channels", gid, {"channels": 24})
    assert not r.exact  # LayerNorm over channels: padding changes its statistics
    assert param(r.proto, "ln0_ln", 1).shape == (24,) and param(r.proto, "ln1_ln", 1).shape == (16,)
    assert node(r.proto, "ln0_ln").input[1] != node(r.proto, "ln1_ln").input[1]
    np.testing.assert_array_equal(param(r.proto, "ln1_ln", 1), 1.0)
    outputs(r.proto, s)


def test_gemm_producer_feeding_gemm(consts):
    m, s = consts
    gid, old, r = grow(m, s, "h1_fc", by=8)
    assert param(r.proto, "h1_fc", 1).shape[0] == old + 8 and param(r.proto, "h1_fc", 2).shape == (old + 8,)
    assert param(r.proto, "fc2", 1).shape == (10, old + 8)
    assert_same_function(m.proto, r.proto, s)


def test_chained_rewrites_keep_ids(mixed):
    """Two Concat parts resized one after the other, then the whole model widened, in one
    recipe: ids keep working and the result is still exact."""
    m, s = mixed
    a, b = group_of(s, "conv2"), group_of(s, "conv3")
    out, srs, exact = rewrite(m, s, [("channels", a, {"channels": 16}), ("channels", b, {"channels": 16}),
                                     ("width_multiplier", None, {"multiplier": 2.0, "parallelism": 8})])
    assert all(exact)
    assert_same_function(m.proto, out, s)
    assert_shapes_agree(srs[-1].structure, out)


# ----------------------------------------------------------------------------- rounding down
@pytest.mark.parametrize("net", ["mixed", "consts"])
def test_round_down_every_group(net, request):
    m, s = request.getfixturevalue(net)
    for g in s.groups:
        if not g.adjustable or g.channels < 2:
            continue
        r = rewrite_one(m, s, "channels", g.id, {"channels": g.channels // 2})
        assert r.shapes.modified and not r.shapes.exact and not r.exact
        outputs(r.proto, s)
        assert_shapes_agree(r.shapes.structure, r.proto)


def expected_keep(proto, structure, gid: str, n: int) -> np.ndarray:
    """The documented criterion, recomputed here: L1 norm of each output channel's weights
    summed over the group's producers; the n largest, in their original order."""
    g = structure.group(gid)
    total = sum(np.abs(param(proto, p.node, 1)).reshape(g.channels, -1).sum(axis=1) for p in g.producers)
    return np.sort(np.argsort(-total, kind="stable")[:n])


@pytest.mark.parametrize("producer", ["ibn0_expand", "conv0"])
def test_round_down_keeps_highest_norm_channels(mixed, producer):
    """Shrinking the SE/depthwise group (producers: expand conv and SE expand conv) or the
    residual group (producers: stem and project conv) keeps the same channels everywhere."""
    m, s = mixed
    gid = group_of(s, producer)
    g = s.group(gid)
    n = g.channels // 2
    keep = expected_keep(m.proto, s, gid, n)
    assert not np.array_equal(keep, np.arange(n))  # the test would not notice "keep the first n"
    r = rewrite_one(m, s, "channels", gid, {"channels": n})
    assert len(g.producers) >= 2
    for p in g.producers:
        np.testing.assert_array_equal(param(r.proto, p.node, 1), param(m.proto, p.node, 1)[keep])
        np.testing.assert_array_equal(param(r.proto, p.node, 2), param(m.proto, p.node, 2)[keep])
    for c in g.consumers:
        if c.role == "depthwise":
            np.testing.assert_array_equal(param(r.proto, c.node, 1), param(m.proto, c.node, 1)[keep])
        elif c.node not in {p.node for p in g.producers}:
            np.testing.assert_array_equal(param(r.proto, c.node, 1), param(m.proto, c.node, 1)[:, keep])
    assert_shapes_agree(r.shapes.structure, r.proto)


# ----------------------------------------------------------------------------- real exports
ZOO = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_real_model_round_every_group_up(name):
    """Every adjustable group rounded up to the next multiple of 16 (strictly above: most
    groups of these models already are multiples of 16), one channels rewrite each, chained
    on one graph: same function, shapes agree with the emitted ONNX."""
    m, s = loaded(name)
    steps = [("channels", g.id, {"channels": up(g.channels, 16)}) for g in s.groups if g.adjustable]
    assert len(steps) >= 10
    out, srs, exact = rewrite(m, s, steps)
    assert all(exact) and all(r.exact for r in srs)
    assert_same_function(m.proto, out, s)
    assert_shapes_agree(srs[-1].structure, out)
    assert param(out, s.layers[0].id, 1).shape[0] % 16 == 0


@pytest.mark.parametrize("n_convs", [4, 8, 9])
def test_an_unknown_group_names_at_most_eight_adjustable_ones(n_convs):
    b = NetBuilder((1, 3, 8, 8), seed=3)
    for i in range(n_convs):
        b.conv(4, 1, act="relu", name=f"c{i}")
    _, s = built(b.conv(2, 1, act=None, name="last").build())
    known = [g.id for g in s.groups if g.adjustable]
    assert len(known) == n_convs
    msg = CHANNELS.check(s, "group99", {"channels": 8})
    assert msg == f"unknown channel group 'group99' (adjustable groups: {', '.join(known[:8])}" + (
        "...)" if n_convs > 8 else ")")


def test_the_graph_path_reports_a_same_size_rewrite_as_unmodified(mixed):
    import onnx_graphsurgeon as gs

    m, s = mixed
    g = next(g for g in s.groups if g.adjustable)
    for size, modified in ((g.channels, False), (g.channels + 8, True)):
        match = CHANNELS.check(s, g.id, {"channels": size})
        assert CHANNELS.apply_graph(gs.import_onnx(m.proto), s, match).modified is modified


def test_a_matmul_over_another_axis_than_its_inputs_channel_axis_keeps_its_input_channels():
    """MaxViT's and Swin's attention output projections: a MatMul reads (windows, tokens, C)
    from a tensor whose channel axis, as analysis sees it, is the windows' (an op archpass
    cannot rewrite made it: Einsum here).  Its output channels are adjustable; resizing them
    once also "resized" its input channels to the windows' group's size (MaxViT: 'emitted
    ONNX has 128 input channels, shape-only structure 16', a traceback from optimize)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 8])
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Einsum", ["x"], ["e"], name="mix", equation="bwtc->bwtc"),
             helper.make_node("MatMul", ["e", "w1"], ["m1"], name="proj"),
             helper.make_node("Relu", ["m1"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="out")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    m, s = built(proto)
    proj = s.layer("proj")
    assert (proj.cin, proj.cout, proj.in_groups) == (8, 16, ())  # the input's group (4 windows) is not its channels
    assert s.group(proj.out_group).adjustable
    r = rewrite_one(m, s, "channels", proj.out_group, {"channels": 8})
    assert r.shapes.structure.layer("proj").cin == 8
    assert param(r.proto, "proj", 1).shape == (8, 8) and param(r.proto, "out", 1).shape == (8, 8)
    assert_shapes_agree(r.shapes.structure, r.proto)
    outputs(r.proto, s)
