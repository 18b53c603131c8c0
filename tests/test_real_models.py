"""Analysis of real torchvision exports (opset 17, weights=None)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from archpass.analysis import analyze
from archpass.cli.main import app
from archpass.model import load_model

ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "resnet18",
         "resnet50", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "densenet121",
         "convnext_tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_inspect_real_architecture(zoo_model, name):
    r = CliRunner().invoke(app, ["inspect", str(zoo_model(name)), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["layers"] and doc["channel_groups"]
    assert doc["totals"]["macs"] > 0
    ids = [l["id"] for l in doc["layers"]]
    assert len(set(ids)) == len(ids)
    # the classifier output is never adjustable
    assert any(not g["adjustable"] and "model output" in (g["reason"] or "") for g in doc["channel_groups"])


@pytest.mark.slow
def test_mobilenet_v2_blocks(zoo_model):
    s = analyze(load_model(zoo_model("mobilenet_v2")))
    kinds = [b.kind for b in s.blocks]
    assert kinds == ["depthwise"] + ["ibn"] * 16
    assert sum(b.residual for b in s.blocks) == 10
    assert len(s.stages) == 5
    assert s.macs == pytest.approx(300.8e6, rel=0.01)  # the published 300M MACs
    assert all(l.activation == "relu6" for b in s.blocks if b.kind == "ibn" for l in (s.layer(b.role("expand")),))


@pytest.mark.slow
def test_mobilenet_v3_large_se_blocks(zoo_model):
    s = analyze(load_model(zoo_model("mobilenet_v3_large")))
    se = [b for b in s.blocks if b.role("se_expand")]
    assert len(se) == 8
    assert {s.layer(b.role("expand")).activation for b in s.blocks if b.kind == "ibn"} == {"relu", "hardswish"}
    assert s.macs == pytest.approx(217e6, rel=0.03)


@pytest.mark.slow
def test_resnet_residual_blocks_and_stages(zoo_model):
    s = analyze(load_model(zoo_model("resnet50")))
    assert [b.kind for b in s.blocks] == ["residual"] * 16
    assert [len(st.blocks) for st in s.stages] == [3, 4, 6, 3]
    assert sum(1 for b in s.blocks if b.role("shortcut")) == 4


@pytest.mark.slow
def test_shufflenet_groups_report_why_not_adjustable(zoo_model):
    s = analyze(load_model(zoo_model("shufflenet_v2_x1_0")))
    fixed = [g for g in s.groups if not g.adjustable]
    assert any("Reshape" in g.reason for g in fixed)


@pytest.mark.slow
def test_dynamic_batch_export_needs_and_takes_input_shape(zoo_model):
    path = zoo_model("mobilenet_v2", dynamic_batch=True)
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "--input-shape" in r.stderr
    r = CliRunner().invoke(app, ["inspect", str(path), "--input-shape", "input:4,3,224,224", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["inputs"][0]["shape"] == [4, 3, 224, 224]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "googlenet", "mobilenet_v3_large"])
def test_fast_canonical_path_matches_onnxslim(zoo_model, name, monkeypatch):
    """Clean exports skip onnxslim; the structure (and so every id) is the one onnxslim gives."""
    import onnx

    import archpass.model as am

    path = zoo_model(name)
    assert am._trivially_canonical(onnx.load(str(path))) is not None
    fast = analyze(load_model(path)).to_json()
    monkeypatch.setattr(am, "_trivially_canonical", lambda proto: None)
    assert analyze(load_model(path)).to_json() == fast


@pytest.mark.slow
@pytest.mark.parametrize("name,published", [("convnext_tiny", 4.47e9), ("resnet50", 4.11e9), ("mobilenet_v2", 0.30e9)])
def test_macs_match_the_published_figures(zoo_model, name, published):
    """Multiply-accumulates as torchvision's model cards give them (GFLOPS there are MACs),
    within 3%: ConvNeXt's Linears run over every position, not once per image."""
    s = analyze(load_model(zoo_model(name)))
    assert s.macs == pytest.approx(published, rel=0.03)
