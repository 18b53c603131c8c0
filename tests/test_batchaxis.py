"""archpass.batchaxis: an input without a batch axis (the graph adds it) is analyzed as a
batch of one and emitted as the source had it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from archpass import api
from archpass.batchaxis import find, unwrap, wrap
from archpass.model import model_from_proto
from builders import NetBuilder, detector_model, run_ort


def batchless(model: onnx.ModelProto, how: str = "unsqueeze") -> onnx.ModelProto:
    """``model`` (input ``input`` (1, 3, H, W)) reading one ``image`` (3, H, W) instead,
    normalized and given its batch axis inside the graph (an Unsqueeze at axis 0, or a
    Reshape to (1, 3, H, W))."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    g.initializer.extend([numpy_helper.from_array(np.full((3, 1, 1), 0.5, np.float32), "mean"),
                          numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                          numpy_helper.from_array(np.array(shape, np.int64), "batched")])
    add = (helper.make_node("Unsqueeze", ["centered", "axis0"], ["input"], name="add_batch") if how == "unsqueeze"
           else helper.make_node("Reshape", ["centered", "batched"], ["input"], name="add_batch"))
    nodes = [helper.make_node("Sub", ["image", "mean"], ["centered"], name="normalize"), add] + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("image", TensorProto.FLOAT, shape[1:]))
    onnx.checker.check_model(m, full_check=True)
    return m


def _net():
    return NetBuilder((1, 3, 32, 32), seed=4).conv(16, 3, stride=2).ibn(16, expand=4).ibn(24, expand=4, stride=2).head(5).build()


def _image(seed=0, hw=32):
    return np.random.default_rng(seed).standard_normal((3, hw, hw)).astype(np.float32)


@pytest.mark.parametrize("how", ["unsqueeze", "reshape"])
def test_an_input_the_graph_gives_a_batch_axis_is_found(how):
    m = model_from_proto(batchless(_net(), how))
    assert m.batchless == ("image",) and m.inputs == {"image": (1, 3, 32, 32)}
    assert m.source_inputs == {"image": (3, 32, 32)}
    assert any("'image' has no batch axis" in n for n in m.notes)
    first = m.proto.graph.node[0]
    assert first.op_type == "Squeeze" and first.input[0] == "image"


def test_inputs_with_a_batch_axis_are_left_alone():
    assert find(model_from_proto(_net()).proto) == ()
    assert model_from_proto(detector_model()).batchless == ()
    # a 1-D signal (batch, samples) given its channel axis (Unsqueeze at axis 1) has its batch
    w = numpy_helper.from_array(np.ones((4, 1, 3), np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    g = helper.make_graph([helper.make_node("Unsqueeze", ["x", "axes"], ["x3"], name="channel"),
                           helper.make_node("Conv", ["x3", "w"], ["y"], name="conv")], "sig",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 62])], [w, axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert model_from_proto(m).batchless == ()


def test_wrap_then_unwrap_is_the_source():
    src = batchless(_net())
    m = model_from_proto(src)
    back = unwrap(m.proto, m.batchless)
    onnx.checker.check_model(back, full_check=True)
    assert [d.dim_value for d in back.graph.input[0].type.tensor_type.shape.dim] == [3, 32, 32]
    assert not any(n.op_type == "Squeeze" for n in back.graph.node)
    np.testing.assert_allclose(run_ort(back, {"image": _image()})[0], run_ort(src, {"image": _image()})[0],
                               rtol=1e-5, atol=1e-6)
    again = onnx.ModelProto()
    again.CopyFrom(src)
    wrap(again, ("image",))  # the same as loading did, on the raw source
    assert run_ort(again, {"image": _image()[None]})[0].shape == (1, 5)


def test_apply_with_calibration_data_per_image_and_a_new_resolution(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(batchless(_net()), str(src))
    data = tmp_path / "calib.npy"
    np.save(data, np.stack([_image(s) for s in range(6)]))  # six images of (3, 32, 32)
    out = tmp_path / "o.onnx"
    doc = api.apply(src, {"rewrites": [{"pass": "fuse_ibn", "site": "block1"}]}, out, calib=data)
    fid = doc["fidelity"]
    assert fid["calibration"]["samples"] == 6 and fid["after"]["samples"] == 6
    assert fid["before"]["score"] < fid["after"]["score"] <= 1  # recovered on the six images
    onnx.checker.check_model(str(out), full_check=True)
    assert run_ort(str(out), {"image": _image()})[0].shape == (1, 5)
    grown = tmp_path / "r.onnx"
    api.apply(src, {"rewrites": [{"pass": "resolution", "height": 48, "width": 48}]}, grown)
    m = onnx.load(str(grown))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [3, 48, 48]
    assert run_ort(str(grown), {"image": _image(hw=48)})[0].shape == (1, 5)


def test_a_batchless_detector_optimizes_to_the_source_interface(tmp_path):
    src = tmp_path / "det.onnx"
    onnx.save(detector_model(batched=False), str(src))
    out = tmp_path / "o.onnx"
    doc = api.optimize(src, out, "edgetpu", trials=8, calib="random",
                       calib_options={"samples": 6})
    assert any("no batch axis" in n for n in doc["notes"]) and any("post-processing" in n for n in doc["notes"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [3, 32, 32]
    boxes, scores, _ = run_ort(str(out), {"image": _image()})
    assert boxes.shape == (len(scores), 4)
