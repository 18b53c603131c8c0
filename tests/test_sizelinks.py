"""archpass.sizelinks: which tensors' dims a Resize's computed sizes follow in the source."""

from __future__ import annotations

from onnx import TensorProto, helper

from archpass.sizelinks import size_links


def _i64(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _graph(size_nodes, sizes="sizes", extra_inits=()):
    """x (1x8x4x4) resized to ``sizes``; y (1x8x16x16) is the tensor to follow."""
    nodes = [*size_nodes, helper.make_node("Resize", ["x", "", "", sizes], ["up"], name="resize", mode="nearest")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4]),
                                       helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("up", TensorProto.FLOAT, None)], list(extra_inits))
    return helper.make_model(g)


RANKS = {"x": 4, "y": 4, "up": 4}


def test_torchscript_pattern_follows_the_other_tensor():
    # Concat(Slice(Shape(x), 0, 2), Cast(Concat(Unsqueeze(Gather(Shape(y), 2)), Unsqueeze(Gather(Shape(y), 3)))))
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Slice", ["sx", "zero", "two", "zero"], ["nc"]),
             helper.make_node("Shape", ["y"], ["sy"]),
             helper.make_node("Constant", [], ["i2"], value=helper.make_tensor("v", TensorProto.INT64, [], [2])),
             helper.make_node("Gather", ["sy", "i2"], ["h"], axis=0),
             helper.make_node("Unsqueeze", ["h", "zero"], ["h1"]),
             helper.make_node("Gather", ["sy", "i3"], ["w"], axis=0),
             helper.make_node("Unsqueeze", ["w", "zero"], ["w1"]),
             helper.make_node("Concat", ["h1", "w1"], ["hw"], axis=0),
             helper.make_node("Cast", ["hw"], ["hw64"], to=TensorProto.INT64),
             helper.make_node("Concat", ["nc", "hw64"], ["sizes"], axis=0)]
    inits = [_i64("zero", [0]), _i64("two", [2]), helper.make_tensor("i3", TensorProto.INT64, [], [3])]
    links = dict(size_links(_graph(nodes, extra_inits=inits), RANKS))
    assert links == {"up": (("dim", "x", 0), ("dim", "x", 1), ("dim", "y", 2), ("dim", "y", 3))}


def test_shape_start_end_and_constants():
    nodes = [helper.make_node("Shape", ["x"], ["nc"], start=0, end=2),
             helper.make_node("Shape", ["y"], ["hw"], start=-2),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0)]
    assert dict(size_links(_graph(nodes), RANKS))["up"] == (("dim", "x", 0), ("dim", "x", 1), ("dim", "y", 2), ("dim", "y", 3))
    # spatial sizes the source spells as constants follow nothing (the dynamo exporter's form)
    nodes = [helper.make_node("Shape", ["x"], ["nc"], start=0, end=2),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0)]
    assert size_links(_graph(nodes, extra_inits=[_i64("hw", [16, 16])]), RANKS) == ()


def test_arithmetic_constant_sizes_and_unknown_ranks_give_no_link():
    arith = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "k"], ["sizes"])]
    k = helper.make_tensor("k", TensorProto.INT64, [4], [1, 1, 4, 4])
    assert size_links(_graph(arith, extra_inits=[k]), RANKS) == ()
    assert size_links(_graph([], extra_inits=[_i64("sizes", [1, 8, 16, 16])]), RANKS) == ()
    shape_of_y = [helper.make_node("Shape", ["y"], ["sizes"])]
    assert size_links(_graph(shape_of_y), {"x": 4}) == ()  # y's rank unknown
    assert dict(size_links(_graph(shape_of_y), RANKS))["up"][2:] == (("dim", "y", 2), ("dim", "y", 3))
