"""The committed architecture skeletons fill into sane, loadable models without torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo
from builders import random_input, run_ort
from skeleton import PREFIX, fill, strip

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_every_skeleton_fills_into_a_sane_model(zoo_model, name):
    path = zoo_model(name)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == zoo.OPSET
    assert [i.name for i in model.graph.input] == ["input"]
    assert not any(t.doc_string.startswith(PREFIX) for t in model.graph.initializer)
    (y,) = run_ort(path, {"input": random_input(zoo.input_shape(name))})
    # numerically sane: finite, and neither vanishing nor exploding through the depth
    assert np.isfinite(y).all()
    assert 1e-2 < float(y.std()) < 1e4, float(y.std())


def test_skeletons_are_small_and_weight_free():
    files = sorted(zoo.SKELETONS.glob("*.onnx"))
    assert {f.name for f in files} == {zoo.skeleton_path(n).name for n in zoo.MODELS} | {
        zoo.skeleton_path(n, dynamic_batch=True).name for n in zoo.DYNAMIC_BATCH}
    assert sum(f.stat().st_size for f in files) < 2_000_000
    for f in files:
        skel = onnx.load(f)
        for t in skel.graph.initializer:  # a stub carries no data; anything kept is small or not float
            if t.doc_string.startswith(PREFIX):
                assert not (t.raw_data or t.float_data)
            else:
                assert int(np.prod(t.dims)) <= 16 or t.data_type != onnx.TensorProto.FLOAT


def test_materialized_file_is_cached_and_deterministic(tmp_path, monkeypatch):
    first = zoo.model_path("resnet18")
    assert zoo.model_path("resnet18") == first  # the second call is a lookup
    monkeypatch.setenv("ARCHPASS_TEST_CACHE", str(tmp_path))
    again = zoo.model_path("resnet18")
    assert again != first and again.read_bytes() == first.read_bytes()


def test_fill_follows_the_consumer():
    """Conv weights get fan-in scaled normals, BN variances stay positive, small tensors keep data."""
    from builders import NetBuilder

    proto = NetBuilder((1, 3, 16, 16)).conv(32, k=3, act="relu").batchnorm().conv(8, k=1, act=None).build()
    skel, stubs = strip(proto)
    kinds = {t.name: t.doc_string for t in skel.graph.initializer}
    assert stubs == sum(1 for k in kinds.values() if k)
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    assert kinds[bn.input[1]] == PREFIX + "scale" and kinds[bn.input[4]] == PREFIX + "scale"
    assert kinds[bn.input[2]] == PREFIX + "shift" and kinds[bn.input[3]] == PREFIX + "shift"
    full = fill(skel)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    assert (values[bn.input[4]] > 0).all()
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    w = values[conv.input[1]]
    assert w.shape == (32, 3, 3, 3) and abs(float(w.std()) - np.sqrt(2 / 27)) < 0.05
    small = next(n for n in proto.graph.node if n.op_type == "Conv" and n is not conv)
    assert not kinds[small.input[2]]  # an 8-element bias keeps its exported data
    np.testing.assert_array_equal(values[small.input[2]], onnx.numpy_helper.to_array(
        next(t for t in proto.graph.initializer if t.name == small.input[2])))
    onnx.checker.check_model(full, full_check=True)
    assert fill(skel).SerializeToString() == full.SerializeToString()  # seeded


def test_dynamic_batch_variant(zoo_model):
    model = onnx.load(zoo_model("mobilenet_v2", dynamic_batch=True))
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"


def test_unknown_name_is_refused():
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.model_path("vgg99")
    with pytest.raises(KeyError, match="no dynamic-batch variant"):
        zoo.model_path("resnet18", dynamic_batch=True)
