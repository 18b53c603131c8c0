"""The exported-architecture cache produces models onnxruntime runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo
from builders import random_input, run_ort

pytestmark = pytest.mark.slow


def test_mobilenet_v2_export_runs(zoo_model):
    path = zoo_model("mobilenet_v2")
    assert path == zoo.export_model("mobilenet_v2")  # cached: same file, no re-export
    model = onnx.load(path)
    assert model.opset_import[0].version == zoo.OPSET
    assert [i.name for i in model.graph.input] == ["input"]
    (y,) = run_ort(path, {"input": random_input(zoo.INPUT_SHAPE)})
    assert y.shape == (1, 1000) and np.isfinite(y).all()


def test_dynamic_batch_variant(zoo_model):
    model = onnx.load(zoo_model("mobilenet_v2", dynamic_batch=True))
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"


def test_unknown_name_is_refused():
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.export_model("vgg99")
