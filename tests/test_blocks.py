"""Block rules (archpass/blocks.py): one test per rule, on small built models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from builders import NetBuilder

from archpass.analysis import analyze
from archpass.blocks import (ADD_RULES, LAYER_RULES, BlockGraph, find_blocks, match_depthwise, match_fused_ibn,
                             match_ibn, match_residual)
from archpass.model import model_from_proto


def graph(builder: NetBuilder) -> BlockGraph:
    model = model_from_proto(builder.build())
    return BlockGraph(analyze(model).layers, model.proto.graph.node)


def layer(g: BlockGraph, lid: str):
    return g.by_id[lid]


def add_node(g: BlockGraph, name: str):
    return next(n for n in g.nodes if n.name == name)


def test_rule_lists():
    assert LAYER_RULES == (match_ibn, match_fused_ibn, match_depthwise) and ADD_RULES == (match_residual,)


def test_ibn_with_se_and_residual():
    g = graph(NetBuilder((1, 16, 16, 16)).ibn(16, expand=4, se="hardsigmoid", name="b"))
    m = match_ibn(layer(g, "b_expand"), g)
    assert m.kind == "ibn" and m.residual and m.add == "b_add"
    assert m.roles == (("expand", "b_expand"), ("depthwise", "b_dw"), ("se_reduce", "b_se_reduce"),
                       ("se_expand", "b_se_expand"), ("project", "b_project"))
    assert m.ids == tuple(lid for _, lid in m.roles)
    assert match_ibn(layer(g, "b_dw"), g) is None  # the anchor is the 1x1 expand
    g.used.add("b_project")
    assert match_ibn(layer(g, "b_expand"), g) is None  # a claimed project is not taken twice


def test_ibn_without_residual_when_shapes_change():
    g = graph(NetBuilder((1, 16, 16, 16)).ibn(24, expand=4, stride=2, name="b"))
    m = match_ibn(layer(g, "b_expand"), g)
    assert m.kind == "ibn" and not m.residual and m.add is None


def test_ibn_output_added_to_a_side_branch_is_not_residual():
    """The Add joins the IBN's output with another branch, not with the block input."""
    b = NetBuilder((1, 8, 16, 16)).conv(16, 3, act="relu", name="stem")
    b.add(lambda b: b.ibn(16, expand=4, residual=False, name="b"), lambda b: b.conv(16, 1, act=None, name="side"),
          name="join")
    g = graph(b)
    m = match_ibn(layer(g, "b_expand"), g)
    assert m.kind == "ibn" and not m.residual and m.add is None
    blocks, _ = find_blocks(g.layers, g.nodes)
    assert not any(bl.residual for bl in blocks)


def test_fused_ibn_needs_expansion_and_a_linear_project():
    g = graph(NetBuilder((1, 16, 16, 16)).fused_ibn(16, expand=4, name="f"))
    m = match_fused_ibn(layer(g, "f_expand"), g)
    assert m.kind == "fused_ibn" and m.residual and m.roles == (("fused", "f_expand"), ("project", "f_project"))
    # a ResNet bottleneck tail: the 3x3 does not expand
    g = graph(NetBuilder((1, 16, 16, 16)).conv(16, 3, act="relu", name="a").conv(64, 1, act=None, name="p"))
    assert match_fused_ibn(layer(g, "a"), g) is None
    # a project with an activation is not a linear bottleneck
    g = graph(NetBuilder((1, 16, 16, 16)).conv(64, 3, act="relu", name="a").conv(16, 1, act="relu", name="p"))
    assert match_fused_ibn(layer(g, "a"), g) is None


def test_depthwise_with_and_without_pointwise():
    g = graph(NetBuilder((1, 16, 16, 16)).dw_separable(32, name="d"))
    m = match_depthwise(layer(g, "d_dw"), g)
    assert m.kind == "depthwise" and not m.residual and m.roles == (("depthwise", "d_dw"), ("project", "d_pw"))
    g = graph(NetBuilder((1, 16, 16, 16)).dw(3, act="relu", name="d").se("sigmoid", name="s").conv(16, 3, name="c"))
    m = match_depthwise(layer(g, "d"), g)
    assert m.roles == (("depthwise", "d"), ("se_reduce", "s_reduce"), ("se_expand", "s_expand"))
    assert match_depthwise(layer(g, "c"), g) is None


