"""The guard: cache by recipe, the emitted model built once for a candidate that passed."""

import onnx
import pytest

from archpass.analysis import analyze
from archpass.model import model_from_proto
from archpass.recipe import Recipe
from archpass.search.calib import load_calibration
from archpass.search.guard import Guard, fidelity_guard
from search_helpers import ibn_net


def test_known_and_check_share_one_cache():
    calls = []
    g = Guard("fidelity", 0.5, lambda r: calls.append(r) or 0.9)
    r = Recipe.of([{"pass": "fuse_ibn", "site": "block0"}])
    assert g.known(r) is None and not calls
    assert g.check(r).ok and g.check(r).ok and len(calls) == 1
    assert g.known(r).score == 0.9 and g.evaluations == 1


def test_emitter_builds_the_model_once_and_only_for_a_recipe_that_passes():
    built = []
    g = Guard("fidelity", 0.5, lambda r: 0.9 if len(r) == 1 else 0.1, emitter=lambda r: built.append(r) or f"model{len(built)}")
    ok = Recipe.of([{"pass": "fuse_ibn", "site": "block0"}])
    bad = Recipe.of([{"pass": "fuse_ibn", "site": "block0"}, {"pass": "fuse_ibn", "site": "block1"}])
    assert g.model_for(ok) == "model1" and g.model_for(ok) == "model1" and len(built) == 1
    assert g.model_for(bad) is None and len(built) == 1


@pytest.mark.parametrize("recipe", [[{"pass": "channels", "site": "group6", "channels": 48}]])
def test_fidelity_guard_emits_weights_refitted_on_every_sample(recipe):
    import json

    m = model_from_proto(ibn_net())
    s = analyze(m)
    g = fidelity_guard(m, s, load_calibration(None, m, samples=32), min_fidelity=0.0)
    r = Recipe.of(recipe)
    assert g.check(r).ok and not g.models  # scoring kept no model
    proto = g.model_for(r)
    onnx.checker.check_model(proto, full_check=True)
    note = json.loads({p.key: p.value for p in proto.metadata_props}["archpass.recovery"])
    assert note["fitted_on"] == "every sample" and note["fidelity_after"] == pytest.approx(g.check(r).score)
