"""archpass.tail: a detector's data-dependent post-processing is set aside at load and put
back, unchanged, in every emitted model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from archpass import api
from archpass.analysis import analyze
from archpass.cli.main import app  # noqa: E402
from archpass.model import model_from_proto
from archpass.passes.resolution import fixed_reason
from archpass.tail import attach, split
from builders import detector_model, run_ort


@pytest.fixture
def det(tmp_path):
    p = tmp_path / "det.onnx"
    onnx.save(detector_model(), str(p))
    return p


def _feeds(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)}


def test_the_network_before_the_data_dependent_nodes_is_what_archpass_analyzes(det):
    m = model_from_proto(onnx.load(str(det)))
    # the tensors the post-processing reads (the If's branches read `pooled` from the outer scope)
    assert set(m.tail.frontier) == {"pooled", "reg_rows", "prob", "keep"}
    assert m.tail.seeds == ("nonzero (NonZero)",)
    assert {o.name for o in m.proto.graph.output} == set(m.tail.frontier)
    assert not {n.op_type for n in m.proto.graph.node} & {"NonZero", "If", "Gather"}
    assert [o.name for o in m.tail.outputs] == ["boxes", "scores", "summary"]
    assert any("post-processing after the data-dependent NonZero (7 nodes" in n for n in m.notes)
    s = analyze(m)
    assert s.post_processing == ("nonzero (NonZero)",)
    heads = {l.output: l for l in s.layers if l.output in ("cls", "reg")}
    assert len(heads) == 2
    # the heads feed the post-processing: their channels stay, and so does the input size
    assert not any(s.group(l.out_group).adjustable for l in heads.values())
    assert "post-processing" in fixed_reason(s)


def test_the_tail_is_kept_as_the_source_wrote_it():
    # canonicalization (onnxslim) rewrote a Mask R-CNN's mask-pasting Loop into one that
    # pasted a single mask: the tail is cut from the source, not from the canonical model
    proto = detector_model()
    g = proto.graph
    gather = next(n for n in g.node if n.name == "gather_scores")
    gather.output[0] = "scores_raw"
    g.node.append(helper.make_node("Identity", ["scores_raw"], ["scores"], name="kept_identity"))
    m = model_from_proto(proto)
    assert any(n.name == "kept_identity" for n in m.tail.nodes)  # onnxslim would have bypassed it
    whole = attach(m.proto, m.tail)
    for got, want in zip(run_ort(whole, _feeds()), run_ort(proto, _feeds())):
        np.testing.assert_array_equal(got, want)


def test_no_split_without_data_dependent_shapes():
    proto = detector_model()
    m = model_from_proto(proto)
    again = onnx.ModelProto()
    again.CopyFrom(m.proto)  # the network alone: all of it static
    assert model_from_proto(again).tail is None
    assert split(again, (), {}) is None


def test_attach_gives_back_the_source_model(det):
    m = model_from_proto(onnx.load(str(det)))
    whole = attach(m.proto, m.tail)
    onnx.checker.check_model(whole, full_check=True)
    assert [o.name for o in whole.graph.output] == ["boxes", "scores", "summary"]
    for got, want in zip(run_ort(whole, _feeds()), run_ort(str(det), _feeds())):
        np.testing.assert_array_equal(got, want)


def test_a_tail_initializer_the_rewrite_reused_for_another_tensor_is_renamed(det):
    m = model_from_proto(onnx.load(str(det)))
    net = onnx.ModelProto()
    net.CopyFrom(m.proto)
    # the rewritten network holds another tensor under the name of one the tail reads
    name = next(t.name for t in m.tail.initializers if t.name == "axis0")
    net.graph.initializer.append(numpy_helper.from_array(np.array([5, 5], np.int64), name))
    net.graph.node.append(helper.make_node("Identity", [name], ["unused"], name="user"))
    whole = attach(net, m.tail)
    assert any(n.input[1] == "axis0__tail1" for n in whole.graph.node if n.name == "idx")
    assert len(run_ort(whole, _feeds())[0]) == len(run_ort(str(det), _feeds())[0])


def test_attach_refuses_a_network_that_lost_a_frontier_tensor(det):
    m = model_from_proto(onnx.load(str(det)))
    net = onnx.ModelProto()
    net.CopyFrom(m.proto)
    kept = [n for n in net.graph.node if "pooled" not in n.output]
    del net.graph.node[:]
    net.graph.node.extend(kept)
    with pytest.raises(Exception, match="no longer computes 'pooled'.*archpass bug"):
        attach(net, m.tail)


def test_apply_emits_the_whole_detector_and_an_exact_rewrite_keeps_its_detections(det, tmp_path):
    out = tmp_path / "o.onnx"
    grown = next(x for x in api.inspect(det)["sites"] if x["pass"] == "channels")
    doc = api.apply(det, {"rewrites": [{"pass": "dw_to_dense", "site": "ibn0_dw"},  # both exact
                                       {"pass": "channels", "site": grown["site"],
                                        "channels": grown["domains"]["channels"]["current"] + 8}]}, out)
    assert doc["exact"] and any("post-processing" in n for n in doc["notes"])
    onnx.checker.check_model(str(out), full_check=True)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["boxes", "scores", "summary"]
    for seed in range(3):
        got, want = run_ort(str(out), _feeds(seed)), run_ort(str(det), _feeds(seed))
        assert len(want[1]) > 0
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # the emitted model loads again (post-processing set aside) and shows its record
    again = api.inspect(out)
    assert again["rewrites"] and any("post-processing" in n for n in again["notes"])


def test_optimize_emits_the_whole_detector(det, tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(app, ["optimize", str(det), "-o", str(out), "--target", "edgetpu", "--trials", "12",
                                   "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rewrites"] and any("post-processing" in n for n in doc["notes"])
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "summary"]
    boxes, scores, summary = run_ort(str(out), _feeds())
    assert boxes.shape == (len(scores), 4) and summary.shape == (1, 32, 1, 1)


def test_a_tail_constant_the_network_computes_under_that_name_is_renamed(det):
    m = model_from_proto(onnx.load(str(det)))
    net = onnx.ModelProto()
    net.CopyFrom(m.proto)
    # the network now computes a tensor named like a constant the tail reads
    net.graph.node.append(helper.make_node("Shape", ["x"], ["axis0"], name="computes_axis0", start=0, end=1))
    whole = attach(net, m.tail)
    onnx.checker.check_model(whole, full_check=True)
    assert any(n.input[1] == "axis0__tail1" for n in whole.graph.node if n.name == "idx")
