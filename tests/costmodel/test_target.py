"""Target files: predictor round trip (JSON + LightGBM text), bad target files."""

from __future__ import annotations

import json
import random
from dataclasses import replace

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
    preds, acc = fit_predictors(t, points, rounds=50)
    t = replace(t, predictors=preds, accuracy=acc)
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


def test_context_predictors_read_the_network_size_and_round_trip(tmp_path):
    """Runtime targets learn how a kernel's time depends on the network around it: here a
    made-up law where kernels run twice as fast in networks under 8 MB of weights."""
    from archpass.costmodel.features import CONTEXT_FEATURES, network_context

    t = Target(name="ctx", parallelism=8, bytes_per_element=4, clock_hz=None, unroll={"K": 8, "C": 8, "G": 8},
               fusion=FusionRules(residual_add=True), source={"backend": "test"})
    specs = sample_layers(600, seed=5)
    rng = random.Random(2)
    points, contexts = [], {}
    for i in range(0, len(specs), 6):  # "networks" of six layers, weights scaled up to vary their size
        key = point_key({"net": i})
        ks = [Kernel.from_spec(s) for s in specs[i:i + 6]]
        w_mb = network_context(ks, 4)[0] * rng.choice([0.5, 1, 4, 16])
        contexts[key] = (w_mb, *network_context(ks, 4)[1:])
        for s, k in zip(specs[i:i + 6], ks):
            ms = 1e-7 * k.macs * (0.5 if w_mb < 8 else 1.0) + 1e-3
            points.append((key, s, ms))
    preds, acc = fit_predictors(t, points, rounds=80, contexts=contexts)
    t = replace(t, predictors=preds, accuracy=acc)
    assert all(p.context and p.features[-len(CONTEXT_FEATURES):] == CONTEXT_FEATURES for p in t.predictors.values())
    back = load_target(save_target(t, tmp_path / "ctx"))
    assert all(p.context for p in back.predictors.values())
    big = Kernel.from_spec(dict(kind="conv", op="Conv", cin=64, cout=64, kernel=[3, 3], stride=[1, 1], groups=1,
                                in_hw=[28, 28], out_hw=[28, 28]))
    small_net = [big]
    heavy = Kernel.from_spec(dict(kind="conv", op="Conv", cin=1024, cout=2048, kernel=[3, 3], stride=[1, 1], groups=1,
                                  in_hw=[7, 7], out_hw=[7, 7]))  # 72 MB of weights around it
    alone, _ = predict_kernels(small_net, back)
    crowded, _ = predict_kernels([big, heavy], back)
    assert crowded[0] > 1.4 * alone[0]
    a, _ = predict_kernels([big, heavy], t)
    np.testing.assert_allclose(a, crowded, rtol=1e-12)


def test_target_is_immutable_and_saving_changes_nothing(tmp_path):
    import dataclasses

    t, kernels = _synthetic_target()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "other"  # type: ignore[misc]
    before = json.dumps(t.to_json(), sort_keys=True)
    files = {k: p.model_file for k, p in t.predictors.items()}
    d = save_target(t, tmp_path / "a")
    assert json.dumps(t.to_json(), sort_keys=True) == before and t.path is None
    assert {k: p.model_file for k, p in t.predictors.items()} == files
    back = load_target(d)
    assert back.to_json() == json.loads(before) and back.path == d
    renamed = dataclasses.replace(back, name="renamed")
    assert renamed.name == "renamed" and back.name == "synthetic"
