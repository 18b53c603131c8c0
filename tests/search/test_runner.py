"""search/runner.py: running many samples in chunks, the fallback for graphs that spell
their batch size, segments of a graph, and the Stepper that runs each node once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from archpass.search.runner import Runner, Stepper, build_segment, needed_nodes


def _conv_model(batch_spelled: bool) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(4) -> Relu -> GlobalAveragePool -> Reshape -> Gemm(5).  With
    ``batch_spelled`` the Reshape's target is [1, 4] (as the dynamo exporter writes it),
    else [-1, 4]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1 if batch_spelled else -1, 4], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="view"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _one_by_one(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.fixture
def samples() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((7, 3, 8, 8)).astype(np.float32)


def test_a_batch_free_graph_runs_in_chunks(samples):
    m = _conv_model(batch_spelled=False)
    r = Runner(m, chunk=3)
    (y,) = r.run({"x": samples})
    assert r.dynamic is True
    assert y.shape == (7, 5)
    np.testing.assert_allclose(y, _one_by_one(m, samples), rtol=1e-5, atol=1e-5)


def test_a_graph_that_spells_its_batch_falls_back_quietly(samples, capfd):
    m = _conv_model(batch_spelled=True)
    r = Runner(m)
    (y,) = r.run({"x": samples})
    assert r.dynamic is False
    np.testing.assert_allclose(y, _one_by_one(m, samples), rtol=1e-5, atol=1e-5)
    # the failed probe is handled: onnxruntime's own error line must not reach the user
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "Reshape" not in err, err


def test_intermediate_tensors_as_outputs(samples):
    m = _conv_model(batch_spelled=False)
    relu, y = Runner(m, ["r", "y"]).run({"x": samples})
    assert relu.shape == (7, 4, 8, 8) and (relu >= 0).all()
    np.testing.assert_allclose(y, _one_by_one(m, samples), rtol=1e-5, atol=1e-5)


def test_segment_computes_the_tail_from_a_known_tensor(samples):
    m = _conv_model(batch_spelled=False)
    (relu,) = Runner(m, ["r"]).run({"x": samples})
    nodes = needed_nodes(m, ["y"], known=["r"])
    assert [m.graph.node[i].name for i in nodes] == ["gap", "view", "fc"]
    seg = build_segment(m, nodes, ["y"])
    assert [i.name for i in seg.graph.input] == ["r"]
    (y,) = Runner(seg).run({"r": relu})
    np.testing.assert_allclose(y, _one_by_one(m, samples), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_spelled", [False, True])
def test_stepper_runs_each_node_once_until_invalidated(samples, batch_spelled):
    m = _conv_model(batch_spelled)
    s = Stepper(m, {"x": samples})
    (relu,) = s.get(["r"])
    (y,) = s.get(["y"])
    assert s.runs == 2  # the second call only ran the tail
    np.testing.assert_allclose(y, _one_by_one(m, samples), rtol=1e-5, atol=1e-5)
    s.get(["y"])
    assert s.runs == 2  # nothing to recompute
    s.invalidate("gap")
    (y2,) = s.get(["y"])
    assert s.runs == 3
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


def test_a_scalar_output_is_one_value_per_run():
    # a size the network computes for a detector's post-processing (archpass.tail): 0-D per run
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
                           helper.make_node("Relu", ["x"], ["y"], name="relu")], "scalar",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    total, y = Runner(m).run({"x": x})
    np.testing.assert_allclose(total, x.sum(axis=1))
    assert y.shape == (3, 4)
