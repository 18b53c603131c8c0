"""passes/structedit.py: the shape-only editing helpers the passes share."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from apply_helpers import built
from archpass.passes.structedit import chain_between, drop_unused_consts, edit_members, next_group_id
from archpass.structure import Tensor
from builders import NetBuilder


def _act_chain(side: str | None = None):
    """conv0 -> [side branch on conv0's output] -> hardswish as x * HardSigmoid(x) -> dw."""
    b = NetBuilder((1, 4, 8, 8), seed=1).conv(8, 1, act=None, name="conv0")
    x = b.x
    if side == "before":  # a consumer of conv0's output that leaves the chain, met first
        b.node("GlobalAveragePool", [x], "side")
    hs = b.node("HardSigmoid", [x], "hs", alpha=1.0 / 6, beta=0.5)
    b.x = b.node("Mul", [x, hs], "mul")
    if side == "after":
        b.node("GlobalAveragePool", [x], "side")
    if side == "from_the_gate":  # reads the HardSigmoid's output, after the Mul that reads it too
        b.node("GlobalAveragePool", [hs], "side")
    out = b.x
    b.dw(3, act="relu", name="dw")
    proto = b.build(check=False)
    if side:  # the side branch is a second model output
        import onnx

        proto.graph.output.append(onnx.helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [1, 8, 1, 1]))
    _, s = built(proto)
    return s, s.layer("conv0").output, out


def test_chain_between_an_activation():
    s, start, end = _act_chain()
    nodes, tensors = chain_between(s, start, end)
    assert [n.name for n in nodes] == ["hs", "mul"] and tensors == {"hs"}
    for side in ("before", "after", "from_the_gate"):  # a path that does not lead to ``end``: no chain
        s, start, end = _act_chain(side)
        assert chain_between(s, start, end) is None, side


def test_chain_between_refuses_a_non_constant_input_from_outside():
    b = NetBuilder((1, 4, 8, 8), seed=2).conv(8, 1, act=None, name="a")
    other = b.x
    b.conv(8, 1, act=None, name="conv0")
    start = b.x
    b.x = b.node("Add", [start, other], "join")
    end = b.x
    _, s = built(b.dw(3, act="relu", name="dw").build())
    assert chain_between(s, start, end) is None  # 'join' reads a's output too


def test_edit_members_keeps_unchanged_groups_and_drops_members():
    _, s = built(NetBuilder((1, 4, 8, 8), seed=3).conv(8, 3, act="relu", name="c").conv(4, 1, name="d").build())
    same = edit_members(s.groups, lambda gid, m: m)
    assert all(a is b for a, b in zip(same, s.groups))
    gone = edit_members(s.groups, lambda gid, m: None if m.node == "c" else m)
    assert [g is h for g, h in zip(gone, s.groups)] == [not any(m.node == "c" for m in g.members) for g in s.groups]
    assert not any(m.node == "c" for g in gone for m in g.members)


def test_drop_unused_consts():
    _, s = built(NetBuilder((1, 4, 8, 8), seed=4).conv(8, 3, act="relu", name="c").build())
    tensors = dict(s.tensors)
    tensors["unused"] = Tensor("unused", (3,), const=True)
    act = s.layer("c").output
    drop_unused_consts(tensors, s.nodes, ["unused", "c_w", act, "", "missing"])
    assert "unused" not in tensors  # a constant nothing reads goes
    assert "c_w" in tensors and act in tensors  # one still read, and a non-constant, stay
    kept = dict(tensors)
    drop_unused_consts(tensors, s.nodes, [])
    assert tensors == kept


def test_next_group_id():
    _, s = built(NetBuilder((1, 4, 8, 8), seed=5).conv(8, 3, act="relu").conv(4, 1).build())
    assert next_group_id(s) == f"group{len(s.groups)}"
    assert next_group_id(replace(s, groups=())) == "group0"
    renamed = tuple(replace(g, id=f"other{90 + i}") for i, g in enumerate(s.groups))  # not 'group<N>' ids
    assert next_group_id(replace(s, groups=renamed)) == "group0"
    assert np.all([g.id.startswith("group") for g in s.groups])
