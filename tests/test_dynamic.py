"""archpass.dynamic: dims the user pinned only to get past the loader stay dynamic in the output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from archpass import api
from archpass.dynamic import symbolic_dims
from builders import NetBuilder, messy_model, random_input, run_ort


def _dims(path):
    m = onnx.load(str(path))
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.input) + list(m.graph.output)}


@pytest.fixture
def dyn(tmp_path):
    p = tmp_path / "dyn.onnx"
    b = NetBuilder(("N", 3, 32, 32), seed=2).conv(16, 3, stride=2).ibn(16, expand=4).ibn(24, expand=4, stride=2)
    onnx.save(b.head(5).build(), str(p))
    return p


@pytest.mark.parametrize("rewrite", [{"pass": "fuse_ibn", "site": "block1"}, {"pass": "resolution", "height": 48, "width": 48},
                                     {"pass": "channels", "site": "group1", "channels": 24}])
def test_dynamic_batch_survives_input_shape(dyn, tmp_path, rewrite):
    out = tmp_path / "o.onnx"
    doc = api.apply(dyn, {"rewrites": [rewrite]}, out, ["input:1,3,32,32"])
    assert any("dynamic dims input[0] dynamic" in n for n in doc["notes"])
    dims = _dims(out)
    assert dims["input"][0] == "N" and dims["output"] == ["N", 5]
    onnx.checker.check_model(str(out), full_check=True)
    hw = 48 if rewrite["pass"] == "resolution" else 32
    x = random_input((3, 3, hw, hw))
    y3 = run_ort(str(out), {"input": x})[0]
    y1 = run_ort(str(out), {"input": x[1:2]})[0]
    assert y3.shape == (3, 5)
    np.testing.assert_allclose(y3[1:2], y1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("calib", [None, "random"], ids=["retrain", "post-training"])
def test_optimize_keeps_a_dynamic_batch_too(dyn, tmp_path, calib):
    out = tmp_path / "o.onnx"
    doc = api.optimize(dyn, out, "edgetpu", trials=12, input_shapes=["input:1,3,32,32"], calib=calib,
                       guard=calib is not None)
    assert doc["rewrites"] and any("dynamic dims input[0] dynamic" in n for n in doc["notes"])
    assert any("random inputs" in n for n in doc["notes"]) == (calib == "random")
    dims = _dims(out)
    assert dims["input"][0] == "N" and dims["output"] == ["N", 5]
    onnx.checker.check_model(str(out), full_check=True)
    x = random_input((3, 3, 32, 32))
    y3 = run_ort(str(out), {"input": x})[0]
    np.testing.assert_allclose(y3[1:2], run_ort(str(out), {"input": x[1:2]})[0], rtol=1e-4, atol=1e-5)


def test_dynamic_spatial_dims_stay_unless_the_recipe_changes_them(tmp_path):
    p = tmp_path / "messy.onnx"
    onnx.save(messy_model(), str(p))
    api.apply(p, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]}, tmp_path / "a.onnx", ["input:1,3,64,64"])
    assert _dims(tmp_path / "a.onnx")["input"] == ["N", 3, "H", "W"]
    run_ort(str(tmp_path / "a.onnx"), {"input": random_input((2, 3, 96, 80))})
    api.apply(p, {"rewrites": [{"pass": "resolution", "height": 48, "width": 48}]}, tmp_path / "b.onnx",
              ["input:1,3,64,64"])
    assert _dims(tmp_path / "b.onnx")["input"] == ["N", 3, 48, 48]


def test_a_batch_baked_into_the_graph_keeps_the_output_static_and_says_why(tmp_path):
    # Reshape to a literal [1, 8, 64]: the model only runs at batch 1, whatever its input declares
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], np.random.default_rng(0).standard_normal(216).astype(np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 8, 64])
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "shape"], ["output"], name="reshape")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 64])], [w, shape])
    p = tmp_path / "baked.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    doc = api.apply(p, {"rewrites": []}, tmp_path / "o.onnx", ["input:1,3,8,8"])
    assert any("kept the pinned dims input[0] static" in n for n in doc["notes"]), doc["notes"]
    assert _dims(tmp_path / "o.onnx")["input"] == [1, 3, 8, 8]


def _resize_head_model() -> onnx.ModelProto:
    """A segmentation-style export with a dynamic batch: Conv -> Resize to 16x16 whose sizes
    are Concat(Shape(x)[0:2], [16, 16]) -> Conv -> Reshape to Concat(Shape(y)[0:1], [-1])
    (how torch's exporters spell a dynamic batch; canonicalization folds both to batch 1)."""
    rng = np.random.default_rng(3)

    def t(name, arr, dtype=TensorProto.FLOAT):
        return helper.make_tensor(name, dtype, arr.shape, arr.ravel().tolist())

    inits = [t("w1", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)),
             t("w2", rng.standard_normal((8, 16, 3, 3)).astype(np.float32)),
             t("hw", np.array([16, 16], dtype=np.int64), TensorProto.INT64),
             t("minus1", np.array([-1], dtype=np.int64), TensorProto.INT64),
             t("i0", np.array([0], dtype=np.int64), TensorProto.INT64)]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Shape", ["r1"], ["s1"], name="shape1", start=0, end=2),
             helper.make_node("Concat", ["s1", "hw"], ["sizes"], name="sizes", axis=0),
             helper.make_node("Resize", ["r1", "", "", "sizes"], ["up"], name="resize", mode="linear"),
             helper.make_node("Conv", ["up", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c2"], ["s2"], name="shape2"),
             helper.make_node("Gather", ["s2", "i0"], ["b"], name="batch", axis=0),
             helper.make_node("Concat", ["b", "minus1"], ["flat"], name="flat", axis=0),
             helper.make_node("Reshape", ["c2", "flat"], ["output"], name="reshape")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2048])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _assert_runs_at_any_batch(out) -> None:
    """The resize-head model written to ``out`` has a dynamic batch whose items do not mix."""
    assert _dims(out) == {"input": ["N", 3, 16, 16], "output": ["N", 2048]}
    onnx.checker.check_model(str(out), full_check=True)
    x = random_input((3, 3, 16, 16))
    y3 = run_ort(str(out), {"input": x})[0]
    np.testing.assert_allclose(y3[2:3], run_ort(str(out), {"input": x[2:3]})[0], rtol=1e-4, atol=1e-5)


