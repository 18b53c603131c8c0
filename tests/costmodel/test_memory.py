"""Parameter bytes and peak activation memory from liveness, on hand-computed graphs."""

from __future__ import annotations

from builders import NetBuilder

from archpass.analysis import analyze
from archpass.costmodel.memory import memory
from archpass.model import model_from_proto
from archpass.structure import Node, Structure, Tensor


def _graph() -> Structure:
    #   x(100) -> A -> a(200) -> C -> c(10) \
    #   x      -> B -> b(50)  -----------------> D -> d(5, output)
    t = {n: Tensor(n, (1, s), elem_bytes=4) for n, s in dict(x=100, a=200, b=50, c=10, d=5).items()}
    nodes = (
        Node("A", "Relu", ("x",), ("a",)),
        Node("B", "Relu", ("x",), ("b",)),
        Node("C", "Relu", ("a",), ("c",)),
        Node("D", "Add", ("b", "c"), ("d",)),
    )
    return Structure(inputs=(("x", (1, 100)),), outputs=(("d", (1, 5)),), layers=(), blocks=(), stages=(), groups=(),
                     nodes=nodes, tensors=t)


def test_peak_by_hand_in_execution_order_and_better_order():
    m = memory(_graph(), bytes_per_element=1)
    # order A,B,C,D: during B, x(100) + a(200) + b(50) are live = 350
    assert m.peak_activation_bytes == 350
    assert m.peak_step == "B"
    # A,C,B,D frees a before b exists: peak 310 during C (x + a + c)
    assert m.best_order_peak_bytes == 310
    assert memory(_graph(), 1, best_order=False).best_order_peak_bytes is None


def test_bytes_per_element_scales_and_outputs_stay_live():
    m = memory(_graph(), bytes_per_element=4)
    assert m.peak_activation_bytes == 1400
    chain = Structure(
        inputs=(("x", (1, 10)),), outputs=(("y", (1, 10)), ("z", (1, 30))), layers=(), blocks=(), stages=(), groups=(),
        nodes=(Node("P", "Relu", ("x",), ("y",)), Node("Q", "Relu", ("y",), ("z",))),
        tensors={n: Tensor(n, (1, s)) for n, s in dict(x=10, y=10, z=30).items()},
    )
    # y is a graph output: still live when z is produced (x freed after P)
    assert memory(chain, 1).peak_activation_bytes == 40


def test_params_bytes_of_a_built_model():
    proto = NetBuilder((1, 3, 16, 16)).conv(8, 3, act="relu").conv(16, 1, act=None).head(10).build()
    s = analyze(model_from_proto(proto, canonical=False))
    expected = (8 * 3 * 9 + 8) + (16 * 8 + 16) + (10 * 16 + 10)
    assert s.params == expected
    assert memory(s, 1).params_bytes == expected
    assert memory(s, 4).params_bytes == 4 * expected
    # the peak is while conv1 runs: its input (relu output, 8x16x16) and output (16x16x16)
    m = memory(s, 1)
    assert (m.peak_activation_bytes, m.peak_step) == (8 * 256 + 16 * 256, "conv1")
    assert m.best_order_peak_bytes == m.peak_activation_bytes  # a chain has one order


def test_order_search_is_skipped_only_when_one_order_exists():
    from archpass.costmodel.memory import _single_order

    # a -> b -> c: one order; a -> (b, c): two
    assert _single_order([set(), {0}, {1}], [{1}, {2}, set()])
    assert not _single_order([set(), {0}, {0}], [{1, 2}, set(), set()])
    assert not _single_order([set(), set()], [set(), set()])  # two independent sources
