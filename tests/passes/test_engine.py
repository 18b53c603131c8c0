"""The recipe engine: validation, ids across rewrites, shape-only vs emitted ONNX on every
architecture, applying twice, and random valid recipes (hypothesis)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apply_helpers import apply_checked, assert_exact, built, loaded
from archpass.errors import RecipeError
from archpass.model import model_from_proto
from archpass.passes.base import registry
from archpass.passes.engine import apply_recipe, apply_recipe_shapes, plan
from archpass.recipe import Recipe
from builders import NetBuilder

ALL_ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "resnet18",
             "resnet50", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "densenet121",
             "convnext_tiny"]
PROPERTY_ARCHS = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "resnet18"]


def _net():
    b = NetBuilder((1, 3, 32, 32), seed=7).conv(16, 3, stride=2, act="relu")
    b.dw_separable(16).ibn(16, expand=4).ibn(24, expand=4, stride=2, se="hardsigmoid", act="hardswish")
    return b.head(6).build()


@pytest.fixture(scope="module")
def net():
    return built(_net())


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("rewrites,msg", [
    ([{"pass": "fuse"}], r"unknown pass 'fuse' \(did you mean 'fuse_ibn'\?\); known passes: fuse_ibn, channels"),
    ([{"pass": "fuse_ibn", "site": "block9"}], r"unknown site 'block9': expected a block id of this model; nearest: block"),
    ([{"pass": "fuse_ibn"}], r"rewrite #0 \(fuse_ibn\) needs a \"site\": a block id; e\.g\. block2, block1, block0 \(see"),
    ([{"pass": "resolution", "heigth": 16}], r"unknown key\(s\) 'heigth'; resolution takes height, width\."),
    ([{"pass": "channels", "site": "group2", "channels": 8}, {"pass": "dw_to_dense", "site": "nosuch"}],
     r"rewrite #1 \(dw_to_dense\): unknown site 'nosuch'"),
    ([{"pass": "fuse_ibn", "site": "group1"}], r"expected a block id"),
    ([{"pass": "channels", "site": "group2", "chanels": 8}], r"unknown key\(s\) 'chanels'; channels takes site, channels"),
    ([{"pass": "channels", "site": "group2", "channels": 0}], r"rewrite #0 \(channels group2 channels=0\)"),
    ([{"pass": "fuse_ibn", "site": "block0"}], r"depthwise block, not an inverted bottleneck"),
    ([{"pass": "fuse_ibn", "site": "block1"}, {"pass": "fuse_ibn", "site": "block1"}], r"conflicts with rewrite #0"),
    ([{"pass": "resolution", "height": 16, "width": 16}, {"pass": "resolution", "height": 8, "width": 8}],
     r"conflicts with rewrite #0: resolution on the model twice"),
])
def test_invalid_recipes(net, rewrites, msg):
    _, s = net
    with pytest.raises(RecipeError, match=msg) as exc:
        apply_recipe_shapes(s, rewrites)
    assert "\n" not in exc.value.line()


def test_engine_refuses_a_graph_rewrite_its_shape_path_did_not_predict(net, monkeypatch):
    """The engine's own check, not the tests' helper: a pass whose shape-only path disagrees
    with the ONNX it emits makes apply_recipe raise."""
    model, s = net
    pass_ = registry()["channels"]
    real = pass_.apply_shapes
    group = next(g.id for g in s.groups if g.adjustable)
    recipe = [{"pass": "channels", "site": group, "channels": 4}]
    # the shape-only path "forgets" the rewrite; the graph path still makes it
    monkeypatch.setattr(pass_, "apply_shapes", lambda st, match: dataclasses.replace(real(st, match), structure=st))
    with pytest.raises(AssertionError, match="emitted ONNX"):
        apply_recipe(model, Recipe.of(recipe), structure=s)
    applied = apply_recipe(model, Recipe.of(recipe), structure=s, verify=False)  # the check is what refuses it
    assert applied.structure is s


def test_site_rewritten_away_by_an_earlier_rewrite(net):
    _, s = net
    dw = s.block("block1").role("depthwise")
    with pytest.raises(RecipeError, match=r"block 'block1' no longer exists: it was rewritten away by rewrite #0"):
        apply_recipe_shapes(s, [{"pass": "dw_to_dense", "site": dw}, {"pass": "fuse_ibn", "site": "block1"}])
    with pytest.raises(RecipeError, match=r"not a depthwise conv"):  # fused: the depthwise layer is dense now
        apply_recipe_shapes(s, [{"pass": "fuse_ibn", "site": "block1"}, {"pass": "dw_to_dense", "site": dw}])


def test_ids_of_the_input_keep_working_after_earlier_rewrites(net):
    model, s = net
    b = s.block("block2")
    expanded = s.layer(b.role("depthwise")).out_group
    recipe = [{"pass": "fuse_ibn", "site": "block2"}, {"pass": "channels", "site": expanded, "channels": 104},
              {"pass": "resolution", "height": 40, "width": 40}, {"pass": "fuse_ibn", "site": "block1"}]
    applied = apply_checked(model, s, recipe)
    assert applied.structure.layer(b.role("depthwise")).cout == 104
    assert [r["pass"] for r in applied.rewrites] == ["fuse_ibn", "channels", "resolution", "fuse_ibn"]


def test_shape_only_path_matches_apply_and_never_touches_its_input(net):
    model, s = net
    recipe = Recipe.of([{"pass": "fuse_ibn", "site": "block1"}, {"pass": "width_multiplier", "multiplier": 0.5, "parallelism": 4}])
    before = s.to_json()
    shaped = apply_recipe_shapes(s, recipe)
    assert s.to_json() == before
    applied = apply_recipe(model, recipe, structure=s)
    assert shaped.to_json() == applied.structure.to_json()
    assert apply_recipe_shapes(s, Recipe()) is s


def test_record_and_provenance(net):
    model, s = net
    recipe = Recipe.of([{"pass": "fuse_ibn", "site": "block1"}, {"pass": "resolution", "height": 24, "width": 24}])
    applied = apply_checked(model, s, recipe)
    from archpass.record import read_record

    rec = read_record(applied.proto)
    assert rec["source_sha256"] == model.sha256 and rec["recipe"] == recipe.to_json() and rec["version"]
    assert [(r["pass"], r["site"], r["choice"], r["exact"]) for r in rec["rewrites"]] == [
        ("fuse_ibn", "block1", {}, False), ("resolution", None, {"height": 24, "width": 24}, False)]
    assert rec["rewrites"][0]["before"]["depthwise"].startswith("64->64 k3x3")
    # provenance survives loading (canonicalization) and shows on the layer
    from archpass.analysis import analyze

    again = analyze(model_from_proto(applied.proto))
    fused = again.layer(s.block("block1").role("depthwise"))
    assert "fuse_ibn:block1" in fused.provenance
    assert sum(1 for l in again.layers if l.provenance) >= 2  # + the first conv, fed by the resized input


def test_applying_twice_is_refused(net):
    model, s = net
    recipe = Recipe.of([{"pass": "fuse_ibn", "site": "block1"}, {"pass": "channels", "site": "group2", "channels": 24}])
    out = apply_recipe(model, recipe, structure=s)
    again = model_from_proto(out.proto)
    with pytest.raises(RecipeError, match="was already applied to this model"):
        apply_recipe(again, recipe)
    # a different rewrite on the rewritten model is fine and extends the record
    more = apply_recipe(again, Recipe.of([{"pass": "resolution", "height": 40, "width": 40}]))
    from archpass.record import read_record

    rec = read_record(more.proto)
    assert [r["pass"] for r in rec["rewrites"]] == ["fuse_ibn", "channels", "resolution"]
    assert rec["source_sha256"] == model.sha256


def test_shared_initializers_are_not_edited_in_place():
    """Two depthwise convs share one weight initializer (as onnxslim dedups them)."""
    b = NetBuilder((1, 8, 8, 8), seed=8).conv(8, 1, act="relu")
    b.dw(3, act="relu", name="dwa").dw(3, act="relu", name="dwb")
    proto = b.build()
    names = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.name == "dwb":
            n.input[1], n.input[2] = "dwa_w", "dwa_b"
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(v for k, v in names.items() if not k.startswith("dwb"))
    model, s = built(proto)
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dwa"}])
    assert_exact(model, applied)
    dwb = next(n for n in applied.proto.graph.node if n.name == "dwb")
    assert [i.dims for i in applied.proto.graph.initializer if i.name == dwb.input[1]] == [[8, 1, 3, 3]]


# --------------------------------------------------------------------------- every architecture
def _touching_recipe(s) -> list[dict]:
    """One rewrite of each pass that has a site in ``s`` (first site), channels rounded up."""
    reg = registry()
    out: list[dict] = []
    fuse = reg["fuse_ibn"].sites(s)
    if fuse:
        out.append({"pass": "fuse_ibn", "site": fuse[-1].id})
    dws = reg["dw_to_dense"].sites(s)
    if dws:
        out.append({"pass": "dw_to_dense", "site": min(dws, key=lambda x: s.layer(x.id).params).id})
    groups = reg["channels"].sites(s)
    if groups:
        g = s.group(groups[len(groups) // 2].id)
        out.append({"pass": "channels", "site": g.id, "channels": g.channels + 8})
    if reg["resolution"].sites(s):
        out.append({"pass": "resolution", "height": 192, "width": 160})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_ARCHS)
def test_every_architecture_shape_only_agrees_with_onnx(name):
    model, s = loaded(name)
    recipe = _touching_recipe(s)
    assert recipe
    applied = apply_recipe(model, Recipe.of(recipe), structure=s)  # verifies shapes against the emitted ONNX
    from apply_helpers import run

    out = run(applied.proto)
    assert out[0].shape == tuple(applied.structure.outputs[0][1]) and np.all(np.isfinite(out[0]))
    if all(r["exact"] for r in applied.rewrites):
        assert_exact(model, applied)


# --------------------------------------------------------------------------- property
@st.composite
def recipes(draw):
    name = draw(st.sampled_from(PROPERTY_ARCHS))
    _, s = loaded(name)
    reg = registry()
    rewrites: list[dict] = []
    used: set = set()
    for _ in range(draw(st.integers(1, 4))):
        cur = plan(s, Recipe.of(rewrites)).structure
        p = draw(st.sampled_from(["fuse_ibn", "dw_to_dense", "channels", "resolution", "width_multiplier"]))
        sites = [x for x in reg[p].sites(cur) if (p, x.id) not in used]
        if not sites:
            continue
        site = draw(st.sampled_from(sites[:40]))
        rw: dict = {"pass": p}
        if site.id is not None:
            rw["site"] = site.id
        if p == "channels":
            c = cur.group(site.id).channels
            rw["channels"] = draw(st.sampled_from([max(1, c // 2), c + 8, ((c + 15) // 16) * 16]))
        elif p == "resolution":
            rw["height"] = rw["width"] = draw(st.sampled_from([96, 160, 224, 256]))
        elif p == "width_multiplier":
            rw["multiplier"] = draw(st.sampled_from([0.5, 0.75, 1.25]))
            rw["parallelism"] = draw(st.sampled_from([4, 8]))
        if p == "dw_to_dense" and cur.layer(site.id).params * cur.layer(site.id).cin > 4e7:
            continue  # keep dense weights small enough for a quick test
        used.add((p, site.id))
        rewrites.append(rw)
    return name, rewrites


@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(recipes())
def test_random_valid_recipes_give_valid_models(case):
    name, rewrites = case
    model, s = loaded(name)
    from archpass.limits import GROWTH_LIMIT, predict_output_size
    from archpass.model import weight_bytes

    after = apply_recipe_shapes(s, rewrites)
    if predict_output_size(weight_bytes(model.proto), s, after).growth > GROWTH_LIMIT:
        # dense convs in place of wide late depthwise ones can grow a model past the limit:
        # refused (with the flag to force it), never written
        with pytest.raises(RecipeError, match="above the 16x limit.*--allow-growth"):
            apply_recipe(model, Recipe.of(rewrites), structure=s)
        return
    applied = apply_checked(model, s, rewrites)
    if all(r["exact"] for r in applied.rewrites):
        assert_exact(model, applied)
    # applying the same recipe to the output is refused, never corrupting anything
    if rewrites:
        with pytest.raises(RecipeError):
            apply_recipe(model_from_proto(applied.proto), Recipe.of(rewrites))


def test_models_above_2gb_are_checked_through_external_data(net, monkeypatch):
    """The >2 GB path (check by path on an external-data copy) on a small model by forcing it."""
    import archpass.model as model_mod

    model, s = net
    calls = []
    real = model_mod.is_large
    monkeypatch.setattr(model_mod, "is_large", lambda p: calls.append(1) or True)
    import onnx

    import os
    from pathlib import Path

    checked, real_check = [], onnx.checker.check_model

    def check(m, *a, **k):
        if isinstance(m, str):  # what is on disk while it is checked: the model file and its data
            checked.append((m, os.path.getsize(m), sorted(os.listdir(Path(m).parent))))
        return real_check(m, *a, **k)

    monkeypatch.setattr(onnx.checker, "check_model", check)
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block1"}]), structure=s)
    monkeypatch.setattr(model_mod, "is_large", real)
    assert calls and applied.proto.graph.initializer[0].HasField("raw_data")  # the returned proto keeps its weights
    assert len(checked) == 1  # checked by path, never in memory
    path, size, files = checked[0]
    weights = sum(len(i.raw_data) for i in applied.proto.graph.initializer)
    assert Path(path).is_absolute() and not Path(path).exists()  # a temporary copy, gone afterwards
    assert size < weights / 2 and len(files) >= 2  # the weights were saved beside it (external data)


def test_nearest_ids_in_site_errors():
    from archpass.passes.engine import _nearest

    ids = [f"block{i}" for i in range(12)]
    assert _nearest("blok1", ids) == ["block1", "block11", "block10"]  # the three closest, closest first
    # nothing close: a numbered id shows the valid range
    assert _nearest("block" + "9" * 20, ids) == ["block0", "block11"]
    assert _nearest("xyz", ["stage0", "stage1", "stage2", "stage3"]) == ["stage0", "stage1", "stage2"]


def test_verify_shapes_names_missing_layers(net):
    import dataclasses as dc

    from archpass.passes.engine import verify_shapes

    model, s = net
    fewer = dc.replace(s, layers=s.layers[1:])
    with pytest.raises(AssertionError, match=rf"layers differ .*unexpected \['{s.layers[0].id}'\]"):
        verify_shapes(model.proto, fewer)
    # at most three ids of each kind are named
    with pytest.raises(AssertionError, match=r"missing \[\], unexpected \['[^']*', '[^']*', '[^']*'\]$"):
        verify_shapes(model.proto, dc.replace(s, layers=s.layers[4:]))
    with pytest.raises(AssertionError, match=r"missing \['a', 'b', 'c'\], unexpected"):
        verify_shapes(model.proto, dc.replace(s, layers=s.layers + tuple(dc.replace(s.layers[0], id=x) for x in "abcd")))


def test_verify_shapes_compares_activation_tensors(net):
    import dataclasses as dc

    from archpass.passes.engine import verify_shapes

    model, s = net
    verify_shapes(model.proto, s)
    name = s.layers[0].output
    t = s.tensors[name]
    wrong = dc.replace(s, tensors={**s.tensors, name: dc.replace(t, shape=(*t.shape[:-1], t.shape[-1] + 1))})
    with pytest.raises(AssertionError, match=rf"tensor '{name}': emitted ONNX has shape"):
        verify_shapes(model.proto, wrong)


def test_plans_steps_and_results_are_immutable(net):
    model, s = net
    applied = apply_recipe(model, Recipe.of([{"pass": "fuse_ibn", "site": "block1"}]), structure=s)
    for obj, attr in [(applied, "rewrites"), (applied.plan, "steps"), (applied.plan.steps[0], "index")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)


def test_every_pass_describes_itself():
    for p in registry().values():
        assert p.summary and p.exactness and p.site_kind, p.name


def test_applying_a_choice_twice_is_refused(net):
    model, s = net
    group = next(g.id for g in s.groups if g.adjustable)
    rewrites = [{"pass": "channels", "site": group, "channels": 8}]
    once = apply_recipe(model, Recipe.of(rewrites), structure=s)
    with pytest.raises(RecipeError, match="was already applied to this model"):
        apply_recipe(model_from_proto(once.proto), Recipe.of(rewrites))


def test_every_pass_reports_a_modification_on_both_paths(net):
    """The shape and graph results of a rewrite that changes the model say so (``modified``)
    and agree on exactness."""
    import onnx_graphsurgeon as gs

    model, s = net
    group = next(g for g in s.groups if g.adjustable)
    recipes = [{"pass": "fuse_ibn", "site": "block1"}, {"pass": "dw_to_dense", "site": "dws0_dw"},
               {"pass": "channels", "site": group.id, "channels": group.channels + 8},
               {"pass": "width_multiplier", "multiplier": 0.5}, {"pass": "resolution", "height": 16, "width": 16}]
    assert {r["pass"] for r in recipes} == set(registry())
    for rw in recipes:
        (step,) = plan(s, Recipe.of([rw])).steps
        gr = step.pass_.apply_graph(gs.import_onnx(model.proto), step.before, step.match)
        assert step.result.modified and gr.modified, rw
        assert gr.exact == step.result.exact, rw
