"""Analysis raises nothing but archpass's own errors: Slice in its opset < 10 form (bounds as
attributes), strided channel slices, and an unexpected failure turned into one clear line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from archpass.analysis import analyze
from archpass.cli.main import app
from archpass.errors import AnalysisError
from archpass.model import model_from_proto


def _slice_model(opset: int, axis: int, step: int = 1):
    """conv(3->16) -> Slice(channels or height) -> conv(->4)."""
    rng = np.random.default_rng(0)
    cin2 = 8 if axis == 1 and step == 1 else (8 if axis == 1 else 16)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, cin2, 1, 1)).astype(np.float32), "w2")]
    start, end = (0, 16) if step == 2 else (0, 8)
    if opset < 10:
        sl = helper.make_node("Slice", ["a"], ["b"], name="slice", starts=[start], ends=[end], axes=[axis])
    else:
        inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
                  for n, v in (("st", [start]), ("en", [end]), ("ax", [axis]), ("sp", [step]))]
        sl = helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["b"], name="slice")
    out_h = 8 if axis == 2 else 16
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]), sl,
         helper.make_node("Conv", ["b", "w2"], ["output"], name="conv2")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, out_h, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("axis", [1, 2])
def test_slice_with_attribute_bounds_opset_9(axis):
    s = analyze(model_from_proto(_slice_model(9, axis)))
    assert [l.id for l in s.layers] == ["conv1", "conv2"]
    g = s.group(s.layer("conv1").out_group)
    if axis == 1:  # cutting channels with attribute bounds: fixed, with the reason
        assert not g.adjustable and "attribute bounds" in g.reason
    else:  # slicing the height keeps the channel layout
        assert s.layer("conv2").in_groups == (g.id,) and g.adjustable


def test_slice_with_input_bounds_on_channel_edges_keeps_the_group():
    s = analyze(model_from_proto(_slice_model(13, 2)))
    g = s.group(s.layer("conv1").out_group)
    assert g.adjustable and s.layer("conv2").in_groups == (g.id,)


def test_strided_channel_slice_fixes_the_group():
    s = analyze(model_from_proto(_slice_model(13, 1, step=2)))
    g = s.group(s.layer("conv1").out_group)
    assert not g.adjustable and "strides" in g.reason


def test_an_unexpected_failure_is_one_clear_error_naming_the_node(monkeypatch, tmp_path):
    import archpass.analysis as an

    def broken(self, n):
        raise IndexError("list index out of range")

    monkeypatch.setattr(an._Analyzer, "visit_split", broken)
    proto = _slice_model(13, 2)
    with pytest.raises(AnalysisError, match="archpass cannot analyze node 'slice' \\(Slice\\): IndexError.*report it"):
        analyze(model_from_proto(proto))
    p = tmp_path / "m.onnx"
    onnx.save(proto, str(p))
    r = CliRunner().invoke(app, ["inspect", str(p)])
    assert r.exit_code == 2 and r.stderr.startswith("error: archpass cannot analyze node 'slice'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["inspect", str(p), "--debug"])
    assert r.exit_code == 2 and "IndexError" in r.stderr and "Traceback" in r.stderr  # --debug keeps the cause
