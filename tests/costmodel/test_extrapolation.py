"""A choice far outside a target's calibrated range gets a note: the estimate is extrapolated there."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from archpass.analysis import analyze
from archpass.costmodel import estimate, load_target
from archpass.costmodel.calibrate import record_ranges
from archpass.costmodel.extrapolation import kernel_range
from archpass.costmodel.kernels import Kernel
from archpass.model import load_model
from archpass.passes.resize import resize_shapes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mobilenet_v2.onnx"


@pytest.fixture(scope="module")
def example():
    return analyze(load_model(EXAMPLE))


def _wide(s, channels):
    # far beyond what a recipe may ask (the channels pass bounds its choice): the Python API's shape path
    return resize_shapes(s, {"group1": channels})


def test_kernel_range():
    ks = [Kernel("a", "conv", "Conv", (), cin=8, cout=16, out_hw=(4, 4)), Kernel("b", "conv", "Conv", (), cin=32, cout=4)]
    r = kernel_range(ks)
    assert r["cin"] == [8, 32] and r["cout"] == [4, 16] and r["out_pixels"] == [1, 16]


@pytest.mark.parametrize("target", ["cpu", "edgetpu", "tpu"])
def test_note_only_far_outside_the_calibrated_range(example, target):
    assert not [n for n in estimate(example, target).notes if "extrapolated" in n]
    far = estimate(_wide(example, 100_000), target)
    note = [n for n in far.notes if "extrapolated" in n]
    assert len(note) == 1 and f"target {target} was calibrated on" in note[0]
    assert "/features/features.1/conv/conv.0/conv.0.0/Conv" in note[0] or "features.0" in note[0]


def test_a_target_without_ranges_gets_no_note(example):
    t = load_target("edgetpu")
    bare = replace(t, predictors={k: replace(p, stats={x: v for x, v in p.stats.items() if x != "range"})
                                  for k, p in t.predictors.items()})
    assert not [n for n in estimate(_wide(example, 100_000), bare).notes if "extrapolated" in n]


def test_record_ranges_reproduces_the_stored_ranges(tmp_path):
    src = load_target("tpu").path
    d = tmp_path / "tpu"
    shutil.copytree(src, d)
    doc = json.loads((d / "target.json").read_text())
    stored = {k: p["stats"].pop("range") for k, p in doc["predictors"].items()}
    (d / "target.json").write_text(json.dumps(doc))
    assert record_ranges(d) == stored
    assert load_target(d).predictors["conv"].stats["range"] == stored["conv"]
