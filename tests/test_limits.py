"""archpass.limits: an output out of proportion is refused from shapes, before any weight
is allocated; --allow-growth lifts the growth and 2 GB limits."""

from __future__ import annotations

import onnx
import pytest

import archpass.limits as lim
import archpass.model as am
from archpass import api
from archpass.analysis import analyze
from archpass.errors import RecipeError
from archpass.limits import OutputSize, check_output_size, predict_output_size
from archpass.model import load_model, weight_bytes
from archpass.passes.engine import apply_recipe, plan
from archpass.recipe import Recipe
from builders import NetBuilder


@pytest.fixture
def net(tmp_path):
    p = tmp_path / "net.onnx"
    onnx.save(NetBuilder((1, 3, 32, 32), seed=3).conv(16, 3, stride=2).ibn(16, expand=4).head(5).build(), str(p))
    return p


def _group(structure):
    return next(g.id for g in structure.groups if g.adjustable)


def _recipe(s, channels):
    return {"rewrites": [{"pass": "channels", "site": _group(s), "channels": channels}]}


def _size(path, channels):
    m = load_model(path)
    s = analyze(m)
    after = plan(s, Recipe.from_json(_recipe(s, channels))).structure
    return m, s, predict_output_size(weight_bytes(m.proto), s, after)


def test_prediction_matches_what_is_written(net, tmp_path):
    m, s, size = _size(net, 64)
    out = apply_recipe(m, Recipe.from_json(_recipe(s, 64)), structure=s).proto
    assert size.params_before == s.params and size.params_after > size.params_before
    # per-channel constants (biases are counted, norm parameters are not) are the only difference
    assert abs(size.bytes_after - weight_bytes(out)) <= 0.02 * weight_bytes(out)


def test_growth_is_refused_before_materializing_and_the_flag_lifts_it(net, tmp_path, monkeypatch):
    # the passes bound each choice (channels: 4x or 64); a recipe can still grow the whole
    # model out of proportion, which the limit catches: shown here with a lower limit
    import sys

    import onnx_graphsurgeon as gs

    m, s, size = _size(net, 64)
    monkeypatch.setattr(lim, "GROWTH_LIMIT", 1.5)
    assert size.growth > 1.5
    real = gs.import_onnx

    def guarded(*a, **k):  # the engine's import of the graph is where materializing starts
        if sys._getframe(1).f_code.co_name == "apply_recipe":
            raise AssertionError("materialized a refused rewrite")
        return real(*a, **k)

    monkeypatch.setattr(gs, "import_onnx", guarded)
    with pytest.raises(RecipeError, match="above the 1.5x limit.*--allow-growth"):
        api.apply(net, _recipe(s, 64), tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    monkeypatch.setattr(gs, "import_onnx", real)
    doc = api.apply(net, _recipe(s, 64), tmp_path / "o.onnx", allow_growth=True)
    assert doc["written"] and doc["after"]["params"] == size.params_after
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_an_output_that_cannot_fit_in_memory_is_refused_even_when_allowed(net, tmp_path, monkeypatch):
    m, s, size = _size(net, 64)
    monkeypatch.setattr(lim, "available_memory", lambda: size.bytes_after - 1)
    with pytest.raises(RecipeError, match="memory available.*no flag lifts"):
        api.apply(net, _recipe(s, 64), tmp_path / "o.onnx", allow_growth=True)
    assert not (tmp_path / "o.onnx").exists()


def test_absurd_channels_are_one_line(net, tmp_path):
    s = analyze(load_model(net))
    with pytest.raises(RecipeError, match="channels must be at most"):
        api.apply(net, _recipe(s, 1_000_000_000), tmp_path / "o.onnx")


def test_over_two_gb_needs_the_flag_and_then_writes_external_data(net, tmp_path, monkeypatch):
    m, s, size = _size(net, 64)
    monkeypatch.setattr(am, "TWO_GB", size.bytes_after - 1)  # pretend the output crosses the protobuf limit
    with pytest.raises(RecipeError, match="2 GB protobuf limit.*--allow-growth.*external data"):
        api.apply(net, _recipe(s, 64), tmp_path / "o.onnx")
    monkeypatch.setattr(am, "TWO_GB", size.bytes_after - 1 + (64 << 20))  # is_large keeps a 64 MB margin
    doc = api.apply(net, _recipe(s, 64), tmp_path / "o.onnx", allow_growth=True)
    assert doc["written"] and (tmp_path / "o.onnx.data").exists()
    assert load_model(tmp_path / "o.onnx").sha256


def test_check_output_size_rules(monkeypatch):
    monkeypatch.setattr(lim, "available_memory", lambda: 10**12)
    check_output_size(OutputSize(100, 1600, 400, 6400))  # 16x is allowed
    with pytest.raises(RecipeError, match="above the 16x limit"):
        check_output_size(OutputSize(100, 1601, 400, 6404))
    check_output_size(OutputSize(100, 1601, 400, 6404), allow_growth=True)
    # an input already above 2 GB may stay above it
    check_output_size(OutputSize(100, 110, 3 << 30, 3 << 30))
    monkeypatch.setattr(lim, "available_memory", lambda: 1000)
    with pytest.raises(RecipeError, match="memory available"):
        check_output_size(OutputSize(100, 110, 400, 4400), allow_growth=True)
    monkeypatch.setattr(lim, "available_memory", lambda: None)  # unknown: not checked
    check_output_size(OutputSize(100, 110, 400, 4400))


def test_a_huge_tensor_is_refused_unless_allowed(net, tmp_path, monkeypatch):
    # resolution is bounded at 2x per rewrite; the tensor limit (2^31 elements) is shown with a lower one
    monkeypatch.setattr(lim, "MAX_ELEMENTS", 16 * 32 * 32)
    recipe = {"rewrites": [{"pass": "resolution", "height": 64, "width": 64}]}
    with pytest.raises(RecipeError, match="elements, above the .* a runtime indexes with 32 bits.*--allow-growth"):
        api.apply(net, recipe, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    doc = api.apply(net, recipe, tmp_path / "o.onnx", allow_growth=True)  # weights do not grow: it can be written
    assert doc["written"] and doc["after"]["params"] == doc["before"]["params"]