@pytest.mark.parametrize("shortcut", [False, True])
def test_residual_basic_block(shortcut):
    b = NetBuilder((1, 16, 16, 16)).conv(16, 3, act="relu", name="stem")
    main = lambda b: b.conv(32 if shortcut else 16, 3, act="relu", name="c0").conv(32 if shortcut else 16, 3, act=None,
                                                                                   name="c1")
    b.add(main, (lambda b: b.conv(32, 1, act=None, name="sc")) if shortcut else (lambda b: None), name="join")
    g = graph(b)
    m = match_residual(add_node(g, "join"), g)
    assert m.kind == "residual" and m.add == "join"
    assert m.roles == (("conv0", "c0"), ("conv1", "c1")) + ((("shortcut", "sc"),) if shortcut else ())
    g.used.add("c1")
    assert match_residual(add_node(g, "join"), g) is None


def test_residual_needs_two_layers_without_a_projection():
    b = NetBuilder((1, 16, 16, 16)).conv(16, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(16, 3, act=None, name="c0"), lambda b: None, name="join")
    g = graph(b)
    assert match_residual(add_node(g, "join"), g) is None


def test_find_blocks_ids_stages_and_claims():
    b = (NetBuilder((1, 16, 32, 32)).ibn(16, expand=2, name="a").ibn(24, expand=2, stride=2, name="b")
         .ibn(24, expand=2, name="c"))
    g = graph(b)
    blocks, stages = find_blocks(g.layers, g.nodes)
    assert [(bl.id, bl.kind, bl.residual, bl.stage) for bl in blocks] == [
        ("block0", "ibn", True, 0), ("block1", "ibn", False, 1), ("block2", "ibn", True, 1)]
    assert [(s.id, s.blocks) for s in stages] == [("stage0", ("block0",)), ("stage1", ("block1", "block2"))]
    # the depthwise of an IBN belongs to the IBN, not to a depthwise block of its own
    assert all(bl.kind != "depthwise" for bl in blocks)


def _fc_se(extra_glue: bool = False) -> tuple[BlockGraph, str]:
    """dw 'd' -> SE written with fully connected layers (Flatten -> Gemm -> Relu -> Gemm -> Sigmoid
    -> [Clip] -> Reshape -> Mul) -> 1x1 'p'; returns the graph and the dw's activation output."""
    rng = np.random.default_rng(0)
    b = NetBuilder((1, 16, 8, 8)).dw(3, act="relu", name="d")
    x = b.x
    t = b.node("Flatten", [b.node("GlobalAveragePool", [x], "se_pool")], "se_flat", axis=1)
    for name, (cout, cin) in (("se_fc1", (4, 16)), ("se_fc2", (16, 4))):
        w = b.tensor(f"{name}_w", rng.standard_normal((cout, cin)).astype(np.float32))
        bias = b.tensor(f"{name}_b", np.zeros(cout, np.float32))
        t = b.node("Gemm", [t, w, bias], name, transB=1)
        t = b.node("Relu" if name == "se_fc1" else "Sigmoid", [t], f"{name}_act")
    if extra_glue:  # one more glue node (a Clip of the gate)
        t = b.node("Clip", [t, b.tensor("lo", np.float32(0)), b.tensor("hi", np.float32(1))], "se_clip")
    t = b.node("Reshape", [t, b.tensor("se_shape", np.array([1, 16, 1, 1], np.int64))], "se_reshape")
    b.x = b.node("Mul", [x, t], "se_mul")
    return graph(b.conv(16, 1, act=None, name="p")), x


def test_se_through_flatten_gemm_and_reshape():
    g, _ = _fc_se()
    m = match_depthwise(layer(g, "d"), g)
    assert m.roles == (("depthwise", "d"), ("se_reduce", "se_fc1"), ("se_expand", "se_fc2"), ("project", "p"))


def test_matches_are_immutable():
    g = graph(NetBuilder((1, 16, 16, 16)).dw_separable(16, name="d"))
    m = match_depthwise(layer(g, "d_dw"), g)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.kind = "ibn"


