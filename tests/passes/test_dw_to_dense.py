"""dw_to_dense: depthwise conv -> dense conv with block-diagonal weights (exact)."""

from __future__ import annotations

import pytest

from apply_helpers import apply_checked, assert_exact, built, loaded
from archpass.errors import RecipeError
from archpass.passes.engine import apply_recipe_shapes
from builders import NetBuilder


def _net():
    b = NetBuilder((1, 3, 20, 20), seed=2).conv(8, 3, stride=2, act="relu")
    b.dw_separable(16, act="relu6")
    b.ibn(16, expand=3, act="hardswish", se="hardsigmoid")
    return b.head(5).build()


def test_block_diagonal_weights_exact_and_new_group():
    model, s = built(_net())
    dws = [l for l in s.layers if l.depthwise]
    assert len(dws) == 2
    for d in dws:
        applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": d.id}])
        assert applied.rewrites[0]["exact"] is True
        assert_exact(model, applied)
        t = applied.structure
        dense = t.layer(d.id)
        assert dense.groups == 1 and (dense.cin, dense.cout) == (d.cin, d.cout)
        new = f"group{max(int(g.id[5:]) for g in s.groups) + 1}"
        assert dense.in_groups == d.in_groups and dense.out_group == new
        g_in, g_out = t.group(d.in_groups[0]), t.group(new)
        blk = next(b for b in s.blocks if d.id in b.layers)
        se = {blk.role("se_expand")} - {None}  # an SE gate produces the same channels
        assert {m.node for m in g_out.producers} == {d.id} | se and d.id in {m.node for m in g_in.consumers}
        assert g_out.channels == d.cout and g_out.adjustable
        assert applied.rewrites[0]["after"]["new_group"] == new
        # the block left the block list and its stage; the other blocks keep theirs
        assert [(st.id, tuple(x for x in st.blocks if x != blk.id)) for st in s.stages] == [
            (st.id, st.blocks) for st in t.stages]
        # downstream members (SE, project input) moved with the output; the input side stayed
        proj = blk.role("project")
        assert t.layer(proj).in_groups == (new,)
        assert not any(d.id in b.layers for b in t.blocks)
        w = [i for i in applied.proto.graph.initializer if i.name == f"{d.id}.dense_weight"]
        assert len(w) == 1 and tuple(w[0].dims) == (d.cout, d.cin, *d.kernel)


def test_new_group_can_be_resized_by_channels():
    model, s = built(_net())
    d = next(l for l in s.layers if l.depthwise and l.cin == 48)
    new = f"group{max(int(g.id[5:]) for g in s.groups) + 1}"
    recipe = [{"pass": "dw_to_dense", "site": d.id}, {"pass": "channels", "site": new, "channels": 56}]
    applied = apply_checked(model, s, recipe)
    assert applied.structure.layer(d.id).cout == 56 and applied.structure.layer(d.id).cin == 48
    assert_exact(model, applied)  # rounding up pads zero channels


def test_residual_around_depthwise_keeps_one_group():
    b = NetBuilder((1, 8, 10, 10), seed=4).conv(8, 1, act="relu")
    b.add(lambda b: b.dw(3, act=None, name="dwres"), lambda b: None)
    model, s = built(b.head(3).build())
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dwres"}])
    assert_exact(model, applied)
    t = applied.structure
    assert len(t.groups) == len(s.groups)
    assert t.layer("dwres").out_group == t.layer("dwres").in_groups[0]


def test_channel_multiplier():
    b = NetBuilder((1, 4, 10, 10), seed=5).conv(8, 3, groups=4, act="relu", name="dwm").conv(6, 1, act=None)
    model, s = built(b.build())
    assert s.layer("dwm").depthwise and s.layer("dwm").cout == 2 * s.layer("dwm").cin
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dwm"}])
    assert_exact(model, applied)


def test_channel_multiplier_output_group_becomes_adjustable():
    """The multiplier was the only reason dwm's output channels were fixed; once dense they
    can change (as a re-analysis of the emitted model says), and the input stays fixed (model input)."""
    from apply_helpers import groups_as_analyzed

    b = NetBuilder((1, 4, 10, 10), seed=5).conv(8, 3, groups=4, act="relu", name="dwm").conv(6, 1, act=None)
    model, s = built(b.build())
    assert not s.group(s.layer("dwm").out_group).adjustable
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dwm"}])
    t = applied.structure
    out, inp = t.group(t.layer("dwm").out_group), t.group(t.layer("dwm").in_groups[0])
    assert out.adjustable and out.reason is None and not out.fixes
    assert not inp.adjustable and "model input" in inp.reason
    ours, reanalyzed = groups_as_analyzed(applied)
    assert ours == reanalyzed
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dwm"},
                                       {"pass": "channels", "site": out.id, "channels": 12}])
    assert applied.structure.layer("dwm").cout == 12


def test_residual_around_a_separable_block_splits_only_the_depthwise_output():
    """stem -> dw -> relu -> 1x1 -> Add(stem) (MobileNetV3's first block): the Add ties the 1x1's
    output to the dw's input, not to the dw's output; only dw -> 1x1 becomes a new group."""
    from apply_helpers import groups_as_analyzed

    b = NetBuilder((1, 3, 12, 12), seed=7).conv(8, 3, act="relu", name="stem")
    b.add(lambda b: b.dw(3, act="relu", name="dws").conv(8, 1, act=None, name="pws"), lambda b: None)
    model, s = built(b.head(3).build())
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dws"}])
    assert_exact(model, applied)
    t = applied.structure
    new = t.group(t.layer("dws").out_group)
    assert {(m.node, m.role) for m in new.members} == {("dws", "producer"), ("pws", "consumer")} and new.adjustable
    assert t.layer("pws").out_group == t.layer("stem").out_group == t.layer("dws").in_groups[0]
    ours, reanalyzed = groups_as_analyzed(applied)
    assert ours == reanalyzed


