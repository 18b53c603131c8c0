"""Structural analysis on small models built in code: blocks, activations, channel groups."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from archpass.analysis import analyze
from archpass.model import model_from_proto
from builders import NetBuilder, messy_model


def structure_of(proto, shapes=None):
    return analyze(model_from_proto(proto, shapes))


def group_of(s, layer_id, side="out"):
    l = s.layer(layer_id)
    return s.group(l.out_group if side == "out" else l.in_groups[0])


# ------------------------------------------------------------------ blocks
def test_ibn_with_se_and_residual():
    b = NetBuilder((1, 3, 32, 32))
    b.conv(16, 3, 2, act="relu6", name="stem")
    b.ibn(24, expand=4, stride=2, act="hardswish", se="hardsigmoid", name="a")
    b.ibn(24, expand=3, act="relu6", name="b")
    s = structure_of(b.head(10).build())
    kinds = [(blk.kind, blk.residual) for blk in s.blocks]
    assert kinds == [("ibn", False), ("ibn", True)]
    a = s.blocks[0]
    assert dict(a.roles) == {"expand": "a_expand", "depthwise": "a_dw", "se_reduce": "a_se_reduce",
                             "se_expand": "a_se_expand", "project": "a_project"}
    assert s.blocks[1].residual_add == "b_add"
    assert [blk.id for blk in s.blocks] == ["block0", "block1"]
    # both blocks end at 8x8: one stage
    assert [st.blocks for st in s.stages] == [("block0", "block1")]


def test_fused_ibn_and_depthwise_blocks_and_stages():
    b = NetBuilder((1, 3, 32, 32))
    b.conv(16, 3, 1, name="stem")
    b.dw_separable(16, name="d")  # depthwise block, no expansion
    b.fused_ibn(16, expand=4, name="f")  # residual fused IBN
    b.ibn(32, stride=2, name="i")
    s = structure_of(b.head().build())
    assert [blk.kind for blk in s.blocks] == ["depthwise", "fused_ibn", "ibn"]
    assert s.blocks[0].layers == ("d_dw", "d_pw")
    assert s.blocks[1].residual and dict(s.blocks[1].roles) == {"fused": "f_expand", "project": "f_project"}
    assert [blk.stage for blk in s.blocks] == [0, 0, 1]
    assert [st.hw for st in s.stages] == [(32, 32), (16, 16)]


def test_resnet_like_bottleneck_is_not_fused_ibn():
    # 3x3 that does not expand followed by a 1x1 that expands: a ResNet bottleneck tail
    b = NetBuilder((1, 3, 16, 16))
    b.conv(16, 3).conv(16, 3).conv(64, 1, act=None)
    s = structure_of(b.build())
    assert s.blocks == ()


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("form,kind", [
    ("relu", "relu"), ("relu6", "relu6"), ("relu6_constant", "relu6"), ("hardswish", "hardswish"),
    ("hardswish_mul", "hardswish"), ("sigmoid", "sigmoid"), ("silu", "swish"), ("hardsigmoid", "hardsigmoid"),
    (None, None),
])
def test_activation_forms_attach_to_layer(form, kind):
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, act=form, name="c").conv(4, 1, act=None, name="d")
    s = structure_of(b.build())
    assert s.layer("c").activation == kind
    assert s.layer("d").activation is None


# ------------------------------------------------------------------ geometry
def test_layer_geometry_macs_params():
    b = NetBuilder((1, 3, 32, 32))
    b.conv(16, 3, 2, name="c").dw(5, 2, name="dw").head(10)
    s = structure_of(b.build())
    c = s.layer("c")
    assert (c.cin, c.cout, c.kernel, c.stride, c.groups, c.in_hw, c.out_hw) == (3, 16, (3, 3), (2, 2), 1, (32, 32), (16, 16))
    assert c.macs == 16 * 16 * 16 * 3 * 9 and c.params == 16 * 3 * 9 + 16
    dw = s.layer("dw")
    assert dw.depthwise and dw.groups == 16 and dw.out_hw == (8, 8) and dw.macs == 16 * 8 * 8 * 25
    fc = s.layer("head_fc")
    assert (fc.op, fc.cin, fc.cout, fc.params) == ("Gemm", 16, 10, 170)
    assert s.macs == sum(l.macs for l in s.layers)


# ------------------------------------------------------------------ channel groups
def test_residual_add_couples_groups():
    b = NetBuilder((1, 3, 16, 16))
    b.conv(8, 3, name="stem").ibn(8, expand=2, name="r").head()
    s = structure_of(b.build())
    g = group_of(s, "stem")
    assert g.id == group_of(s, "r_project").id
    assert {m.node for m in g.producers} == {"stem", "r_project"}
    assert {m.node for m in g.consumers} >= {"r_expand", "head_fc"}
    assert g.adjustable


def test_depthwise_and_se_share_one_group():
    b = NetBuilder((1, 3, 16, 16))
    b.conv(8, 3, name="stem").ibn(8, expand=2, se="sigmoid", residual=False, name="x").head()
    s = structure_of(b.build())
    g = group_of(s, "x_expand")
    assert group_of(s, "x_dw").id == g.id == group_of(s, "x_se_expand").id
    roles = {(m.node, m.role) for m in g.members}
    assert ("x_dw", "depthwise") in roles and ("x_se_expand", "producer") in roles
    assert ("x_se_mul", "elementwise") in roles and ("x_project", "consumer") in roles
    assert group_of(s, "x_se_reduce").id not in (g.id,)


def test_concat_offsets_and_layout():
    b = NetBuilder((1, 3, 16, 16))
    b.conv(8, 3, name="stem")
    b.concat(lambda n: n.conv(4, 1, name="left"), lambda n: n.conv(6, 3, name="right"), name="cat")
    b.conv(12, 1, name="after").head()
    s = structure_of(b.build())
    after = s.layer("after")
    gl, gr = group_of(s, "left"), group_of(s, "right")
    assert after.in_groups == (gl.id, gr.id) and after.cin == 10
    offs = {(m.node, m.role, m.offset) for m in gr.members}
    assert ("cat", "concat", 4) in offs and ("after", "consumer", 4) in offs
    assert gl.adjustable and gr.adjustable
    assert s.tensors["cat"].segments == (gl.id, gr.id)


def test_flatten_pool_gemm_coupling_and_output_is_fixed():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c").head(5)
    s = structure_of(b.build())
    g = group_of(s, "c")
    assert ("head_fc", "consumer") in {(m.node, m.role) for m in g.members}
    out = group_of(s, "head_fc")
    assert not out.adjustable and "model output 'output'" in out.reason
    inp = s.group(s.layer("c").in_groups[0])
    assert not inp.adjustable and "model input" in inp.reason


def test_reshape_with_literal_channel_count_keeps_group_adjustable():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c").head(5, flatten="reshape")
    s = structure_of(b.build())
    g = group_of(s, "c")
    assert g.adjustable
    assert ("head_reshape", "reshape") in {(m.node, m.role) for m in g.members}


def test_reshape_that_merges_channels_fixes_the_group():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, stride=2, name="c").reshape([1, 8 * 16], [1, 128], name="flat")
    s = structure_of(b.build())
    g = group_of(s, "c")
    assert not g.adjustable and "Reshape 'flat' fixes the channel size" in g.reason


def test_channel_shuffle_is_not_adjustable():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c").channel_shuffle(2, name="sh").conv(8, 1, name="d").head()
    s = structure_of(b.build())
    assert not group_of(s, "c").adjustable
    assert group_of(s, "d").adjustable


def test_unfoldable_batchnorm_is_a_param_member():
    # BatchNorm after a residual Add cannot fold into a conv: it stays and carries the group's params
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c").add(lambda n: n.conv(8, 3, name="br"), lambda n: None, name="sum")
    b.batchnorm(name="bn").conv(4, 1, name="d")
    s = structure_of(b.build())
    g = group_of(s, "c")
    assert ("bn", "param") in {(m.node, m.role) for m in g.members}
    assert group_of(s, "br").id == g.id


def test_grouped_conv_fixes_its_groups():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c").conv(8, 3, groups=4, name="g").conv(4, 1, name="d")
    s = structure_of(b.build())
    assert "grouped convolution (groups=4)" in group_of(s, "c").reason
    assert not group_of(s, "g").adjustable


def test_unknown_op_is_reported_not_refused():
    b = NetBuilder((1, 3, 8, 8))
    b.conv(8, 3, name="c")
    b.x = b.node("LpNormalization", [b.x], "norm", axis=1)
    b.conv(4, 1, name="d")
    s = structure_of(b.build())
    assert "LpNormalization" in s.unsupported
    g = group_of(s, "c")
    assert not g.adjustable and "LpNormalization node 'norm'" in g.reason
    assert s.layer("d").cin == 8


def test_ids_are_stable_and_in_topological_order():
    proto = messy_model()
    a = structure_of(proto, {"input": (1, 3, 64, 64)})
    b = structure_of(proto, {"input": (1, 3, 64, 64)})
    assert a.to_json() == b.to_json()
    assert [g.id for g in a.groups] == [f"group{i}" for i in range(len(a.groups))]
    order = {l.id: i for i, l in enumerate(a.layers)}
    firsts = [order[blk.layers[0]] for blk in a.blocks]
    assert firsts == sorted(firsts)


def test_messy_export_is_canonicalized():
    s = structure_of(messy_model(), {"input": (2, 3, 64, 64)})
    ops = {n.op for n in s.nodes}
    assert "BatchNormalization" not in ops and "Constant" not in ops  # folded by canonicalization
    assert dict(s.inputs) == {"input": (2, 3, 64, 64)}
    assert [blk.kind for blk in s.blocks] == ["ibn", "ibn", "ibn", "depthwise"]
    assert [blk.residual for blk in s.blocks] == [True, False, True, False]
    acts = {l.id: l.activation for l in s.layers}
    assert "relu6" in acts.values() and "hardswish" in acts.values()
    assert s.blocks[1].role("se_expand") is not None


def test_matmul_layer_after_transpose_tracks_channel_axis():
    # NHWC linear layer as ConvNeXt writes it: Transpose -> MatMul(W) -> Transpose back
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 4])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "w"], ["m"], name="fc"),
        helper.make_node("Relu", ["m"], ["r"], name="act"),
        helper.make_node("Transpose", ["r"], ["y"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    s = analyze(model_from_proto(proto, canonical=False))
    fc = s.layer("fc")
    assert (fc.op, fc.cin, fc.cout, fc.in_hw, fc.activation) == ("MatMul", 8, 16, (4, 4), "relu")
    assert s.tensors["y"].channel_axis == 1 and s.tensors["y"].segments == (fc.out_group,)


@pytest.mark.parametrize("batch", [1, 2])
def test_linear_over_flattened_positions_counts_every_position(batch):
    """MatMul + Add over NHWC canonicalizes (onnxslim) to Reshape -> Gemm over [N*H*W, C]
    rows -> Reshape: the layer still runs over H*W positions per sample (ConvNeXt's
    Linears, 90% of its MACs, once counted as one row each)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, 4, 5])
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["mb"], name="fc_bias"),
        helper.make_node("Relu", ["mb"], ["r"], name="act"),
        helper.make_node("Transpose", ["r"], ["y"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    m = model_from_proto(proto)
    (fc,) = analyze(m).layers
    gemm_in = next(n for n in m.proto.graph.node if n.op_type == "Gemm").input[0]
    assert analyze(m).tensors[gemm_in].shape == (batch * 20, 8)  # the canonical form this test is about
    assert (fc.op, fc.cin, fc.cout, fc.in_hw, fc.out_hw) == ("Gemm", 8, 16, (20, 1), (20, 1))
    assert fc.macs == 20 * 8 * 16


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["sequence-first", "windows-in-dim-0"])
def test_linear_whose_dim_0_is_not_the_batch_counts_every_row(batch, layout):
    """A MatMul over (tokens, N, C), as torch's MultiheadAttention projects (ViT-B/16 from the
    dynamo exporter with a dynamic batch), or over (N x windows, tokens, C), runs over every
    leading position of a sample: its dim 0 is not the batch (once read as one, ViT-B/16
    counted 13.75 GMACs instead of its card's 17.56)."""
    rng = np.random.default_rng(1)
    if layout == "sequence-first":  # (N, 8, 20) -> (20, N, 8)
        shape, perm, rows = [batch, 8, 20], [2, 0, 1], 20
    else:  # (N, 16 tokens, 8) -> (N x 4 windows, 4, 8)
        shape, perm, rows = [batch * 4, 4, 8], [0, 1, 2], 16
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 4, 5] if layout == "sequence-first"
                                      else [batch, 16, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[p] for p in perm[:2]] + [16])
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(shape, np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="tokens"),
             helper.make_node("Transpose", ["r"], ["t"], name="layout", perm=perm),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="proj")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    (proj,) = analyze(model_from_proto(proto)).layers
    assert (proj.cin, proj.cout, proj.in_hw, proj.out_hw) == (8, 16, (rows, 1), (rows, 1))
    assert proj.macs == rows * 8 * 16


