"""Layer sampling for calibration."""

from __future__ import annotations

from archpass.costmodel.sampling import sample_layers
from archpass.structure import conv_out


def test_samples_are_a_pure_function_of_the_seed():
    assert sample_layers(50, seed=3) == sample_layers(50, seed=3)
    assert sample_layers(50, seed=3, any_size=True) == sample_layers(50, seed=3, any_size=True)
    assert sample_layers(50, seed=3) != sample_layers(50, seed=3, any_size=True)


def test_any_size_samples_reach_the_odd_sizes_real_networks_have():
    standard = {s["in_hw"][0] for s in sample_layers(400, seed=0) if s["kind"] != "gemm"}
    anysize = {s["in_hw"][0] for s in sample_layers(400, seed=0, any_size=True) if s["kind"] != "gemm"}
    # standard resolutions halved give few odd sizes beyond 3, 5, 7 and 9
    assert not {55, 27, 13, 111} & standard
    odd = {h for h in anysize if h % 2 and h > 9}
    assert len(odd) >= 20 and len(anysize) > 2 * len(standard)


def test_sampled_geometry_is_consistent():
    for s in sample_layers(300, seed=1, any_size=True):
        if s["kind"] == "gemm":
            continue
        k, st, hw = s["kernel"][0], s["stride"][0], s["in_hw"][0]
        assert s["out_hw"][0] == conv_out(hw, k, st, k // 2, k // 2) >= 1
        assert s["cin"] % s["groups"] == 0 and s["cout"] % s["groups"] == 0
        if s["kind"] == "dwconv":
            assert s["groups"] == s["cin"] == s["cout"]
