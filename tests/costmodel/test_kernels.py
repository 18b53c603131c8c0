"""Kernel decomposition and fusion rules on small models built in code."""

from __future__ import annotations

import pytest
from builders import NetBuilder

from archpass.analysis import analyze as _analyze
from archpass.costmodel.kernels import FusionRules, Kernel, decompose
from archpass.model import model_from_proto
from archpass.passes.resize import resize_shapes


def analyze(proto):
    return _analyze(model_from_proto(proto, canonical=False))

RUNTIME = FusionRules(residual_add=True)
LAYERS_ONLY = FusionRules(layers_only=True)


def _mbv2_like():
    return (
        NetBuilder((1, 3, 32, 32))
        .conv(16, k=3, stride=2, act="relu6")
        .ibn(16, expand=4, act="relu6")
        .ibn(24, expand=4, stride=2, act="hardswish", se="hardsigmoid")
        .head(10)
        .build()
    )


def test_layers_only_target_has_one_kernel_per_layer():
    s = analyze(_mbv2_like())
    ks = decompose(s, LAYERS_ONLY)
    assert [k.layers[0] for k in ks] == [l.id for l in s.layers]
    assert {k.kind for k in ks} == {"conv", "dwconv", "gemm"}
    # activations ride with their layer, no standalone op becomes a kernel
    dw = next(k for k in ks if k.kind == "dwconv")
    assert dw.act == "relu6" and len(dw.nodes) == 2


def test_runtime_fusion_conv_act_and_residual_add():
    s = analyze(_mbv2_like())
    ks = decompose(s, RUNTIME)
    by_layer = {k.layers[0]: k for k in ks if k.layers}
    # the first IBN is residual: its project conv runs the Add
    proj = by_layer["ibn0_project"]
    assert proj.fused_add and "ibn0_add" in proj.nodes and proj.act is None
    # the second is strided: no add anywhere, SE ops are standalone kernels
    assert not by_layer["ibn1_project"].fused_add
    kinds = [k.kind for k in ks if not k.layers]
    assert "gpool" in kinds and "eltwise" in kinds  # SE pool and SE multiply
    # hardswish (one op) and relu6 (Clip) are part of their conv's kernel
    assert by_layer["ibn1_expand"].act == "hardswish" and len(by_layer["ibn1_expand"].nodes) == 2
    # every node is in exactly one kernel
    covered = [n for k in ks for n in k.nodes]
    assert len(covered) == len(set(covered)) == len(s.nodes)


def test_post_add_activation_is_fused_resnet_style():
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu")
    b.add(lambda b: b.conv(8, 3, act="relu").conv(8, 3, act=None), lambda b: None)
    b.activation("relu")
    s = analyze(b.build())
    ks = decompose(s, RUNTIME)
    last = [k for k in ks if k.layers][-1]
    assert last.fused_add and last.post_act == "relu"
    assert len(ks) == 3


def test_residual_add_is_not_fused_into_a_conv_that_has_an_activation():
    """A conv -> act -> Add runs the Add on its own: the runtime fuses an Add only right after the conv."""
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act="relu", name="c"), lambda b: None, name="join")
    s = analyze(b.build())
    ks = decompose(s, RUNTIME)
    conv = next(k for k in ks if k.layers == ("c",))
    assert conv.act == "relu" and not conv.fused_add and "join" not in conv.nodes
    assert [k.kind for k in ks if "join" in k.nodes] == ["eltwise"]
    # the same block with a linear conv does fuse it, so the rule is what decides
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act=None, name="c"), lambda b: None, name="join")
    conv = next(k for k in decompose(analyze(b.build()), RUNTIME) if k.layers == ("c",))
    assert conv.fused_add and "join" in conv.nodes
    # an activation the target does not fuse runs alone, and so does the Add after it
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act="relu", name="c"), lambda b: None, name="join")
    ks = decompose(analyze(b.build()), FusionRules(residual_add=True, activations=()))
    conv = next(k for k in ks if k.layers == ("c",))
    assert conv.act is None and not conv.fused_add and conv.nodes == ("c",)


