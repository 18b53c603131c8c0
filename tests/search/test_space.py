import optuna
import pytest
from optuna.trial import FixedTrial

from archpass.analysis import analyze
from archpass.model import model_from_proto
from archpass.passes.engine import apply_recipe_shapes
from archpass.search.space import Space, SpaceError, pass_sites
from builders import NetBuilder
from search_helpers import ibn_net


@pytest.fixture(scope="module")
def structure():
    return analyze(model_from_proto(ibn_net()))


def test_neutral_params_pick_the_unchanged_model(structure):
    space = Space.build(structure, parallelism=8)
    recipe, s = space.suggest(FixedTrial(space.neutral_params()))
    assert len(recipe) == 0
    assert s is structure


def test_fixed_trial_fuses_and_narrows_at_multiples_of_the_parallelism(structure):
    space = Space.build(structure, parallelism=8)
    params = space.neutral_params()
    ibns = [b.id for b in structure.blocks if b.kind == "ibn"]
    assert ibns and all(f"fuse_ibn:{b}" in params for b in ibns)
    params.update({f"fuse_ibn:{b}": True for b in ibns})
    params.update({k: 0.625 for k in params if k.startswith("channels:")})
    params["width_multiplier"] = 0.75
    recipe, s = space.suggest(FixedTrial(params))
    passes = [r.pass_name for r in recipe]
    assert passes[0] == "width_multiplier" and passes.count("fuse_ibn") == len(ibns)
    chans = [r.choice["channels"] for r in recipe if r.pass_name == "channels"]
    assert chans and all(c % 8 == 0 and c >= 8 for c in chans)
    assert all(b.kind == "fused_ibn" for b in s.blocks if b.id in ibns)
    # the piecewise structure is the one the engine gives for the whole recipe
    assert [(l.id, l.cin, l.cout, l.groups) for l in s.layers] == \
        [(l.id, l.cin, l.cout, l.groups) for l in apply_recipe_shapes(structure, recipe).layers]


def test_sites_change_as_the_recipe_grows(structure):
    """dw_to_dense makes new channel groups; later trials suggest channel counts for them."""
    space = Space.build(structure, parallelism=8, passes=["dw_to_dense", "channels"])
    before = {g.id for g in structure.groups}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: len(space.suggest(t)[0]), n_trials=15)
    names = {k for t in study.trials for k in t.params}
    new = {k.split(":", 1)[1] for k in names if k.startswith("channels:")} - before
    assert new, "no channel parameter for a group made by dw_to_dense"


def test_stage_granularity_uses_width_multiplier_stage_sites(structure):
    space = Space.build(structure, parallelism=8, granularity="stage")
    params = space.neutral_params()
    stages = [k for k in params if k.startswith("width_multiplier:")]
    assert stages and not any(k.startswith("channels:") for k in params)
    params[stages[-1]] = 0.5
    recipe, _ = space.suggest(FixedTrial(params))
    assert [(r.pass_name, r.site) for r in recipe] == [("width_multiplier", stages[-1].split(":", 1)[1])]


def test_passes_channels_without_width_multiplier_chooses_per_group_at_stage_granularity(structure):
    """Per-stage counts are width_multiplier stage sites: `--passes channels` alone must still
    search channel counts (per group), not drop them silently."""
    space = Space.build(structure, parallelism=8, passes=["fuse_ibn", "channels"], granularity="stage")
    params = space.neutral_params()
    assert space.granularity == "group" and any(k.startswith("channels:") for k in params)
    assert Space.build(structure, parallelism=8, granularity="stage").granularity == "stage"