def test_a_concat_join_is_not_a_residual():
    b = NetBuilder((1, 16, 16, 16)).conv(16, 3, act="relu", name="stem")
    b.concat(lambda b: b.conv(16, 3, act="relu", name="c0").conv(16, 3, act=None, name="c1"), lambda b: None,
             name="join")
    g = graph(b)
    assert match_residual(add_node(g, "join"), g) is None


def test_a_gate_through_an_unknown_op_is_not_an_se():
    b = NetBuilder((1, 16, 8, 8)).dw(3, act="relu", name="d")
    x, shape = b.x, b.shape
    b.x, b.shape = b.node("GlobalAveragePool", [x], "pool"), [1, 16, 1, 1]
    b.conv(4, 1, act="relu", name="r").conv(16, 1, act="sigmoid", name="e")
    b.x = b.node("Mul", [x, b.node("Softmax", [b.x], "sm", axis=1)], "gate")
    b.shape = shape
    g = graph(b.conv(16, 1, act=None, name="p"))
    m = match_depthwise(layer(g, "d"), g)
    assert m.roles == (("depthwise", "d"),)  # the Mul is not an SE gate, so nothing follows the dw alone


@pytest.mark.parametrize("join", ["Add", "Mul"])
def test_a_pooled_or_multiplied_side_branch_without_the_other_is_not_an_se(join):
    """The tensor feeds two consumers but not the GlobalAveragePool + Mul pair of an SE: an additive
    gate (x + conv(pool(x))), or a spatial attention (x * conv(x)) without a pool."""
    b = NetBuilder((1, 16, 8, 8)).dw(3, act="relu", name="d")
    x, shape = b.x, b.shape
    if join == "Add":
        b.x, b.shape = b.node("GlobalAveragePool", [x], "pool"), [1, 16, 1, 1]
    b.conv(4, 1, act="relu", name="r").conv(16, 1, act="sigmoid", name="e")
    b.x = b.node(join, [x, b.x], "gate")
    b.shape = shape
    g = graph(b.conv(16, 1, act=None, name="p"))
    assert g.se_after(x) == ([], x)
    assert match_depthwise(layer(g, "d"), g).roles == (("depthwise", "d"),)


def test_se_walk_from_pool_to_gate_is_at_most_four_nodes():
    """Pool -> [glue] -> layer -> layer -> [glue] -> Mul: four nodes between pool and Mul at most
    (a layer counts once with its activation); one more glue node and it is not an SE."""
    g, x = _fc_se()
    assert g.se_after(x) == (["se_fc1", "se_fc2"], "se_mul")
    g, x = _fc_se(extra_glue=True)
    assert g.se_after(x) == ([], x)


def test_a_pointwise_expansion_is_not_a_fused_ibn():
    """fused_ibn needs a spatial (KxK) expand: 1x1 expand -> act -> linear 1x1 is two pointwise convs."""
    g = graph(NetBuilder((1, 16, 16, 16)).conv(64, 1, act="relu", name="a").conv(16, 1, act=None, name="p"))
    assert match_fused_ibn(layer(g, "a"), g) is None
    for k in [(1, 3), (3, 1)]:  # a non-square spatial kernel expands spatially
        rng = np.random.default_rng(1)
        b = NetBuilder((1, 16, 16, 16))
        w = b.tensor("a_w", rng.standard_normal((64, 16, *k)).astype(np.float32) * 0.1)
        b.x = b.node("Relu", [b.node("Conv", [b.x, w], "a", pads=[k[0] // 2, k[1] // 2] * 2)], "a_relu")
        b.shape = [1, 64, 16, 16]
        g = graph(b.conv(16, 1, act=None, name="p"))
        assert match_fused_ibn(layer(g, "a"), g).roles == (("fused", "a"), ("project", "p"))


@pytest.mark.parametrize("depth,found", [(4, True), (5, False)])
def test_residual_chain_is_at_most_four_layers(depth, found):
    b = NetBuilder((1, 16, 16, 16)).conv(16, 3, act="relu", name="stem")

    def main(b):
        for i in range(depth):
            b.conv(16, 3, act="relu" if i < depth - 1 else None, name=f"c{i}")

    b.add(main, lambda b: None, name="join")
    g = graph(b)
    m = match_residual(add_node(g, "join"), g)
    assert (m is not None) == found
    if found:
        assert [lid for _, lid in m.roles] == [f"c{i}" for i in range(depth)]