def test_depthwise_on_the_model_input_gives_an_adjustable_group():
    """The model input fixes the depthwise conv's input group; the new output group does not carry that fix."""
    from apply_helpers import groups_as_analyzed

    b = NetBuilder((1, 4, 10, 10), seed=6).dw(3, act="relu", name="dw0").conv(6, 1, act=None)
    model, s = built(b.build())
    assert not s.group(s.layer("dw0").out_group).adjustable
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dw0"}])
    t = applied.structure
    assert t.group(t.layer("dw0").out_group).adjustable
    assert not t.group(t.layer("dw0").in_groups[0]).adjustable
    ours, reanalyzed = groups_as_analyzed(applied)
    assert ours == reanalyzed


def test_refusals():
    model, s = built(_net())
    dense = next(l for l in s.layers if l.groups == 1 and l.op == "Conv")
    with pytest.raises(RecipeError, match="not a depthwise conv"):
        apply_recipe_shapes(s, [{"pass": "dw_to_dense", "site": dense.id}])
    with pytest.raises(RecipeError, match="expected a layer id"):
        apply_recipe_shapes(s, [{"pass": "dw_to_dense", "site": "block0"}])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0"])
def test_real_architectures_exact(name):
    model, s = loaded(name)
    dws = sorted((l for l in s.layers if l.depthwise), key=lambda l: l.params * l.cin)[:2]
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": l.id} for l in dws])
    assert all(r["exact"] for r in applied.rewrites)
    assert_exact(model, applied)


def test_check_names_unknown_sites():
    from archpass.passes.base import registry

    _, s = built(_net())
    p = registry()["dw_to_dense"]
    assert p.check(s, "nosuch", {}) == "'nosuch' is not a layer of this model"
    assert [x.id for x in p.sites(s)] == [l.id for l in s.layers if l.depthwise]


def test_shape_path_groups_match_a_reanalysis():
    from apply_helpers import groups_as_analyzed

    model, s = built(_net())
    for layer in [l.id for l in s.layers if l.depthwise]:
        ours, reanalyzed = groups_as_analyzed(apply_checked(model, s, [{"pass": "dw_to_dense", "site": layer}]))
        assert ours == reanalyzed, layer


def test_non_square_kernel_in_the_record():
    import numpy as np

    b = NetBuilder((1, 8, 10, 10), seed=8).conv(8, 1, act="relu", name="stem")
    w = b.tensor("dw_w", np.random.default_rng(8).standard_normal((8, 1, 3, 5)).astype(np.float32))
    b.x = b.node("Relu", [b.node("Conv", [b.x, w], "dw", group=8, kernel_shape=[3, 5], pads=[1, 2, 1, 2])], "dw_act")
    model, s = built(b.conv(4, 1, act=None, name="proj").build())
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dw"}])
    assert applied.rewrites[0]["before"] == {"layer": "8->8 k3x5 groups=8"}
    assert applied.rewrites[0]["after"]["layer"] == "8->8 k3x5 groups=1"
    assert_exact(model, applied)


@pytest.mark.parametrize("after", ["depthwise2", "grouped_residual", "flatten_head"])
def test_what_stays_tied_to_the_dense_output(after):
    """The new group follows ops that tie channels (a 2-channel depthwise conv does), not a grouped
    conv (whose output an Add ties to the block input), and a fix made downstream (a Flatten of
    the spatial map) goes with the new group only."""
    import numpy as np

    if after == "depthwise2":
        b = NetBuilder((1, 2, 8, 8), seed=9).conv(2, 1, act="relu", name="stem")
        b.dw(3, act="relu", name="dwa").dw(3, act="relu", name="dwb").conv(3, 1, act=None, name="proj")
        model, s = built(b.build())
        site = "dwa"
    elif after == "grouped_residual":
        b = NetBuilder((1, 8, 8, 8), seed=9).conv(8, 1, act="relu", name="stem")
        b.add(lambda b: b.dw(3, act="relu", name="dwa").conv(8, 3, groups=2, act=None, name="gc"), lambda b: None)
        model, s = built(b.head(3).build())
        site = "dwa"
    else:
        # no activation: the Flatten reads the dense output itself (the fix touches every moved tensor)
        b = NetBuilder((1, 4, 4, 4), seed=9).conv(8, 1, act="relu", name="stem").dw(3, act=None, name="dwa")
        b.x = b.node("Flatten", [b.x], "flat", axis=1)
        b.x = b.node("MatMul", [b.x, b.tensor("fc_w", np.ones((128, 3), np.float32))], "fc")
        b.shape = [1, 3]
        model, s = built(b.build())
        site = "dwa"
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": site}])  # groups equal a re-analysis
    assert_exact(model, applied)
    t = applied.structure
    if after == "flatten_head":
        assert t.group(t.layer("dwa").in_groups[0]).adjustable
        assert "Flatten 'flat'" in t.group(t.layer("dwa").out_group).reason


def test_a_1d_depthwise_becomes_a_dense_1d_conv_exactly():
    from builders import conv1d_net

    model, s = built(conv1d_net())
    applied = apply_checked(model, s, [{"pass": "dw_to_dense", "site": "dw"}])
    (w,) = [t for t in applied.proto.graph.initializer if t.name == applied.structure.layer("dw").weight]
    assert tuple(w.dims) == (64, 64, 5) and applied.structure.layer("dw").groups == 1
    assert_exact(model, applied)
