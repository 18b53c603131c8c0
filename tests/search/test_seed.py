"""search/seed.py: a recipe found on one model resolved against another of its family."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from archpass.analysis import analyze
from archpass.model import load_model, model_from_proto
from archpass.passes.engine import apply_recipe_shapes
from archpass.recipe import Recipe
from archpass.search.seed import SiteMap, block_address, layer_address, resolve_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import NetBuilder  # noqa: E402


def _net(width: float = 1.0, hw: int = 64, extra_block: bool = False):
    c = lambda n: int(n * width)  # noqa: E731
    b = NetBuilder((1, 3, hw, hw)).conv(c(16), k=3, stride=2, act="relu6").ibn(c(24), expand=4, stride=2)
    if extra_block:  # one more block in stage 0: every later block id shifts by one
        b = b.ibn(c(24), expand=4)
    b = b.ibn(c(24), expand=4).ibn(c(32), expand=6, stride=2).ibn(c(32), expand=6).ibn(c(64), expand=6, stride=2)
    return analyze(model_from_proto(b.head(10).build()))


SOURCE_RECIPE = Recipe.of([
    {"pass": "fuse_ibn", "site": "block2"},  # stage 1 block 0
    {"pass": "dw_to_dense", "site": "ibn1_dw"},  # stage 0 block 1 depthwise: creates group11
    {"pass": "channels", "site": "group11", "channels": 64},  # the group dw_to_dense created
    {"pass": "channels", "site": "group5", "channels": 128},  # stage 1 block 0's expansion, now made by its fused conv
    {"pass": "channels", "site": "group1", "channels": 24},  # the stem's output
    {"pass": "width_multiplier", "site": "stage2", "multiplier": 0.5, "parallelism": 8},
    {"pass": "resolution", "height": 56, "width": 56},
])


def test_addresses_are_positions():
    s = _net()
    assert block_address(s, "block2").describe() == "stage 1 block 0"
    assert layer_address(s, "ibn3_project").describe() == "stage 1 block 1 project layer"
    assert layer_address(s, "conv0").describe() == "stem layer 0"
    assert layer_address(s, "head_fc").describe() == "head layer -1"


def test_resolves_by_position_when_ids_shift():
    source, target = _net(), _net(width=0.75, hw=48, extra_block=True)
    res = resolve_recipe(SOURCE_RECIPE, source, target)
    by_index = {e.index: e for e in res.entries}
    assert by_index[0].resolved.site == "block3" and by_index[0].address == "stage 1 block 0"
    assert by_index[1].resolved.site == "ibn1_dw"
    # the group dw_to_dense creates on the target (its own new id), channels scaled 96 -> 72
    new_group = by_index[2].resolved.site
    assert new_group not in target.groups and new_group == "group12"
    assert by_index[2].resolved.choice["channels"] == 48
    assert "64 -> 48" in by_index[2].note
    assert by_index[4].resolved.to_json() == {"pass": "channels", "site": "group1", "channels": 16}
    assert by_index[5].resolved.site == "stage2"
    assert dict(by_index[6].resolved.choice) == {"height": 40, "width": 40}  # 56 * 48 / 64 = 42 -> multiple of 8
    # after fusion the expansion channels come from the fused conv (it keeps the depthwise id)
    assert by_index[3].address == "output channels of stage 1 block 0 depthwise layer"
    assert by_index[3].resolved.to_json() == {"pass": "channels", "site": "group6", "channels": 96}  # of 108
    assert not res.unresolved
    # the resolved recipe is valid on the target as a whole
    after = apply_recipe_shapes(target, res.recipe)
    assert after.input_hw == (40, 40)
    doc = res.to_json()
    assert doc["resolved"] == 7 and doc["unresolved"] == 0 and len(doc["entries"]) == 7


def test_unresolvable_sites_say_why():
    source, target = _net(extra_block=True), _net()
    recipe = Recipe.of([{"pass": "fuse_ibn", "site": "block2"},  # stage 0 block 2: target's stage 0 has 2
                        {"pass": "fuse_ibn", "site": "block3"}])  # stage 1 block 0 -> target block2
    res = resolve_recipe(recipe, source, target)
    assert not res.entries[0].ok and "stage 0 of the target has 2 block(s), no block 2" in res.entries[0].note
    assert res.entries[1].resolved.site == "block2"
    assert res.recipe == Recipe.of([{"pass": "fuse_ibn", "site": "block2"}])


def test_choices_kept_as_written_on_request():
    res = resolve_recipe(Recipe.of([{"pass": "channels", "site": "group1", "channels": 24}]),
                         _net(), _net(width=0.75), scale_choices=False)
    assert res.recipe.rewrites[0].choice["channels"] == 24


def test_site_map_covers_every_layer_of_the_same_architecture():
    m = SiteMap(_net(), _net(width=0.5, hw=32))
    assert all(m.layers[k] == k for k in m.layers) and all(m.blocks[k] == k for k in m.blocks)


# A recipe of the kind the search finds on MobileNetV2 for edgetpu: fuse the early IBNs,
# round channels, make one depthwise dense, slim the last stage, lower the resolution.
MOBILENET_RECIPE = Recipe.of([
    {"pass": "fuse_ibn", "site": "block1"},
    {"pass": "fuse_ibn", "site": "block2"},
    {"pass": "fuse_ibn", "site": "block3"},
    {"pass": "channels", "site": "group5", "channels": 128},
    {"pass": "dw_to_dense", "site": "/features/features.5/conv/conv.1/conv.1.0/Conv"},
    {"pass": "width_multiplier", "site": "stage4", "multiplier": 0.75, "parallelism": 8},
    {"pass": "resolution", "height": 192, "width": 192},
])


@pytest.mark.slow
def test_mobilenet_v2_recipe_on_width_075_and_160(zoo_model, tmp_path):
    """The 0.75-width and 160x160 MobileNetV2s are made by archpass's own width_multiplier
    and resolution passes on the zoo's MobileNetV2 (the 0.75 one emitted as ONNX and
    loaded back, as a user's model would be)."""
    from archpass import api

    base_path = zoo_model("mobilenet_v2")
    base = analyze(load_model(base_path))
    narrow_path = tmp_path / "mobilenet_v2_w075.onnx"
    api.apply(base_path, {"rewrites": [{"pass": "width_multiplier", "multiplier": 0.75, "parallelism": 8}]}, narrow_path)
    narrow = analyze(load_model(narrow_path))
    small = apply_recipe_shapes(base, Recipe.of([{"pass": "resolution", "height": 160, "width": 160}]))

    for target, hw in ((narrow, 224), (small, 160)):
        res = resolve_recipe(MOBILENET_RECIPE, base, target)
        assert not res.unresolved, [e.to_json() for e in res.unresolved]
        assert [e.address for e in res.entries][:3] == ["stage 1 block 0", "stage 1 block 1", "stage 2 block 0"]
        resize = res.recipe.rewrites[-1].choice
        assert (resize["height"], resize["width"]) == ((192, 192) if hw == 224 else (136, 136))
        apply_recipe_shapes(target, res.recipe)

    res = resolve_recipe(MOBILENET_RECIPE, base, narrow)
    assert res.recipe.rewrites[3].choice["channels"] == 96  # 128 of 144 channels -> of 112
    out = tmp_path / "seeded.onnx"
    summary = api.apply(narrow_path, res.recipe, out)
    assert len(summary["rewrites"]) == len(MOBILENET_RECIPE)


def test_seed_files_and_seed_trials(tmp_path):
    import json

    import optuna

    from archpass.errors import RecipeError
    from archpass.search.seed import SEED_ATTR, add_seed_trial, load_seeds

    f = tmp_path / "seed.json"
    f.write_text(json.dumps(SOURCE_RECIPE.to_json()))
    source, target = _net(), _net(width=0.75, hw=48, extra_block=True)
    same, moved = load_seeds([f], source)[0], load_seeds([f], target, source)[0]
    assert same.recipe == SOURCE_RECIPE and moved.recipe.rewrites[0].site == "block3"
    with pytest.raises(RecipeError, match="not found"):
        load_seeds([tmp_path / "missing.json"], target)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    n = add_seed_trial(study, [0.5], {"recipe": moved.recipe.to_json()}, 0)
    t = study.trials[n]
    assert n == 2 and t.value == 0.5 and t.user_attrs[SEED_ATTR] == 0 and t.user_attrs["recipe"]["rewrites"]