def test_a_model_without_stages_chooses_per_group_at_stage_granularity():
    """A transformer's MLP has adjustable hidden widths but no stages: per stage the width
    could only change everywhere at once (Swin-T: every such pick left its 96-channel stem
    under the retrain guard's width floor, and 40 trials found nothing), so per group."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    proto = helper.make_model(helper.make_graph(nodes, "mlp", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    s = analyze(model_from_proto(proto))
    assert not s.stages and s.group(s.layer("fc1").out_group).adjustable
    space = Space.build(s, parallelism=8, granularity="stage")
    assert space.granularity == "group"
    params = space.neutral_params()
    key = f"channels:{s.layer('fc1').out_group}"
    assert key in params
    params[key] = 0.5
    recipe, after = space.suggest(FixedTrial(params))
    assert [(r.pass_name, r.site, dict(r.choice)) for r in recipe] == [("channels", s.layer("fc1").out_group, {"channels": 32})]
    assert after.layer("fc1").cout == 32


def test_freeze_and_passes_restrict_the_space(structure):
    first = next(b.id for b in structure.blocks if b.kind == "ibn")
    space = Space.build(structure, parallelism=8, passes=["fuse_ibn"], freeze=[first])
    params = space.neutral_params()
    assert f"fuse_ibn:{first}" not in params
    assert params and all(k.startswith("fuse_ibn:") for k in params)


def test_resolutions(structure):
    space = Space.build(structure, parallelism=8, resolutions=[24, 32])
    params = space.neutral_params()
    assert params["resolution"] == 32
    params["resolution"] = 24
    recipe, s = space.suggest(FixedTrial(params))
    assert recipe.rewrites[0].pass_name == "resolution" and s.input_hw == (24, 24)


@pytest.mark.parametrize("kw, words", [
    ({"passes": ["fuse_ibn", "fuse_everything"]}, "unknown pass 'fuse_everything'"),
    ({"freeze": ["block99"]}, "--freeze names a site this model does not have: 'block99'"),
    ({"passes": ["resolution"]}, "--resolutions"),
    ({"resolutions": [32, 4096]}, "--resolutions 4096 is outside what this model allows"),
])
def test_bad_restrictions(structure, kw, words):
    with pytest.raises(SpaceError, match=words.replace("(", r"\(")):
        Space.build(structure, parallelism=8, **kw)


def test_resolutions_on_a_model_whose_input_size_cannot_change_say_why():
    """--resolutions were ignored without a word on a model with no image input (a 1-D
    network) or a fixed spatial size (a Flatten into a Linear): now one error naming why."""
    from builders import conv1d_net, flatten_fc_model

    one_d = analyze(model_from_proto(conv1d_net()))
    with pytest.raises(SpaceError, match=r"cannot change \(the model has no 4-D image input\)"):
        Space.build(one_d, parallelism=8, resolutions=[48, 64])
    fixed = analyze(model_from_proto(flatten_fc_model()))
    with pytest.raises(SpaceError, match="cannot change .*not fully convolutional"):
        Space.build(fixed, parallelism=8, resolutions=[6, 8])
    assert Space.build(one_d, parallelism=8).resolutions == ()  # without --resolutions, nothing to say


def test_a_model_with_nothing_to_rewrite_says_why():
    s = analyze(model_from_proto(NetBuilder((1, 3, 8, 8)).conv(8, 3).build()))
    space = Space.build(s, parallelism=8)
    assert "no site" in space.empty_reason()
    assert all(not pass_sites(p, s) for p in space.passes)


def test_width_floor_refuses_a_pick_that_narrows_a_layer_below_it(structure):
    from archpass.errors import RecipeError
    from archpass.search.space import width_floor

    floor = width_floor(structure, ["output"])
    assert floor == min(l.cout for l in structure.layers if l.output != "output") == 16
    space = Space.build(structure, parallelism=8, granularity="stage", min_width=floor)
    params = space.neutral_params()
    ibns = [k for k in params if k.startswith("fuse_ibn:")]
    recipe, _ = space.suggest(FixedTrial({**params, **{k: True for k in ibns}}))  # fusion keeps every width
    assert len(recipe) == len(ibns)
    with pytest.raises(RecipeError, match="fewer than the floor of 16"):
        space.suggest(FixedTrial({**params, "width_multiplier": 0.5}))  # the 16-channel stem goes to 8
    # without the floor the same pick is a valid recipe
    assert len(Space.build(structure, parallelism=8, granularity="stage").suggest(
        FixedTrial({**params, "width_multiplier": 0.5}))[0]) == 1


def test_retrain_default_guard_sets_the_floor_others_do_not(tmp_path):
    import onnx

    from archpass.search.run import Job, prepare
    from search_helpers import FakeGuard

    path = tmp_path / "m.onnx"
    onnx.save_model(ibn_net(), str(path))
    fake = FakeGuard(threshold=0.0)
    kw = dict(model=str(path), target="edgetpu")
    assert prepare(Job(**kw), guard_factory=fake.factory).space.min_width == 16
    assert prepare(Job(**kw, guard=False)).space.min_width == 0
    assert prepare(Job(**kw, min_proxy=-5.0), guard_factory=fake.factory).space.min_width == 0


def test_an_already_quantized_model_says_to_optimize_the_float_export():
    from builders import qdq_model

    s = analyze(model_from_proto(qdq_model()))
    assert any("already quantized (DequantizeLinear, QuantizeLinear)" in n for n in s.notes)
    reason = Space.build(s, parallelism=8).empty_reason()
    assert "no site" in reason and "optimize the float export and quantize the optimized model" in reason
    # a float model gets no such note
    assert not any("quantized" in n for n in analyze(model_from_proto(NetBuilder((1, 3, 8, 8)).conv(8, 3).build())).notes)
