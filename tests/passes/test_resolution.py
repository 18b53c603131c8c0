"""resolution: change the static input H/W where the net is fully convolutional up to a global pooling."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from apply_helpers import apply_checked, built, loaded
from archpass.errors import RecipeError
from archpass.passes.engine import apply_recipe_shapes
from archpass.spatial import SpatialError, propagate_hw
from builders import NetBuilder, flatten_fc_model, nhwc_input


def _net(flatten="flatten"):
    b = NetBuilder((1, 3, 32, 32), seed=6).conv(8, 3, stride=2, act="relu")
    b.ibn(8, expand=4, act="relu6", se="sigmoid").ibn(16, expand=4, k=5, stride=2, act="hardswish")
    b.concat(lambda b: b.conv(8, 1), lambda b: b.conv(8, 3, stride=1))
    return b.head(7, flatten=flatten).build()


@pytest.mark.parametrize("hw", [(48, 48), (33, 21), (8, 8)])
def test_built_net_any_resolution(hw):
    model, s = built(_net())
    applied = apply_checked(model, s, [{"pass": "resolution", "height": hw[0], "width": hw[1]}])
    t = applied.structure
    assert t.input_hw == hw and t.outputs == s.outputs
    assert applied.rewrites[0]["exact"] is False
    assert applied.rewrites[0]["after"] == {"input_hw": list(hw)}
    assert t.layers[0].in_hw == hw
    # MACs scale with the pixels; params do not change
    assert t.params == s.params and (t.macs > s.macs) == (hw[0] * hw[1] > 32 * 32)


def test_reshape_after_global_pool_is_fine():
    model, s = built(_net(flatten="reshape"))
    apply_checked(model, s, [{"pass": "resolution", "height": 40, "width": 40}])


def test_refuses_flatten_of_spatial_map():
    _, s = built(flatten_fc_model())
    with pytest.raises(RecipeError, match="Flatten 'flat'.*not fully convolutional"):
        apply_recipe_shapes(s, [{"pass": "resolution", "height": 8, "width": 8}])


def test_refuses_window_larger_than_input():
    b = NetBuilder((1, 3, 16, 16)).conv(8, 3, stride=2).conv(8, 3, stride=2).conv(8, 3, stride=2)
    model, s = built(b.build())
    with pytest.raises(SpatialError):
        propagate_hw(s, (0, 4))
    t = propagate_hw(s, (1, 1))
    assert t.layers[-1].out_hw == (1, 1)


def test_bad_choices():
    _, s = built(_net())
    for choice, msg in [({"height": 0, "width": 8}, "positive integer"), ({"height": 8}, "needs width"),
                        ({"height": 8.5, "width": 8}, "positive integer")]:
        with pytest.raises(RecipeError, match=msg):
            apply_recipe_shapes(s, [{"pass": "resolution", **choice}])
    with pytest.raises(RecipeError, match="whole model"):
        apply_recipe_shapes(s, [{"pass": "resolution", "site": "block0", "height": 8, "width": 8}])


def test_same_resolution_is_a_noop():
    _, s = built(_net())
    assert apply_recipe_shapes(s, [{"pass": "resolution", "height": 32, "width": 32}]) is s


@pytest.mark.slow
@pytest.mark.parametrize("name,hw", [("mobilenet_v2", (160, 192)), ("resnet18", (256, 256)),
                                     ("mnasnet1_0", (192, 192)), ("efficientnet_b0", (200, 200)),
                                     ("mobilenet_v3_large", (128, 160)), ("googlenet", (193, 193))])
def test_real_architectures(name, hw):
    model, s = loaded(name)
    applied = apply_checked(model, s, [{"pass": "resolution", "height": hw[0], "width": hw[1]}])
    assert applied.structure.input_hw == hw


@pytest.mark.slow
def test_real_segmentation_head_follows_its_resizes():
    """LRASPP-MobileNetV3 as the TorchScript exporter writes it with a dynamic batch: both
    Resizes take their sizes from other tensors (a backbone feature, the input)."""
    import zoo
    from archpass.analysis import analyze
    from archpass.model import load_model

    model = load_model(zoo.model_path("lraspp_mobilenet_v3_large", dynamic_batch=True), {"input": (1, 3, 224, 224)})
    s = analyze(model)
    assert len([n for n in s.nodes if n.attr("sizes_from")]) == 2
    group = next(g.id for g in s.groups if g.adjustable and g.channels == 128)  # the head's 128-channel branch
    applied = apply_checked(model, s, [{"pass": "resolution", "height": 160, "width": 192},
                                       {"pass": "channels", "site": group, "channels": 64}])
    assert applied.structure.outputs == (("output", (1, 21, 160, 192)),)
    # exported at 224 with its shapes folded (no dynamic axis), the sizes are literal: refused
    _, static = loaded("lraspp_mobilenet_v3_large")
    with pytest.raises(RecipeError, match="cannot run at 160x192: .* would join"):
        apply_recipe_shapes(static, [{"pass": "resolution", "height": 160, "width": 192}])


@pytest.mark.slow
@pytest.mark.parametrize("name,why", [("shufflenet_v2_x1_0", "Reshape"), ("convnext_tiny", "Reshape")])
def test_real_architectures_refused(name, why):
    _, s = loaded(name)
    with pytest.raises(RecipeError, match=f"cannot run at 160x160: {why} '.*' fixes the spatial size"):
        apply_recipe_shapes(s, [{"pass": "resolution", "height": 160, "width": 160}])


def test_site_domains_and_check_agree():
    """Height/width domains: from the smallest accepted size up to twice the current one;
    check() accepts the bounds and refuses one past them."""
    from archpass.passes.base import IntDomain, Match, get_pass

    res = get_pass("resolution")
    _, s = built(_net())
    (site,) = res.sites(s)
    assert site.kind == "model" and site.id is None
    assert site.domains == {"height": IntDomain(1, 64, 1, 32), "width": IntDomain(1, 64, 1, 32)}
    for h, w in [(1, 1), (64, 64), (1, 64), (32, 32)]:
        assert isinstance(res.check(s, None, {"height": h, "width": w}), Match)
    for h, w in [(65, 32), (32, 65), (0, 32), (10_000, 10_000)]:
        assert isinstance(res.check(s, None, {"height": h, "width": w}), str), (h, w)
    with pytest.raises(RecipeError, match="at most 64"):
        apply_recipe_shapes(s, [{"pass": "resolution", "height": 65, "width": 32}])


def test_smallest_size_is_found_by_bisection():
    """Unpadded convs need a minimum input: 3 stride-2 3x3 convs accept 15 but not 14."""
    from archpass.passes.base import Match, get_pass

    res = get_pass("resolution")
    import numpy as np

    inits, nodes, x = [], [], "x"
    for i in range(3):
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, (4, 3 if i == 0 else 4, 3, 3),
                                        np.ones(4 * (3 if i == 0 else 4) * 9, np.float32).tolist()))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", strides=[2, 2]))
        x = f"c{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="pool"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 24, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], inits)
    _, s = built(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    (site,) = res.sites(s)
    h, w = site.domains["height"], site.domains["width"]
    assert (h.low, h.high, h.current) == (15, 48, 24) and (w.low, w.high, w.current) == (15, 40, 20)
    assert isinstance(res.check(s, None, {"height": 15, "width": 15}), Match)
    assert isinstance(res.check(s, None, {"height": 14, "width": 20}), str)


def test_no_site_when_the_spatial_size_is_fixed():
    from archpass.passes.base import get_pass

    _, s = built(flatten_fc_model())
    assert get_pass("resolution").sites(s) == []


def test_match_carries_the_propagated_structure():
    from archpass.passes.base import get_pass

    res = get_pass("resolution")
    _, s = built(_net())
    m = res.check(s, None, {"height": 48, "width": 40})
    assert m.found["hw"] == (48, 40) and m.found["structure"].input_hw == (48, 40)
    assert res.apply_shapes(s, m).structure is m.found["structure"]


@pytest.mark.parametrize("kernels,smallest", [([(3, 5), (3, 3)], (5, 7)), ([(2, 2)], (2, 2))])
def test_domains_bound_each_axis_by_the_smallest_size_the_network_accepts(kernels, smallest):
    """Unpadded convs need a minimum input along each axis (k - 1 per conv, plus one); the
    domains run from there to twice the current size, height and width on their own."""
    import numpy as np

    from archpass.passes.base import IntDomain, registry

    b = NetBuilder((1, 3, 12, 20), seed=12)
    for i, (kh, kw) in enumerate(kernels):
        w = b.tensor(f"w{i}", np.random.default_rng(i).standard_normal((4, b.channels, kh, kw)).astype(np.float32))
        b.x = b.node("Relu", [b.node("Conv", [b.x, w], f"c{i}", kernel_shape=[kh, kw])], f"r{i}")
        b.shape = [1, 4, b.shape[2] - kh + 1, b.shape[3] - kw + 1]
    _, s = built(b.build())
    (site,) = registry()["resolution"].sites(s)
    assert site.domains == {"height": IntDomain(smallest[0], 24, 1, 12), "width": IntDomain(smallest[1], 40, 1, 20)}
    assert site.note == "input is 12x20"
    below = registry()["resolution"].check(s, None, {"height": smallest[0] - 1, "width": 20})
    assert below.startswith(f"cannot run at {smallest[0] - 1}x20: ")


def test_the_current_size_is_an_unmodified_exact_rewrite():
    import onnx_graphsurgeon as gs

    from archpass.passes.engine import plan
    from archpass.recipe import Recipe

    model, s = built(NetBuilder((1, 3, 12, 20), seed=13).conv(4, 3, act="relu").build())
    (step,) = plan(s, Recipe.of([{"pass": "resolution", "height": 12, "width": 20}])).steps
    gr = step.pass_.apply_graph(gs.import_onnx(model.proto), s, step.match)
    assert (gr.modified, gr.exact) == (False, True) and (step.result.modified, step.result.exact) == (False, True)
    applied = apply_checked(model, s, [{"pass": "resolution", "height": 12, "width": 20}])
    assert applied.rewrites[0]["exact"] is True


def test_a_tall_input_probes_each_axis_with_the_other_at_its_own_size():
    """Input 20x6 and a 13x3 unpadded kernel: height needs 13, width 3; the growth check
    runs at 40x12 (a square 12x12 would be refused), and the width is probed at height 20."""
    import numpy as np

    from archpass.passes.base import IntDomain, registry

    b = NetBuilder((1, 3, 20, 6), seed=14)
    w = b.tensor("w0", np.random.default_rng(0).standard_normal((4, 3, 13, 3)).astype(np.float32))
    b.x = b.node("Relu", [b.node("Conv", [b.x, w], "c0", kernel_shape=[13, 3])], "r0")
    b.shape = [1, 4, 8, 4]
    _, s = built(b.build())
    (site,) = registry()["resolution"].sites(s)
    assert site.domains == {"height": IntDomain(13, 40, 1, 20), "width": IntDomain(3, 12, 1, 6)}


def test_only_the_image_input_is_resized():
    """A second 4-D input (a per-channel scale, 1x4x1x1) keeps its shape; the image input
    alone takes the new size, and the model runs at it."""
    import numpy as np

    from apply_helpers import rel_err
    from builders import run_ort

    b = NetBuilder((1, 3, 12, 10), seed=15).conv(4, 3, act="relu")
    b.x = b.node("Mul", [b.x, "scale"], "scaled")
    proto = b.build(check=False)
    proto.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 4, 1, 1]))
    onnx.checker.check_model(proto, full_check=True)
    model, s = built(proto)
    from archpass.passes.engine import apply_recipe
    from archpass.recipe import Recipe

    applied = apply_recipe(model, Recipe.of([{"pass": "resolution", "height": 16, "width": 8}]), structure=s)
    onnx.checker.check_model(applied.proto, full_check=True)
    assert applied.structure.inputs == (("input", (1, 3, 16, 8)), ("scale", (1, 4, 1, 1)))
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in applied.proto.graph.input}
    assert shapes == {"input": [1, 3, 16, 8], "scale": [1, 4, 1, 1]}
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 8)).astype(np.float32)
    one = run_ort(applied.proto, {"input": x, "scale": np.ones((1, 4, 1, 1), np.float32)})[0]
    two = run_ort(applied.proto, {"input": x, "scale": np.full((1, 4, 1, 1), 2.0, np.float32)})[0]
    assert one.shape == (1, 4, 16, 8) and rel_err(two, 2 * one) < 1e-6


def _fpn(h: int, w: int, dynamic_hw: bool = False) -> onnx.ModelProto:
    """A feature-pyramid/segmentation head as TorchScript exports it: a deep feature is
    upsampled to the size of a shallow one (sizes = Concat(Shape(deep)[0:2], Shape(shallow)[2:4])),
    added to it, and the sum upsampled to the input's size."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(11)

    def w_(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def sizes(data, like, out):
        return [helper.make_node("Shape", [data], [f"{out}_nc"], start=0, end=2),
                helper.make_node("Shape", [like], [f"{out}_hw"], start=2, end=4),
                helper.make_node("Concat", [f"{out}_nc", f"{out}_hw"], [f"{out}_sizes"], axis=0),
                helper.make_node("Resize", [data, "", "", f"{out}_sizes"], [out], mode="linear")]

    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["shallow"]),
             helper.make_node("Conv", ["shallow", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["deep"]),
             *sizes("deep", "shallow", "up1"),
             helper.make_node("Add", ["up1", "shallow"], ["sum"]),
             helper.make_node("Conv", ["sum", "w3"], ["logits"]),
             *sizes("logits", "input", "output")]
    hw = ["H", "W"] if dynamic_hw else [h, w]
    g = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, *hw])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5, *hw])],
                          [w_("w1", 16, 3, 3, 3), w_("w2", 16, 16, 3, 3), w_("w3", 5, 16, 1, 1)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("hw", [(48, 40), (21, 19)])
def test_resize_to_another_tensors_size_follows_it(hw):
    """The source computes the upsampling sizes from other tensors; canonicalization folds
    them, the analysis keeps the link, and the rewritten model equals the source run at the
    new size (so do channels changed in the same recipe, where the shapes must agree)."""
    import numpy as np

    from builders import random_input, run_ort

    model, s = built(_fpn(32, 32))
    assert {n.outputs[0] for n in s.nodes if n.attr("sizes_from")} == {"up1", "output"}
    applied = apply_checked(model, s, [{"pass": "resolution", "height": hw[0], "width": hw[1]}])
    assert applied.structure.outputs == (("output", (1, 5, *hw)),)
    x = random_input((1, 3, *hw))
    np.testing.assert_allclose(run_ort(applied.proto, {"input": x})[0],
                               run_ort(_fpn(0, 0, dynamic_hw=True), {"input": x})[0], rtol=1e-5, atol=1e-5)
    group = next(g.id for g in s.groups if g.adjustable and g.channels == 16)
    both = apply_checked(model, s, [{"pass": "channels", "site": group, "channels": 8},
                                    {"pass": "resolution", "height": hw[0], "width": hw[1]}])
    assert run_ort(both.proto, {"input": x})[0].shape == (1, 5, *hw)


def test_resize_sizes_the_source_spells_as_constants_still_fix_the_size():
    # the same head with its sizes folded in the source (the dynamo exporter's form): no link
    from archpass.model import canonicalize

    _, s = built(canonicalize(_fpn(32, 32)))
    assert not [n for n in s.nodes if n.attr("sizes_from")]
    with pytest.raises(RecipeError, match="cannot run at 48x48.*would join"):
        apply_recipe_shapes(s, [{"pass": "resolution", "height": 48, "width": 48}])


@pytest.mark.parametrize("hw", [(48, 40), (16, 24)])
def test_an_nhwc_input_is_resized_on_its_height_and_width_axes(hw):
    """An NHWC image input (Keras exports) keeps its height and width on axes 1 and 2: every
    resolution was once refused ('width must be at most 6 (2x the current 3)': the channels
    read as the width), so a search with --resolutions found nothing at all."""
    model, s = built(nhwc_input(_net()))
    assert s.input_hw_axes == (1, 2) and s.input_hw == (32, 32)
    assert built(_net())[1].input_hw_axes == (2, 3)
    applied = apply_checked(model, s, [{"pass": "resolution", "height": hw[0], "width": hw[1]}])
    assert applied.structure.input_hw == hw
    assert dict(applied.structure.inputs)["nhwc"] == (1, *hw, 3)
    assert [d.dim_value for d in applied.proto.graph.input[0].type.tensor_type.shape.dim] == [1, *hw, 3]
    assert applied.structure.layers[0].in_hw == hw
