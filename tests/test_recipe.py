"""Recipe and Rewrite: immutable, JSON and YAML round trip, malformed input."""

from __future__ import annotations

import json

import pytest

from archpass.errors import RecipeError
from archpass.recipe import Recipe, Rewrite

DOC = {"rewrites": [
    {"pass": "fuse_ibn", "site": "block3"},
    {"pass": "channels", "site": "group7", "channels": 48},
    {"pass": "width_multiplier", "multiplier": 0.75, "parallelism": 8},
    {"pass": "dw_to_dense", "site": "/features/features.1/conv/conv.0/conv.0.0/Conv"},
    {"pass": "resolution", "height": 192, "width": 192},
]}


def test_json_and_yaml_round_trip(tmp_path):
    r = Recipe.from_json(DOC)
    assert r.rewrites[1] == Rewrite("channels", "group7", {"channels": 48})
    assert r.rewrites[2].site is None and dict(r.rewrites[2].choice) == {"multiplier": 0.75, "parallelism": 8}
    assert r.to_json() == DOC
    assert Recipe.loads(r.dumps()) == r
    assert Recipe.loads(r.dumps("yaml"), "yaml") == r
    (tmp_path / "r.yaml").write_text(r.dumps("yaml"))
    (tmp_path / "r.json").write_text(json.dumps(DOC))
    assert Recipe.load(tmp_path / "r.yaml") == Recipe.load(tmp_path / "r.json") == r
    assert Recipe.from_json(DOC["rewrites"]) == r  # a bare list is accepted too


def test_immutable_and_hashable():
    r = Recipe.from_json(DOC)
    with pytest.raises(Exception):
        r.rewrites[1].choice["channels"] = 8  # type: ignore[index]
    with pytest.raises(Exception):
        r.rewrites = ()  # type: ignore[misc]
    assert len({r.rewrites[1], Rewrite("channels", "group7", {"channels": 48})}) == 1
    assert r.then(Rewrite("resolution", None, {"height": 1, "width": 1})).rewrites[-1].pass_name == "resolution"


@pytest.mark.parametrize("text,msg", [
    ("{", "neither valid JSON nor YAML"),
    ('{"rewrite": []}', "no \"rewrites\" list"),
    ('{"rewrites": [], "x": 1}', "unknown top-level key"),
    ('{"rewrites": [{"site": "block1"}]}', "no \"pass\" name"),
    ('{"rewrites": [3]}', "not an object"),
    ('{"rewrites": [{"pass": "fuse_ibn", "site": 3}]}', "site of type int"),
    ('{"rewrites": [{"pass": "channels", "site": "group1", "channels": {"a": 1}}]}', "type dict"),
])
def test_malformed(text, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.loads(text)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.load(tmp_path / "nope.json")