def test_shapes_the_source_computes_follow_the_batch_again(tmp_path):
    """Canonicalization folds a Resize's sizes and a Reshape's shape to the pinned batch; the
    output links them to the input's batch again (a literal batch stays, see above)."""
    from archpass.model import load_model

    p = tmp_path / "seg.onnx"
    onnx.save(_resize_head_model(), str(p))
    m = load_model(p, {"input": (1, 3, 16, 16)})
    assert set(m.computed_shapes) == {"up", "output"}
    group = next(g["id"] for g in api.inspect(p, ["input:1,3,16,16"])["channel_groups"] if g["channels"] == 16)
    out = tmp_path / "o.onnx"
    doc = api.apply(p, {"rewrites": [{"pass": "channels", "site": group, "channels": 8}]}, out, ["input:1,3,16,16"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    _assert_runs_at_any_batch(out)
    # the folded shapes are replaced, not left behind
    o = onnx.load(str(out))
    assert {i.name for i in o.graph.initializer} <= {i for n in o.graph.node for i in n.input}


@pytest.mark.slow
def test_real_segmentation_model_keeps_its_dynamic_batch_at_another_resolution(tmp_path):
    import zoo

    src = zoo.model_path("lraspp_mobilenet_v3_large", dynamic_batch=True)
    out = tmp_path / "o.onnx"
    doc = api.apply(src, {"rewrites": [{"pass": "resolution", "height": 192, "width": 192}]}, out, ["input:1,3,224,224"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    assert _dims(out) == {"input": ["N", 3, 192, 192], "output": ["N", 21, 192, 192]}
    x = random_input((2, 3, 192, 192))
    y2, y1 = run_ort(str(out), {"input": x})[0], run_ort(str(out), {"input": x[1:2]})[0]
    # kernels chosen by batch size round differently: about 1e-6 of the output's range here
    np.testing.assert_allclose(y2[1:2], y1, rtol=1e-4, atol=1e-5 * np.abs(y1).max())


def test_symbolic_dims():
    assert symbolic_dims(messy_model()) == (("input", ("N", 3, "H", "W")), ("output", ("N", 10)))


def test_a_batch_stays_dynamic_when_the_spatial_dims_cannot(tmp_path):
    """A dynamic (N, H, W) export whose head resizes to a fixed 16x16 and flattens by batch:
    folded for batch 1, the emitted model cannot run at another H and W and batch with the
    spatial dims symbolic, but it can with the batch alone (a YOLO export with dynamic=True
    came back fully static)."""
    src = _resize_head_model()
    src.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    p = tmp_path / "seg.onnx"
    onnx.save(src, str(p))
    out = tmp_path / "o.onnx"
    doc = api.apply(p, {"rewrites": []}, out, ["input:1,3,16,16"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    assert any("kept the pinned dims input[2,3] static" in n for n in doc["notes"]), doc["notes"]
    _assert_runs_at_any_batch(out)
    spatial = next(n for n in doc["notes"] if "input[2,3] static" in n)
    assert "(onnxruntime fails in Resize 'resize' with the dims dynamic)" in spatial, spatial


def _token_model(heads: bool = True) -> onnx.ModelProto:
    """Tokens through a linear layer, then split into heads by a Reshape the source computes
    from the batch: Conv -> Reshape(Concat(Shape[0], [16, -1])) -> Transpose -> MatMul + Add
    -> Reshape(Concat(Shape[0], [16, 2, 12])) -> ReduceMean.  onnxslim makes the MatMul a
    Gemm over (N x 16 tokens, C), and merges the Reshape back with the heads' one, so that
    Reshape's input has dim 0 N x 16, not the batch (timm's EfficientFormer).  Without
    ``heads``, the MatMul's output is pooled over the tokens: the Reshape back from the
    Gemm's rows is onnxslim's own, with the pinned batch as a literal (timm's EdgeNeXt)."""
    rng = np.random.default_rng(4)

    def t(name, arr):
        return helper.make_tensor(name, TensorProto.INT64 if arr.dtype == np.int64 else TensorProto.FLOAT,
                                  arr.shape, arr.ravel().tolist())

    inits = [t("w1", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)),
             t("wq", rng.standard_normal((16, 24)).astype(np.float32)),
             t("bq", rng.standard_normal(24).astype(np.float32)),
             t("i0", np.array([0], dtype=np.int64)),
             t("flat_rest", np.array([16, -1], dtype=np.int64)),
             t("heads_rest", np.array([16, 2, 12], dtype=np.int64))]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    for x, rest, out, k in (("r1", "flat_rest", "tok", 1), ("q", "heads_rest", "heads", 2)):
        if k == 2:
            nodes += [helper.make_node("Transpose", ["tok"], ["tokT"], name="tokT", perm=[0, 2, 1]),
                      helper.make_node("MatMul", ["tokT", "wq"], ["q0"], name="qkv"),
                      helper.make_node("Add", ["q0", "bq"], ["q"], name="qkv_bias")]
            if not heads:
                break
        nodes += [helper.make_node("Shape", [x], [f"s{k}"], name=f"shape{k}"),
                  helper.make_node("Gather", [f"s{k}", "i0"], [f"b{k}"], name=f"batch{k}", axis=0),
                  helper.make_node("Concat", [f"b{k}", rest], [f"shape_{out}"], name=f"shape_{out}", axis=0),
                  helper.make_node("Reshape", [x, f"shape_{out}"], [out], name=f"reshape_{out}")]
    nodes.append(helper.make_node("ReduceMean", ["heads" if heads else "q"], ["output"], name="pool",
                                  axes=[1, 3] if heads else [1], keepdims=0))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2 if heads else 24])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("heads", [True, False], ids=["merged-with-the-source's", "canonicalization's-own"])
def test_a_reshape_after_a_flattened_gemm_takes_the_models_batch(tmp_path, heads):
    """The Reshape canonicalization leaves after a Gemm over flattened tokens reads dim 0
    N x tokens: its batch is the model input's, not its input's dim 0 (0 in the shape)."""
    p = tmp_path / "tok.onnx"
    onnx.save(_token_model(heads), str(p))
    out = tmp_path / "o.onnx"
    doc = api.apply(p, {"rewrites": []}, out, ["input:1,3,8,8"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    assert _dims(out) == {"input": ["N", 3, 8, 8], "output": ["N", 2 if heads else 24]}
    x = random_input((3, 3, 8, 8))
    y3 = run_ort(str(out), {"input": x})[0]
    np.testing.assert_allclose(y3[1:2], run_ort(str(out), {"input": x[1:2]})[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y3, run_ort(str(p), {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_a_batch_folded_into_dim_0_stays_dynamic(tmp_path):
    """MobileViT unfolds patches with a Reshape to (N x C x patches, ...) computed from the
    batch: folded at batch 1 its dim 0 is a channel count, and -1 there carries the batch."""
    rng = np.random.default_rng(6)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [16, 3, 3, 3], rng.standard_normal(432).astype(np.float32)),
             helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("c16", TensorProto.INT64, [1], [16]),
             helper.make_tensor("hw", TensorProto.INT64, [2], [4, 4])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["b"], name="batch", axis=0),
             helper.make_node("Mul", ["b", "c16"], ["bc"], name="batch_x_channels"),
             helper.make_node("Concat", ["bc", "hw"], ["unfold_shape"], name="unfold_shape", axis=0),
             helper.make_node("Reshape", ["c", "unfold_shape"], ["unfolded"], name="unfold"),  # (N x 16, 4, 4)
             helper.make_node("ReduceMax", ["unfolded"], ["m"], name="max", axes=[1, 2], keepdims=0),
             helper.make_node("Concat", ["b", "c16"], ["fold_shape"], name="fold_shape", axis=0),
             helper.make_node("Reshape", ["m", "fold_shape"], ["output"], name="fold")]  # (N, 16)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])], inits)
    p = tmp_path / "unfold.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    out = tmp_path / "o.onnx"
    doc = api.apply(p, {"rewrites": []}, out, ["input:1,3,8,8"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    assert _dims(out) == {"input": ["N", 3, 8, 8], "output": ["N", 16]}
    x = random_input((3, 3, 8, 8))
    np.testing.assert_allclose(run_ort(str(out), {"input": x})[0], run_ort(str(p), {"input": x})[0], rtol=1e-5, atol=1e-5)
