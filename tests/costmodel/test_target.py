"""Target files: predictor round trip (JSON + LightGBM text), bad target files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from archpass.costmodel import Kernel, load_target, save_target
from archpass.costmodel.calibrate import fit_predictors, point_key
from archpass.costmodel.estimate import predict_kernels
from archpass.costmodel.kernels import FusionRules
from archpass.costmodel.sampling import sample_layers
from archpass.costmodel.target import Target, builtin_names
from archpass.errors import TargetError


def _synthetic_target() -> tuple[Target, list[Kernel]]:
    """Predictors fitted on a made-up but shape-dependent latency law."""
    t = Target(name="synthetic", parallelism=8, bytes_per_element=1, clock_hz=1e9,
               unroll={"K": 8, "C": 8}, fusion=FusionRules(layers_only=True), source={"backend": "test"})
    rng = random.Random(1)
    points = []
    for spec in sample_layers(200, seed=3):
        k = Kernel.from_spec(spec)
        ms = 1e-6 * (k.macs / (8 * 8) * (1.3 if k.cin % 8 else 1.0)) + 1e-3 * rng.uniform(0.9, 1.1)
        points.append((point_key(spec), spec, ms))
    t.predictors, t.accuracy = fit_predictors(t, points, rounds=50)
    return t, [Kernel.from_spec(s) for _, s, _ in points[:40]]


def test_predictor_round_trip_is_exact(tmp_path):
    t, kernels = _synthetic_target()
    save_target(t, tmp_path / "synthetic")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "synthetic").rglob("*"))
    assert "synthetic/target.json" in files and any(f.endswith(".txt") for f in files)
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)
    back = load_target(tmp_path / "synthetic")
    a, _ = predict_kernels(kernels, t)
    b, _ = predict_kernels(kernels, back)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert back.fusion == t.fusion and back.unroll == t.unroll and back.accuracy == json.loads(json.dumps(t.accuracy))
    # the predictor learned the law well enough on held-out points to be useful
    assert t.accuracy["kernels"]["conv"]["mape_pct"] < 25


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError) as e:
        load_target("no-such-target")
    msg = str(e.value)
    assert "unknown target 'no-such-target'" in msg
    for name in builtin_names():
        assert name in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "breakage, expect",
    [
        (lambda d: (d / "target.json").write_text("{not json"), "not readable JSON"),
        (lambda d: (d / "target.json").write_text("[1, 2]"), "does not hold a JSON object"),
        (lambda d: _edit(d, lambda j: j.pop("parallelism")), "misses parallelism"),
        (lambda d: _edit(d, lambda j: j.update(format=99)), "format 99"),
        (lambda d: next((d / "predictors").glob("*.txt")).write_text("garbage"), "is broken"),
        (lambda d: next((d / "predictors").glob("*.txt")).unlink(), "is broken"),
        (lambda d: _edit(d, lambda j: j["predictors"]["conv"].update(model_file="../../etc/passwd")), "outside the target"),
        (lambda d: _edit(d, lambda j: j["predictors"]["conv"].update(features=["x"])), "is broken"),
    ],
)
def test_broken_target_files_fail_with_one_line(tmp_path, breakage, expect):
    t, _ = _synthetic_target()
    d = save_target(t, tmp_path / "t")
    breakage(d)
    with pytest.raises(TargetError) as e:
        load_target(d)
    assert expect in str(e.value) and "\n" not in str(e.value)


def _edit(d, fn):
    j = json.loads((d / "target.json").read_text())
    fn(j)
    (d / "target.json").write_text(json.dumps(j))


def test_directory_without_target_json(tmp_path):
    with pytest.raises(TargetError, match="has no target.json"):
        load_target(tmp_path)
