"""The in-code model builders emit valid ONNX that onnxruntime runs with the expected shapes and values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import ACTIVATIONS, NetBuilder, messy_model, random_input, run_ort

X = random_input((1, 3, 32, 32))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _run(model: onnx.ModelProto, x: np.ndarray = X) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    (y,) = run_ort(model, {"input": x})
    assert np.isfinite(y).all()
    return y


def _reference_activation(act: str, x: np.ndarray) -> np.ndarray:
    hsig = np.clip(x / 6 + 0.5, 0, 1)
    sig = 1 / (1 + np.exp(-x))
    return {
        "relu": np.maximum(x, 0),
        "relu6": np.clip(x, 0, 6),
        "relu6_constant": np.clip(x, 0, 6),
        "hardswish": x * hsig,
        "hardswish_mul": x * hsig,
        "sigmoid": sig,
        "silu": x * sig,
        "hardsigmoid": hsig,
    }[act]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activation_forms_compute_their_function(act):
    # a 1x1 conv with known weights, so the activation input is exactly computable
    b = NetBuilder((1, 3, 8, 8)).conv(4, 1, act=act)
    model = b.build()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pre = np.einsum("oi,nihw->nohw", inits["conv0_w"][:, :, 0, 0], X[:, :, :8, :8] * 4) + inits["conv0_b"][None, :, None, None]
    y = _run(model, X[:, :, :8, :8] * 4)  # scale so Clip(0, 6) saturates somewhere
    np.testing.assert_allclose(y, _reference_activation(act, pre), rtol=1e-5, atol=1e-5)


def test_activation_forms_emit_expected_ops():
    def ops(act):
        return [o for o in _ops(NetBuilder().conv(4, 1, act=act).build()) if o != "Conv"]

    assert ops("relu6") == ["Clip"]
    assert ops("relu6_constant") == ["Constant", "Constant", "Clip"]
    assert ops("hardswish") == ["HardSwish"]
    assert ops("hardswish_mul") == ["HardSigmoid", "Mul"]
    assert ops("silu") == ["Sigmoid", "Mul"]
    with pytest.raises(ValueError, match="unknown activation"):
        NetBuilder().conv(4, 1, act="gelu")


def test_conv_bn_unfused_and_constant_weights():
    model = NetBuilder().conv(8, 3, 2, act="relu", bn=True, weights="constant").build()
    assert _ops(model).count("BatchNormalization") == 1
    assert not model.graph.initializer  # every parameter came from a Constant node
    assert _run(model).shape == (1, 8, 16, 16)


@pytest.mark.parametrize("se", [None, "hardsigmoid", "sigmoid"])
@pytest.mark.parametrize("stride", [1, 2])
def test_ibn(se, stride):
    model = NetBuilder().conv(16, 3, act="relu6").ibn(16, expand=4, k=5, stride=stride, se=se).build()
    ops = _ops(model)
    assert ops.count("Conv") == 4 + (2 if se else 0)
    assert ops.count("Add") == (1 if stride == 1 else 0)
    assert ("GlobalAveragePool" in ops) == bool(se)
    dw = next(n for n in model.graph.node if n.name == "ibn0_dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 64
    assert _run(model).shape == (1, 16, 32 // stride, 32 // stride)


def test_ibn_residual_is_identity_plus_branch():
    # zeroing the project conv must leave exactly the block input (proves the skip path)
    b = NetBuilder().conv(8, 3, act="relu")
    pre = b.build()
    model = b.ibn(8, expand=2, bn=False).build()
    for t in model.graph.initializer:
        if t.name.startswith("ibn0_project"):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    np.testing.assert_allclose(_run(model), _run(pre), rtol=1e-6)


def test_residual_refused_when_shapes_differ():
    with pytest.raises(ValueError, match="residual"):
        NetBuilder().conv(8).ibn(16, residual=True)


def test_fused_ibn_and_dw_separable():
    model = NetBuilder().conv(8).fused_ibn(8, expand=4).fused_ibn(16, stride=2).dw_separable(24, stride=2).build()
    ops = _ops(model)
    assert ops.count("Add") == 1
    assert _run(model).shape == (1, 24, 8, 8)


def test_concat_add_shuffle_reshape_head():
    model = (
        NetBuilder()
        .conv(8)
        .concat(lambda b: b.conv(8, 1), lambda b: b.conv(16, 3))
        .add(lambda b: None, lambda b: b.conv(24, 3, act=None))
        .channel_shuffle(3)
        .head(7, flatten="reshape")
        .build()
    )
    ops = _ops(model)
    assert ops.count("Concat") == 1 and ops.count("Transpose") == 1 and ops.count("Reshape") == 3
    assert _run(model).shape == (1, 7)


def test_channel_shuffle_permutes_channels():
    b = NetBuilder((1, 6, 4, 4)).conv(6, 1, act=None)
    before = _run(b.build(), random_input((1, 6, 4, 4)))
    after = _run(b.channel_shuffle(2).build(), random_input((1, 6, 4, 4)))
    # groups=2, 3 channels per group: output channel order 0,3,1,4,2,5
    np.testing.assert_array_equal(after, before[:, [0, 3, 1, 4, 2, 5]])


def test_builds_are_deterministic():
    def make():
        return NetBuilder(seed=3).conv(8).ibn(8, se="sigmoid").head(5).build().SerializeToString()

    assert make() == make()
    assert make() != NetBuilder(seed=4).conv(8).ibn(8, se="sigmoid").head(5).build().SerializeToString()


def test_messy_model():
    model = messy_model()
    ops = _ops(model)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert ops.count("BatchNormalization") >= 10
    assert "Constant" in ops and any(n.op_type == "Clip" for n in model.graph.node)
    assert "HardSwish" not in ops and ops.count("HardSigmoid") >= 5  # x*HardSigmoid(x) + SE gate
    assert ops.count("GlobalAveragePool") == 2  # SE + head
    assert ops.count("Add") == 2  # two residual IBNs
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    conv_w = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert any(w in consts for w in conv_w) and any(w not in consts for w in conv_w)
    # dynamic dims really are dynamic: two batch sizes and resolutions run
    assert _run(model, random_input((1, 3, 64, 64))).shape == (1, 10)
    assert _run(model, random_input((2, 3, 96, 128))).shape == (2, 10)