def test_standalone_pool_kernel_keeps_its_kernel_and_stride():
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="c")
    b.x = b.node("MaxPool", [b.x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b.shape = [1, 8, 8, 8]
    pool = next(k for k in decompose(analyze(b.build()), RUNTIME) if "pool" in k.nodes)
    assert pool.kernel == (3, 3) and pool.stride == (2, 2) and pool.in_hw == (16, 16) and pool.out_hw == (8, 8)


def test_swish_as_mul_sigmoid_fuses_when_allowed_and_not_otherwise():
    s = analyze(NetBuilder((1, 8, 16, 16)).conv(16, 3, act="silu").build())
    (k,) = decompose(s, RUNTIME)
    assert k.act == "swish" and len(k.nodes) == 3
    ks = decompose(s, FusionRules(activations=("relu",), residual_add=True))
    assert ks[0].act is None and len(ks) == 3  # Sigmoid and Mul now run alone


def test_kernel_spec_round_trip():
    s = analyze(_mbv2_like())
    for k in decompose(s, RUNTIME):
        again = Kernel.from_spec(k.spec(), id=k.id, nodes=k.nodes)
        assert again.spec() == k.spec() and again.macs == k.macs


def test_channel_change_reaches_kernels():
    s = analyze(_mbv2_like())
    g = next(g for g in s.groups if g.adjustable and g.channels == 64)
    wider = resize_shapes(s, {g.id: 80})
    before = {k.id: k for k in decompose(s, LAYERS_ONLY)}
    after = {k.id: k for k in decompose(wider, LAYERS_ONLY)}
    changed = [i for i in before if before[i].spec() != after[i].spec()]
    assert changed and all(after[i].cout == 80 or after[i].cin == 80 for i in changed)


def test_kernels_know_when_they_sit_at_the_edge_of_a_conv_run():
    s = analyze(_mbv2_like())
    ks = decompose(s, RUNTIME)
    by_layer = {k.layers[0]: k for k in ks if k.layers}
    stem = ks[0]
    assert stem.in_from_op and not stem.out_to_op  # reads the model input, feeds a conv
    # a plain inverted residual stays inside the run of convolutions
    assert not by_layer["ibn0_dw"].in_from_op and not by_layer["ibn0_dw"].out_to_op
    # the SE block's pool and multiply are standalone ops: the depthwise conv feeds them and
    # the project conv reads the multiply's output
    assert by_layer["ibn1_dw"].out_to_op and by_layer["ibn1_project"].in_from_op
    # the last conv feeds the classifier's pooling; the gemm reads a flatten
    assert by_layer["ibn1_project"].out_to_op
    gemm = next(k for k in ks if k.kind == "gemm")
    assert gemm.in_from_op and gemm.out_to_op  # the model output
    # flags survive the spec round trip (what calibration datasets store)
    assert all(Kernel.from_spec(k.spec()).spec() == k.spec() for k in ks)
    assert Kernel.from_spec({k: v for k, v in stem.spec().items() if k not in ("in_from_op", "out_to_op")}).in_from_op is False


def test_sibling_slices_that_partition_a_tensor_run_as_one_split():
    """Exporters write ShuffleNet's channel split as two Slices; onnxruntime fuses them
    into one Split (GatherSliceToSplitFusion).  A lone Slice stays a Slice."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def const(name, v):
        return numpy_helper.from_array(np.array(v, dtype=np.int64), name)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])
    w = numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Slice", ["x", "s0", "e0", "ax"], ["a"], name="sl_a"),
        helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["b"], name="sl_b"),
        helper.make_node("Conv", ["b", "w"], ["bc"], name="conv"),
        helper.make_node("Concat", ["a", "bc"], ["y"], name="cat", axis=1),
        helper.make_node("Slice", ["y", "s0", "e2", "ax"], ["z"], name="lone"),
    ]
    g = helper.make_graph(nodes, "g", [x], [y, z], [w, const("s0", [0]), const("e0", [8]), const("s1", [8]),
                                                   const("e1", [16]), const("e2", [4]), const("ax", [1])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = analyze(proto)
    plain = decompose(s, RUNTIME)
    fused = decompose(s, FusionRules(residual_add=True, split_slices=True))
    assert [k.op for k in plain].count("Slice") == 3
    split = next(k for k in fused if k.op == "Split")
    assert set(split.nodes) == {"sl_a", "sl_b"} and split.out_elems == 16 * 64 and split.in_elems == 16 * 64
    assert [k.op for k in fused].count("Slice") == 1  # the lone slice
    assert sorted(n for k in fused for n in k.nodes) == sorted(n.name for n in s.nodes)
    assert FusionRules.from_json(FusionRules(split_slices=True).to_json()).split_slices
    assert not FusionRules.from_json({}).split_slices  # targets written before the rule


def test_fusion_rules_defaults_and_json_round_trip():
    d = FusionRules()
    assert (d.residual_add, d.layers_only, d.split_slices) == (False, False, False)
    assert d.post_add_activations == ("relu", "relu6", "clip") and "relu" in d.activations
    assert FusionRules.from_json({}) == d
    r = FusionRules(activations=("relu",), residual_add=True, post_add_activations=("relu",), layers_only=True,
                    split_slices=True)
    assert FusionRules.from_json(r.to_json()) == r
    # the NCHWc block: written only where it is not the default (older files lack it)
    assert "nchwc_block" not in d.to_json() and d.nchwc_block == 16
    assert FusionRules.from_json(FusionRules(nchwc_block=8).to_json()).nchwc_block == 8
    assert FusionRules.from_json({"nchwc_block": 0}).nchwc_block == 0
    with pytest.raises(ValueError, match=r"unknown fusion rule keys \['residual'\]"):
        FusionRules.from_json({"residual": True})


def test_swish_with_the_gate_as_first_operand_is_one_kernel():
    """Sigmoid(x) * x (operands in either order) rides with its conv: every node between the conv
    and the activation's output is in the conv's kernel."""
    b = NetBuilder((1, 8, 16, 16)).conv(16, 3, act=None, name="c")
    gate = b.node("Sigmoid", [b.x], "sig")
    b.x = b.node("Mul", [gate, b.x], "mul")
    (k,) = decompose(analyze(b.build()), RUNTIME)
    assert k.act == "swish" and set(k.nodes) == {"c", "sig", "mul"}


def test_the_add_runs_with_the_conv_that_finishes_last():
    """Two linear convs feed a residual-style Add: the Add is fused into the one that runs second."""
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act=None, name="a"), lambda b: b.conv(8, 1, act=None, name="b"), name="join")
    ks = {k.layers[0]: k for k in decompose(analyze(b.build()), RUNTIME) if k.layers}
    assert not ks["a"].fused_add and "join" not in ks["a"].nodes
    assert ks["b"].fused_add and "join" in ks["b"].nodes


def test_a_broadcasting_add_is_a_kernel_of_its_own():
    """conv(x) + pool(x) (a [1, C, 1, 1] operand) is not a residual Add; ops without kernel or stride
    attributes are 1x1 stride-1 kernels."""
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    x = b.x
    pooled = b.node("GlobalAveragePool", [x], "pool")
    b.conv(8, 3, act=None, name="c")
    b.x = b.node("Add", [b.x, pooled], "badd")
    ks = decompose(analyze(b.build()), RUNTIME)
    conv = next(k for k in ks if k.layers == ("c",))
    assert not conv.fused_add and conv.nodes == ("c",)
    for name in ("badd", "pool"):
        k = next(k for k in ks if k.nodes == (name,))
        assert k.kernel == (1, 1) and k.stride == (1, 1)


def test_post_add_activation_needs_to_be_the_adds_only_consumer():
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act="relu").conv(8, 3, act=None, name="c1"), lambda b: None, name="join")
    b.concat(lambda b: b.activation("relu", name="post"), lambda b: b.conv(8, 1, act=None, name="side"))
    ks = decompose(analyze(b.build()), RUNTIME)
    c1 = next(k for k in ks if k.layers == ("c1",))
    assert c1.fused_add and c1.post_act is None and "post" not in c1.nodes


def test_relu6_after_the_add_is_fused_as_relu6():
    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.conv(8, 3, act="relu").conv(8, 3, act=None, name="c1"), lambda b: None, name="join")
    b.activation("relu6", name="post")
    s = analyze(b.build())
    c1 = next(k for k in decompose(s, RUNTIME) if k.layers == ("c1",))
    assert c1.fused_add and c1.post_act == "relu6" and "post" in c1.nodes
    c1 = next(k for k in decompose(s, FusionRules(residual_add=True, post_add_activations=("relu",)))
              if k.layers == ("c1",))
    assert c1.fused_add and c1.post_act is None and "post" not in c1.nodes


def test_scalar_tensors_count_one_element_and_3d_pools_two_kernel_dims():
    import numpy as np

    b = NetBuilder((1, 8, 16, 16)).conv(8, 3, act="relu", name="c")
    mean = b.node("ReduceMean", [b.x], "mean", keepdims=0)  # a 0-d tensor
    b.x = b.node("Mul", [b.x, mean], "scale")
    b.x = b.node("Unsqueeze", [b.x, b.tensor("ax", np.array([1], np.int64))], "to5d")
    b.x = b.node("MaxPool", [b.x], "pool3d", kernel_shape=[1, 2, 2], strides=[1, 2, 2])
    b.shape = [1, 1, 8, 8, 8]
    ks = {k.nodes[0]: k for k in decompose(analyze(b.build()), RUNTIME)}
    assert ks["mean"].out_elems == 1 and ks["mean"].in_elems == 8 * 16 * 16
    assert ks["scale"].in_elems == 8 * 16 * 16 + 1
    assert ks["pool3d"].kernel == (1, 2) and ks["pool3d"].stride == (1, 2)


def test_an_op_on_constants_alone_is_a_one_channel_kernel():
    """Left unfolded (a model analyzed as is), an op whose inputs are all constant is a 1-channel,
    1x1 kernel; so is an op whose output shape is unknown to the structure."""
    import numpy as np

    b = NetBuilder((1, 8, 4, 4)).conv(8, 3, act="relu", name="c")
    ones = b.node("ConstantOfShape", [b.tensor("shp", np.array([1, 8, 4, 4], np.int64))], "ones")
    b.x = b.node("Add", [b.x, ones], "plus")
    k = next(k for k in decompose(analyze(b.build()), RUNTIME) if k.nodes == ("ones",))
    assert (k.cin, k.in_hw, k.n_inputs) == (1, (1, 1), 0) and (k.cout, k.out_hw) == (8, (4, 4))


@pytest.mark.parametrize("second,third,split", [
    ((8, 16), False, True),  # two halves: one Split
    ((8, 16), True, True),   # another op reads the tensor too: still one Split
    ((4, 8), False, False),  # [0:8] and [4:8] do not add up to the tensor: two Slices
])
def test_slices_run_as_one_split_only_when_they_partition_the_tensor(second, third, split):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def const(name, v):
        return numpy_helper.from_array(np.array(v, dtype=np.int64), name)

    starts, ends = (0, second[0]), (8, second[1])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, e - b, 8, 8]) for n, b, e in zip("ab", starts, ends)]
    nodes = [helper.make_node("Slice", ["x", f"s{i}", f"e{i}", "ax"], [n], name=f"sl_{n}") for i, n in enumerate("ab")]
    if third:
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16, 8, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])], outs,
                          [const("s0", [starts[0]]), const("e0", [ends[0]]), const("s1", [starts[1]]),
                           const("e1", [ends[1]]), const("ax", [1])])
    s = analyze(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    ks = decompose(s, FusionRules(residual_add=True, split_slices=True))
    assert [k.op for k in ks if k.op in ("Split", "Slice")] == (["Split"] if split else ["Slice", "Slice"])
    assert sorted(n for k in ks for n in k.nodes) == sorted(n.name for n in s.nodes)


# ---------------------------------------------------------------- blocked layout
def _layout_net():
    """Edges onnxruntime's NCHWc rewrite treats differently; channel counts chosen so the
    answer is the same with 8- (AVX2) and 16-channel (AVX-512) blocks."""
    return (
        NetBuilder((1, 3, 32, 32))
        .conv(32, k=3, stride=2, act="relu")  # reads the 3-channel model input as it is
        .ibn(32, expand=2, act="relu6")  # residual add fused into the project conv: stays blocked
        .ibn(48, expand=2, act="hardswish", se="sigmoid")  # SE: the broadcast multiply reads plain tensors
        .conv(29, k=1, act="relu")  # blocked, but its reader is not
        .conv(29, k=3, act="relu")  # 29 input channels: a plain conv
        .conv(64, k=1, act="relu")  # plain
        .conv(64, k=1, act="relu")  # blocked again: converts its input
        .concat(lambda b: b.conv(32, 1), lambda b: b.conv(32, 3))  # whole blocks: stays blocked
        .concat(lambda b: b.conv(29, 1), lambda b: b.conv(35, 1))  # not whole blocks: converted
        .conv(64, k=1, act="relu")
        .head(10)
        .build()
    )


def _onnxruntime_reorders(proto, kernels):
    """Per kernel: (conversions into, out of) the NCHWc layout onnxruntime places with
    every graph optimization, charged to kernels as their profiled times are."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    from archpass.costmodel.backends.onnxruntime import attribute

    structure = analyze(proto)
    nodes = {n.name: n for n in structure.nodes}
    owner = {n: k.id for k in kernels for n in k.nodes}
    tensor_owner = {o: k.id for k in kernels for n in k.nodes if n in nodes for o in nodes[n].outputs}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    got = {k.id: [False, False] for k in kernels}
    for n in opt.graph.node:
        if n.op_type in ("ReorderInput", "ReorderOutput"):
            for kid in attribute({n.name: [1.0]}, opt, owner, tensor_owner)[0]:
                got[kid][n.op_type == "ReorderOutput"] = True
    return got


def test_blocked_conv_follows_onnxruntimes_nchwc_rules():
    from archpass.costmodel.kernels import blocked_conv

    def conv(cin, cout, groups=1):
        kind = "dwconv" if groups == cin == cout and groups > 1 else "conv"
        return Kernel(id="c", kind=kind, op="Conv", nodes=("c",), cin=cin, cout=cout, groups=groups, kernel=(3, 3))

    assert blocked_conv(conv(24, 61)) and blocked_conv(conv(20, 64)) and blocked_conv(conv(3, 32))
    assert not blocked_conv(conv(29, 64)) and not blocked_conv(conv(18, 64))
    assert blocked_conv(conv(20, 20, 20)) and not blocked_conv(conv(18, 18, 18))
    assert blocked_conv(conv(64, 64, 2)) and not blocked_conv(conv(96, 96, 12))  # groups of 32 / of 8 channels
    gemm = Kernel(id="g", kind="gemm", op="Gemm", nodes=("g",), cin=64, cout=10)
    assert not blocked_conv(gemm)


def test_layout_flags_match_where_onnxruntime_converts():
    """The flags :func:`~archpass.costmodel.kernels.layout_flags` derives from shapes alone are where onnxruntime (every
    graph optimization) puts its NCHWc conversions, kernel by kernel; the edge flags
    ``in_from_op``/``out_to_op`` would say otherwise at pools, adds and whole-block concats."""
    pytest.importorskip("onnxruntime")
    proto = _layout_net()
    ks = decompose(analyze(proto), RUNTIME)
    want = _onnxruntime_reorders(proto, ks)
    got = {k.id: [k.in_reorder, k.out_reorder] for k in ks}
    assert got == want
    by = {k.id: k for k in ks}
    plain = [k for k in ks if k.kind in ("conv", "dwconv") and not k.blocked]
    assert {k.cin for k in plain} == {29}  # only the convs reading 29 channels run plain
    stem = ks[0]
    assert stem.blocked and not stem.in_reorder and stem.in_from_op  # reads the model input directly
    # the flags do not change the old edge flags, and survive the spec round trip
    assert any(k.in_from_op and not k.in_reorder for k in ks) and any(k.out_reorder for k in ks)
    for k in ks:
        assert Kernel.from_spec(k.spec(), id=k.id).spec() == k.spec()
    assert "blocked" not in Kernel(id="o", kind="act", op="Relu", nodes=("r",)).spec()  # old keys stay
    # layers-only (ZigZag) targets have no blocked layout
    assert not any(k.blocked or k.in_reorder or k.out_reorder for k in decompose(analyze(proto), LAYERS_ONLY))
    # the SE block's multiply reads plain tensors: its depthwise conv converts out, the
    # project conv after it converts in
    se_dw = next(k for k in ks if k.kind == "dwconv" and k.out_to_op)
    assert se_dw.out_reorder and by[se_dw.id].blocked


def test_layout_flags_follow_the_hosts_nchwc_block():
    """The blocked layout is the host's (``FusionRules.nchwc_block``): a concatenation of
    8-channel branches and a grouped conv of 8-channel groups stay blocked with 8-channel
    blocks (AVX2) and not with 16 (AVX-512); a host without one has no layout flags."""
    from archpass.costmodel.kernels import blocked_conv

    proto = (
        NetBuilder((1, 16, 16, 16))
        .conv(32, k=1, act="relu")
        .concat(lambda b: b.conv(8, 1, act="relu"), lambda b: b.conv(8, 3, act="relu"))
        .conv(32, k=3, groups=2, act="relu")  # groups of 8 input channels
        .conv(32, k=1, act="relu")
        .head(10)
        .build()
    )
    s = analyze(proto)
    by16 = {k.id: k for k in decompose(s, RUNTIME)}
    by8 = {k.id: k for k in decompose(s, FusionRules(residual_add=True, nchwc_block=8))}
    branches = [k for k in by16.values() if k.kind == "conv" and k.cout == 8]
    assert len(branches) == 2
    assert all(by16[k.id].out_reorder and not by8[k.id].out_reorder for k in branches)  # the concat reads them
    grouped = next(k for k in by16.values() if k.groups == 2)
    assert not blocked_conv(grouped) and blocked_conv(grouped, 8)
    assert not by16[grouped.id].blocked and by8[grouped.id].blocked
    none = decompose(s, FusionRules(residual_add=True, nchwc_block=0))
    assert not any(k.blocked or k.in_reorder or k.out_reorder for k in none)
    assert [k.id for k in none] == list(by16)  # the same kernels, only the flags differ
    assert not blocked_conv(grouped, 0)
    # and on this host the flags at its own block are where onnxruntime converts
    pytest.importorskip("onnxruntime")
    from archpass.costmodel.host import nchwc_block

    here = decompose(s, FusionRules(residual_add=True, nchwc_block=nchwc_block()))
    assert {k.id: [k.in_reorder, k.out_reorder] for k in here} == _onnxruntime_reorders(proto, here)
