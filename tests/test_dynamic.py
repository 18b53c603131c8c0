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


def test_symbolic_dims():
    assert symbolic_dims(messy_model()) == (("input", ("N", 3, "H", "W")), ("output", ("N", 10)))
