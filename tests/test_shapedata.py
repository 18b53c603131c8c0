"""archpass.shapedata: data the source computes from its input shapes comes back in the output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import NetBuilder, random_input, run_ort
from onnx import TensorProto, helper

from archpass import api, shapedata
from archpass.model import load_model
from archpass.shapedata import relink, shape_data


def _as_strided_head(channels: int = 16) -> onnx.ModelProto:
    """How torch's dynamo exporter writes timm's ConvNeXt-V2/EdgeNeXt head with a dynamic
    batch: after pooling, ``as_strided`` is a Gather over the flattened tensor whose indices
    are ``Range(0, N) * C`` (N from ``Shape(input)``) plus ``0..C-1``; then a Reshape to (-1, C)."""
    rng = np.random.default_rng(8)
    c = channels
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [c, 3, 3, 3], rng.standard_normal(c * 27).astype(np.float32)),
             helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("stride", TensorProto.INT64, [], [c]),
             helper.make_tensor("unsq", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("offsets", TensorProto.INT64, [1, c, 1, 1], list(range(c))),
             helper.make_tensor("flat_c", TensorProto.INT64, [2], [-1, c])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["conv", "axes"], ["pooled"], name="pool", keepdims=1),
             helper.make_node("Reshape", ["pooled", "minus1"], ["flat"], name="flatten"),
             helper.make_node("Shape", ["input"], ["in_shape"], name="in_shape", start=0, end=1),
             helper.make_node("Squeeze", ["in_shape"], ["n"], name="sym_size"),
             helper.make_node("Range", ["zero", "n", "one"], ["items"], name="range"),
             helper.make_node("Mul", ["items", "stride"], ["starts"], name="starts"),
             helper.make_node("Unsqueeze", ["starts", "unsq"], ["starts4"], name="starts4"),
             helper.make_node("Add", ["starts4", "offsets"], ["indices"], name="indices"),
             helper.make_node("Gather", ["flat", "indices"], ["strided"], name="as_strided", axis=0),
             helper.make_node("Reshape", ["strided", "flat_c"], ["output"], name="view")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])  # ReduceMean axes as an input


def test_the_gather_indices_are_recorded_and_reshape_shapes_are_not():
    data = shape_data(_as_strided_head())
    assert [(d.consumer, d.index) for d in data] == [("as_strided", 1)]
    sub = onnx.GraphProto.FromString(data[0].graph)
    assert [vi.name for vi in sub.input] == ["input"] and sub.output[0].name == "indices"
    assert [n.name for n in sub.node] == ["in_shape", "sym_size", "range", "starts", "starts4", "indices"]
    # a static model computes nothing from shapes at run time worth recording
    assert shape_data(NetBuilder((1, 3, 16, 16)).conv(8, 3).head(4).build()) == ()


@pytest.mark.parametrize("batch", [1, 2])
def test_a_dynamic_batch_survives_indices_computed_from_it(tmp_path, batch):
    """Canonicalization folds the indices at the pinned batch (item 0 gathered whatever the
    batch); the output computes them from the input's batch again and its items do not mix."""
    p, out = tmp_path / "head.onnx", tmp_path / "o.onnx"
    onnx.save(_as_strided_head(), str(p))
    doc = api.apply(p, {"rewrites": []}, out, [f"input:{batch},3,8,8"])
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    o = onnx.load(str(out))
    onnx.checker.check_model(o, full_check=True)
    assert [d.dim_param or d.dim_value for d in o.graph.output[0].type.tensor_type.shape.dim] == ["N", 16]
    x = random_input((3, 3, 8, 8))
    np.testing.assert_allclose(run_ort(o, {"input": x})[0], run_ort(str(p), {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_relink_keeps_a_constant_the_subgraph_does_not_reproduce(tmp_path):
    """Only a folded constant equal to the subgraph's value at the static input sizes is
    replaced: a pinned size other than the static model's, or a changed constant, is left."""
    p = tmp_path / "head.onnx"
    onnx.save(_as_strided_head(), str(p))
    m = load_model(p, {"input": (2, 3, 8, 8)})
    gather = next(n for n in m.proto.graph.node if n.name == "as_strided")
    folded = gather.input[1]

    def relinked(static) -> tuple[int, onnx.ModelProto]:
        work = onnx.ModelProto()
        work.CopyFrom(m.proto)
        return relink(work, m.shape_data, static), work

    k, work = relinked(m.proto)
    assert k == 1 and folded not in {i.name for i in work.graph.initializer}
    other = load_model(p, {"input": (3, 3, 8, 8)}).proto  # the indices of a batch of 3
    k, work = relinked(other)
    assert k == 0 and work == m.proto


def _class_token_model() -> onnx.ModelProto:
    """ViT's class token as torch's dynamo exporter writes it with a dynamic batch: an
    Expand of the (1, 1, C) token to Concat(Shape(input)[0:1], 1, 1), concatenated with
    the patch tokens (which a Reshape to (0, C, -1) keeps batched)."""
    rng = np.random.default_rng(9)
    c = 16
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [c, 3, 4, 4], rng.standard_normal(c * 48).astype(np.float32)),
             helper.make_tensor("class_token", TensorProto.FLOAT, [1, 1, c], rng.standard_normal(c).astype(np.float32)),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("tokens_shape", TensorProto.INT64, [3], [0, c, -1]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["patches"], name="patchify", strides=[4, 4]),
             helper.make_node("Reshape", ["patches", "tokens_shape"], ["flat"], name="flatten"),
             helper.make_node("Transpose", ["flat"], ["tokens"], name="to_tokens", perm=[0, 2, 1]),
             helper.make_node("Shape", ["input"], ["in_shape"], name="in_shape", start=0, end=1),
             helper.make_node("Concat", ["in_shape", "one", "one"], ["expand_shape"], name="expand_shape", axis=0),
             helper.make_node("Expand", ["class_token", "expand_shape"], ["cls"], name="expand"),
             helper.make_node("Concat", ["cls", "tokens"], ["seq"], name="cat", axis=1),
             helper.make_node("ReduceMean", ["seq", "axes"], ["pooled"], name="pool", keepdims=0),
             helper.make_node("Relu", ["pooled"], ["output"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("large", [False, True], ids=["token-recorded", "token-above-MAX_CONSTANT"])
def test_a_class_token_expanded_to_the_batch_follows_it(tmp_path, monkeypatch, large):
    """The class token's Expand is recorded with the token and the output keeps the batch
    and the source's values; a token counted as a large weight is not copied: the batch
    stays static and the notes say so."""
    if large:
        monkeypatch.setattr(shapedata, "MAX_CONSTANT", 8)
    assert [(d.consumer, d.index) for d in shape_data(_class_token_model())] == ([] if large else [("cat", 0)])
    p, out = tmp_path / "vit.onnx", tmp_path / "o.onnx"
    onnx.save(_class_token_model(), str(p))
    doc = api.apply(p, {"rewrites": []}, out, ["input:1,3,8,8"])
    if large:
        assert any("kept the pinned dims input[0] static" in n for n in doc["notes"]), doc["notes"]
        return
    assert any("kept the source's dynamic dims input[0] dynamic" in n for n in doc["notes"]), doc["notes"]
    x = random_input((3, 3, 8, 8))
    np.testing.assert_allclose(run_ort(str(out), {"input": x})[0], run_ort(str(p), {"input": x})[0], rtol=1e-5, atol=1e-5)