def _model(nodes, inputs, outputs, inits=()):
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_attention_still_inspects_and_is_fixed():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), n) for n in ("wq", "wk", "wv")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["att"], name="scores"),
        helper.make_node("Softmax", ["att"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="mix"),
    ]
    s = structure_of(_model(nodes, [x], [y], inits))
    assert {l.id for l in s.layers} == {"q", "k", "v"}
    assert "MatMul" in s.unsupported
    for lid in ("q", "k", "v"):
        g = s.group(s.layer(lid).out_group)
        assert not g.adjustable and ("MatMul node 'scores'" in g.reason or "MatMul node 'mix'" in g.reason)


def test_rnn_still_inspects():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 16])
    w = numpy_helper.from_array(rng.standard_normal((1, 64, 8)).astype(np.float32), "w")
    r = numpy_helper.from_array(rng.standard_normal((1, 64, 16)).astype(np.float32), "r")
    nodes = [helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="lstm", hidden_size=16)]
    s = structure_of(_model(nodes, [x], [y], [w, r]))
    assert s.unsupported == ("LSTM",) and s.layers == ()
    assert all(not g.adjustable for g in s.groups)


def test_residual_blocks_with_identity_and_projection_shortcuts():
    b = NetBuilder((1, 3, 16, 16))
    b.conv(8, 3, name="stem")
    b.add(lambda n: n.conv(8, 3, name="b0c0").conv(8, 3, act=None, name="b0c1"), lambda n: None, name="b0add")
    b.activation("relu", "b0relu")
    b.add(lambda n: n.conv(16, 1, name="b1c0").conv(16, 3, stride=2, name="b1c1").conv(32, 1, act=None, name="b1c2"),
          lambda n: n.conv(32, 1, stride=2, act=None, name="b1sc"), name="b1add")
    s = structure_of(b.head().build())
    assert [(blk.kind, blk.layers) for blk in s.blocks] == [
        ("residual", ("b0c0", "b0c1")), ("residual", ("b1c0", "b1c1", "b1c2", "b1sc"))]
    assert s.blocks[1].role("shortcut") == "b1sc" and s.blocks[1].residual_add == "b1add"
    assert [st.hw for st in s.stages] == [(16, 16), (8, 8)]


def test_1d_convs_are_layers_of_height_1():
    """A 1-D network (Conv1d: weight (cout, cin/g, k), input (N, C, L)) is analyzed as 2-D
    layers of height 1: kernel (1, k), pads (0, p, 0, q), H×W (1, L); its IBN is a block."""
    from builders import conv1d_net

    s = structure_of(conv1d_net())
    geo = {l.id: (l.kernel, l.stride, l.pads, l.groups, l.in_hw, l.out_hw) for l in s.layers}
    assert geo["stem"] == ((1, 3), (1, 1), (0, 1, 0, 1), 1, (1, 32), (1, 32))
    assert geo["dw"] == ((1, 5), (1, 1), (0, 2, 0, 2), 64, (1, 32), (1, 32))
    assert s.layer("stem").macs == 16 * 32 * 8 * 3 and s.other_compute == () and not s.unsupported
    assert [(b.kind, b.layers) for b in s.blocks] == [("ibn", ("exp", "dw", "proj"))]
    assert [g.channels for g in s.groups if g.adjustable] == [16, 64]
