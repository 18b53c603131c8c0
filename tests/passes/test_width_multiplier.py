"""The `width_multiplier` pass: snapping, validation, stage sites, built and real models."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # apply_helpers, resize_helpers

from builders import NetBuilder  # noqa: E402
from resize_helpers import (  # noqa: E402
    assert_same_function,
    assert_shapes_agree,
    built,
    loaded,
    outputs,
    rewrite_one,
)

from archpass.errors import RecipeError  # noqa: E402
from archpass.passes.base import FloatDomain, IntDomain, Match, get_pass  # noqa: E402
from archpass.passes.engine import apply_recipe_shapes  # noqa: E402
from archpass.passes.width_multiplier import layer_stages, site_groups, snap  # noqa: E402

WIDTH = get_pass("width_multiplier")


def net():
    b = NetBuilder((1, 3, 32, 32), seed=4)
    b.conv(12, 3, 2, act="relu6")
    b.ibn(12, expand=3, se="hardsigmoid", act="hardswish")  # residual
    b.ibn(20, expand=4, stride=2, act="relu6")
    b.ibn(20, expand=5, act="relu6")  # residual
    b.concat(lambda b: b.conv(12, 1), lambda b: b.conv(20, 3))
    b.conv(40, 1).head(10)
    return b.build()


@pytest.fixture(scope="module")
def small():
    return built(net())


def adjustable(s):
    return {g.id: g.channels for g in s.groups if g.adjustable}


@pytest.mark.parametrize("c, m, p, want", [
    (24, 0.75, 8, 16),   # 18 -> nearest multiple of 8
    (32, 0.75, 8, 24),
    (20, 1.0, 8, 24),    # 2.5 multiples: halves round up
    (12, 1.0, 8, 16),
    (16, 0.25, 8, 8),    # never below the parallelism factor
    (3, 0.1, 16, 16),
    (960, 1.25, 16, 1200),  # multipliers above 1 grow
    (40, 1.0, 1, 40),
])
def test_snap(c, m, p, want):
    assert snap(c, m, p) == want


def test_check_refuses_bad_choices(small):
    _, s = small
    m = WIDTH.check(s, None, {"multiplier": 0.75})  # parallelism defaults to 8
    assert isinstance(m, Match) and m.found["sizes"] == {g: snap(c, 0.75, 8) for g, c in adjustable(s).items()}
    assert isinstance(WIDTH.check(s, None, {"multiplier": 2, "parallelism": 16}), Match)
    for bad in ({"multiplier": 0}, {"multiplier": -1.0}, {"multiplier": "big"}, {"multiplier": math.nan},
                {"multiplier": math.inf}, {"multiplier": True}, {"multiplier": 0.5, "parallelism": 0},
                {"multiplier": 0.5, "parallelism": 2.5}, {}, {"multiplier": 0.5, "channels": 8}):
        assert isinstance(WIDTH.check(s, None, bad), str), bad
    stages = ", ".join(st.id for st in s.stages)
    assert WIDTH.check(s, "stage99", {"multiplier": 0.5}).endswith(f"stages: {stages})") and stages
    assert "unknown stage" in WIDTH.check(s, "group1", {"multiplier": 0.5})
    assert WIDTH.check(s, None, {"multiplier": 0}) == "multiplier must be a positive number, got 0"
    with pytest.raises(RecipeError, match="positive number"):
        apply_recipe_shapes(s, [{"pass": "width_multiplier", "multiplier": -2}])


def test_check_agrees_with_the_domains(small):
    _, s = small
    for site in WIDTH.sites(s):
        md, pd = site.domains["multiplier"], site.domains["parallelism"]
        for m in (md.low, md.high, 1.0):
            for p in (pd.low, pd.current, pd.high):
                assert isinstance(WIDTH.check(s, site.id, {"multiplier": m, "parallelism": p}), Match), (m, p)
        for m in (md.low / 2, md.high * 1.01, 100.0):
            assert not md.contains(m) and "multiplier must be" in WIDTH.check(s, site.id, {"multiplier": m}), m
        for p in (pd.high + 1, 4096):
            assert not pd.contains(p) and "parallelism must be" in WIDTH.check(s, site.id, {"multiplier": 1.0,
                                                                                       "parallelism": p}), p


def test_sites(small):
    _, s = small
    sites = WIDTH.sites(s)
    assert WIDTH.site_kind == "stage" and all(x.kind == "stage" for x in sites)
    assert sites[0].id is None
    assert sites[0].domains == {"multiplier": FloatDomain(0.1, 2.0, log=True, current=1.0),
                                "parallelism": IntDomain(1, 256, 1, current=8)}
    assert {x.id for x in sites[1:]} == {st.id for st in s.stages}
    assert sites[0].to_json()["kind"] == "stage" and sites[0].to_json()["site"] is None


def _assert_stages_cover_the_model(s):
    """Every layer has a stage, the stem conv is in the first one, the head in the last one,
    and the stage sites together cover exactly the groups of the whole-model site."""
    stages = layer_stages(s)
    assert set(stages) == {l.id for l in s.layers}
    in_blocks = {lid for b in s.blocks for lid in b.layers}
    outside = [l.id for l in s.layers if l.id not in in_blocks]
    assert outside and s.layers[0].id in outside  # the stem
    assert stages[s.layers[0].id] == s.stages[0].id and stages[s.layers[-1].id] == s.stages[-1].id
    stem_group = s.layers[0].out_group
    assert s.group(stem_group).adjustable and stem_group in site_groups(s, s.stages[0].id)
    union = set()
    for site in WIDTH.sites(s)[1:]:
        union |= set(site_groups(s, site.id))
    assert union == set(site_groups(s, None)) == set(adjustable(s))


def test_stage_sites_cover_every_group_built(small):
    _assert_stages_cover_the_model(small[1])


def test_stage_sites_cover_every_group_mobilenet_v2(zoo_model):
    from archpass.analysis import analyze
    from archpass.model import load_model

    s = analyze(load_model(zoo_model("mobilenet_v2")))
    _assert_stages_cover_the_model(s)
    # stage0 (the stem's stage) scales the stem conv's group
    stem = s.layers[0]
    m = WIDTH.check(s, "stage0", {"multiplier": 2.0, "parallelism": 8})
    assert m.found["sizes"][stem.out_group] == snap(stem.cout, 2.0, 8)


@pytest.mark.parametrize("multiplier, parallelism", [(0.75, 8), (0.5, 4), (1.5, 8), (2.0, 16)])
def test_whole_model(small, multiplier, parallelism):
    """Every adjustable group scaled and snapped; exact exactly when every group grows."""
    m, s = small
    r = rewrite_one(m, s, "width_multiplier", None, {"multiplier": multiplier, "parallelism": parallelism})
    new = r.shapes.structure
    before = adjustable(s)
    for gid, c in before.items():
        got = new.group(gid).channels
        assert got == snap(c, multiplier, parallelism)
        assert got % parallelism == 0 and got >= parallelism
    for g in s.groups:
        if not g.adjustable:
            assert new.group(g.id).channels == g.channels
    grows = all(new.group(gid).channels >= c for gid, c in before.items())
    assert r.exact == r.shapes.exact == grows
    if multiplier >= 1.5:
        assert grows
    if grows:
        assert_same_function(m.proto, r.proto, s)
    else:
        outputs(r.proto, s)
    assert_shapes_agree(new, r.proto)
    assert r.shapes.before["channels"] == before
    assert r.shapes.after["channels"] == {gid: new.group(gid).channels for gid in before}


def test_stage_site_scales_only_that_stage(small):
    m, s = small
    stage = next(st for st in s.stages if len(st.blocks) >= 2)
    stages = layer_stages(s)
    inside = {g.id for g in s.groups if g.adjustable and any(stages[p.node] == stage.id for p in g.producers)}
    assert inside and inside != set(adjustable(s))
    r = rewrite_one(m, s, "width_multiplier", stage.id, {"multiplier": 2.0, "parallelism": 8})
    new = r.shapes.structure
    for g in s.groups:
        want = snap(g.channels, 2.0, 8) if g.id in inside else g.channels
        assert new.group(g.id).channels == want, g.id
    assert r.exact
    assert_same_function(m.proto, r.proto, s)
    assert_shapes_agree(new, r.proto)


ZOO = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_real_model_width_075(name):
    """Width 0.75 at parallelism 8: a valid model whose shapes agree with the shape path."""
    m, s = loaded(name)
    r = rewrite_one(m, s, "width_multiplier", None, {"multiplier": 0.75, "parallelism": 8})
    assert not r.exact
    new = r.shapes.structure
    for gid, c in adjustable(s).items():
        assert new.group(gid).channels == snap(c, 0.75, 8)
    assert new.macs < s.macs
    outputs(r.proto, s)
    assert_shapes_agree(new, r.proto)


@pytest.mark.slow
def test_real_model_stage_widening_is_exact():
    m, s = loaded("mobilenet_v3_large")
    stage = s.stages[len(s.stages) // 2]
    r = rewrite_one(m, s, "width_multiplier", stage.id, {"multiplier": 1.25, "parallelism": 8})
    assert r.exact
    assert r.shapes.structure.macs > s.macs
    assert_same_function(m.proto, r.proto, s)
    assert_shapes_agree(r.shapes.structure, r.proto)


def test_site_notes_count_each_stages_groups(small):
    from archpass.passes.width_multiplier import site_groups

    _, s = small
    sites = WIDTH.sites(s)
    assert sites[0].id is None and sites[0].note == f"whole model: {len(site_groups(s, None))} adjustable groups"
    for site in sites[1:]:
        assert site.note == f"{len(site_groups(s, site.id))} adjustable groups produced in {site.id}"
    assert sum(len(site_groups(s, x.id)) for x in sites[1:]) == len(site_groups(s, None))


def test_a_model_without_adjustable_groups_has_nothing_to_scale():
    _, s = built(NetBuilder((1, 3, 8, 8), seed=2).conv(4, 3, act=None).build())  # input and output fix both groups
    assert WIDTH.sites(s) == []
    assert WIDTH.check(s, None, {"multiplier": 0.5}) == "the model has no adjustable channel group to scale"
