"""The pass contract: typed domains, sites, Match, and passes without instance state."""

from __future__ import annotations

import copy
import json

import pytest

from apply_helpers import built
from archpass.passes.base import (
    SITE_KINDS,
    CategoricalDomain,
    FloatDomain,
    IntDomain,
    Match,
    Site,
    registry,
)
from archpass.passes.engine import apply_recipe, plan
from archpass.recipe import Recipe
from builders import NetBuilder


def test_int_domain():
    d = IntDomain(8, 64, 8, current=16)
    assert [v for v in range(0, 80) if d.contains(v)] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert d.contains(16.0) and not d.contains(16.5) and not d.contains(True) and not d.contains("16")
    assert d.to_json() == {"type": "int", "low": 8, "high": 64, "step": 8, "current": 16}


def test_float_domain():
    d = FloatDomain(0.1, 2.0, log=True, current=1.0)
    assert d.contains(0.1) and d.contains(2) and d.contains(1.0)
    assert not any(d.contains(v) for v in (0.09, 2.01, float("nan"), float("inf"), True, "1"))
    assert d.to_json() == {"type": "float", "low": 0.1, "high": 2.0, "log": True, "current": 1.0}


def test_categorical_domain():
    d = CategoricalDomain((1, "a", 2.5), current="a")
    assert d.contains(1) and d.contains("a") and d.contains(2.5)
    assert not d.contains(True) and not d.contains("b") and not d.contains(2)
    assert d.to_json() == {"type": "categorical", "values": [1, "a", 2.5], "current": "a"}


def test_site_json():
    s = Site("channels", "group", "group3", {"channels": IntDomain(1, 64, 1, 16)}, "16 channels")
    assert s.to_json() == {"pass": "channels", "kind": "group", "site": "group3",
                           "domains": {"channels": {"type": "int", "low": 1, "high": 64, "step": 1, "current": 16}},
                           "note": "16 channels"}


def _net():
    b = NetBuilder((1, 3, 32, 32), seed=5).conv(16, 3, 2, act="relu6")
    b.ibn(16, expand=4, act="relu6").ibn(24, expand=4, stride=2, act="hardswish", se="hardsigmoid")
    b.dw(act="relu").conv(32, 1)
    return b.head(10).build()


@pytest.fixture(scope="module")
def net():
    return built(_net())


def _recipe(s) -> list[dict]:
    """One rewrite of every pass, each at a site the pass lists, with a value from its domains."""
    reg = registry()
    fuse = reg["fuse_ibn"].sites(s)[0]
    dw = reg["dw_to_dense"].sites(s)[-1]
    grp = reg["channels"].sites(s)[0]
    stage = reg["width_multiplier"].sites(s)[-1]
    res = reg["resolution"].sites(s)[0]
    return [{"pass": "fuse_ibn", "site": fuse.id},
            {"pass": "dw_to_dense", "site": dw.id},
            {"pass": "channels", "site": grp.id, "channels": grp.domains["channels"].current + 8},
            {"pass": "width_multiplier", "site": stage.id, "multiplier": 1.5, "parallelism": 8},
            {"pass": "resolution", "height": res.domains["height"].high, "width": 40}]


def test_every_site_is_well_formed(net):
    _, s = net
    for p in registry().values():
        assert p.site_kind in SITE_KINDS
        sites = p.sites(s)
        assert sites, p.name
        for site in sites:
            assert site.pass_name == p.name and site.kind == p.site_kind
            assert (site.id is None) == (p.site_kind == "model") or p.site_kind == "stage"
            assert set(site.domains) <= set(p.choice_keys)
            json.dumps(site.to_json())
            for key, d in site.domains.items():
                assert d.current is None or d.contains(d.current), (p.name, key)


def test_engine_checks_once_and_keeps_the_match(net, monkeypatch):
    """plan/apply_recipe call check once per rewrite and hand that Match to both apply
    methods; no pass body calls check again."""
    model, s = net
    recipe = Recipe.of(_recipe(s))
    calls: dict[str, int] = {}
    for p in registry().values():
        real = type(p).check

        def counting(self, *a, _real=real, **k):
            calls[self.name] = calls.get(self.name, 0) + 1
            return _real(self, *a, **k)

        monkeypatch.setattr(type(p), "check", counting)
    applied = apply_recipe(model, recipe, structure=s)
    assert calls == {rw.pass_name: 1 for rw in recipe}
    for st in applied.plan.steps:
        assert isinstance(st.match, Match)
        assert st.match.pass_name == st.rewrite.pass_name and st.match.site == st.rewrite.site
        assert dict(st.match.choice) == dict(st.rewrite.choice)


def test_pass_instances_keep_no_state(net):
    """The registered instances are shared (threads, trials): sites, check, apply_shapes and
    apply_graph must leave every instance's __dict__ as it was."""
    model, s = net
    reg = registry()
    before = {name: copy.deepcopy(vars(p)) for name, p in reg.items()}
    for p in reg.values():
        p.sites(s)
    pl = plan(s, Recipe.of(_recipe(s)))
    for p in reg.values():
        p.sites(pl.structure)
    apply_recipe(model, Recipe.of(_recipe(s)), structure=s)
    assert {name: vars(p) for name, p in reg.items()} == before
    # and a check on another structure does not leak into a later apply (what a cache would do)
    res = reg["resolution"]
    m1 = res.check(s, None, {"height": 40, "width": 40})
    res.check(pl.structure, None, {"height": 24, "width": 24})
    assert res.apply_shapes(s, m1).structure.input_hw == (40, 40)
    assert {name: vars(p) for name, p in reg.items()} == before


def test_domain_defaults_descriptions_and_offset_steps():
    from archpass.passes.base import outside

    d = IntDomain(1, 10)
    assert (d.step, d.current) == (1, None) and d.describe() == "an integer in 1..10"
    stepped = IntDomain(1, 10, 3)  # 1, 4, 7, 10: steps counted from low
    assert [v for v in range(12) if stepped.contains(v)] == [1, 4, 7, 10]
    assert stepped.describe() == "an integer in 1..10 in steps of 3"
    assert IntDomain(2, 10, 2).describe() == "an integer in 2..10 in steps of 2"
    f = FloatDomain(0.5, 2.0)
    assert (f.log, f.current) == (False, None) and f.describe() == "a number in 0.5..2"
    c = CategoricalDomain((8, "x"))
    assert c.current is None and c.describe() == "one of 8, 'x'"
    assert outside("channels", stepped, 5) == "channels must be an integer in 1..10 in steps of 3, got 5"
    assert outside("channels", stepped, 7) is None


def test_contract_types_are_immutable_with_empty_defaults():
    import dataclasses

    from archpass.passes.base import GraphResult, Pass, ShapeResult, get_pass

    site, match = Site("fuse_ibn", "block", "block1"), Match("fuse_ibn", "block1", {})
    assert (site.domains, site.note, match.found) == ({}, "", {})
    shaped = ShapeResult(None, False, True)
    assert (shaped.before, shaped.after) == ({}, {})
    for obj in (IntDomain(1, 2), FloatDomain(0.0, 1.0), CategoricalDomain((1,)), site, match, shaped,
                GraphResult(False, True)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, None)
    assert Pass.choice_keys == ()  # a pass without choices declares none
    assert get_pass("channels").name == "channels"
    from archpass.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown pass 'chanels'; known passes: channels, dw_to_dense"):
        get_pass("chanels")
