"""Recognizing activations in the forms exporters write them.

``find_activation(x, ...)`` looks at the consumers of tensor ``x`` and returns the
activation applied to it, the nodes that form it and the tensor after it:

=============  ===========================================================
``relu``       Relu
``relu6``      Clip(min=0, max=6) with attributes, initializers or Constants
``clip``       any other Clip
``hardswish``  HardSwish, or x * HardSigmoid(x) (alpha 1/6, beta 0.5)
``hardsigmoid`` HardSigmoid
``sigmoid``    Sigmoid
``swish``      x * Sigmoid(x) (SiLU)
``gelu``       Gelu, or the erf form x * 0.5 * (1 + erf(x / sqrt 2))
``leakyrelu``, ``elu``, ``tanh``, ``prelu``  the op of that name
=============  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

UNARY = {
    "Relu": "relu",
    "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "LeakyRelu": "leakyrelu",
    "Elu": "elu",
    "Gelu": "gelu",
    "PRelu": "prelu",
}


@dataclass(frozen=True)
class Activation:
    kind: str
    nodes: tuple[str, ...]  # node names forming it
    output: str


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ONNX node attribute ``name``, or ``default`` when the node has none."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def clip_bounds(node: onnx.NodeProto, const: Callable[[str], np.ndarray | None]) -> tuple[float | None, float | None]:
    lo = attr(node, "min")
    hi = attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        v = const(node.input[1])
        lo = None if v is None else float(np.asarray(v).reshape(-1)[0])
    if len(node.input) > 2 and node.input[2]:
        v = const(node.input[2])
        hi = None if v is None else float(np.asarray(v).reshape(-1)[0])
    return lo, hi


def _scalar(const: Callable[[str], np.ndarray | None], name: str) -> float | None:
    v = const(name)
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v).reshape(-1)[0])


def find_activation(
    x: str,
    consumers: Mapping[str, Sequence[onnx.NodeProto]],
    const: Callable[[str], np.ndarray | None],
) -> Activation | None:
    users = list(consumers.get(x, ()))
    if len(users) == 1:
        n = users[0]
        if n.op_type in UNARY and n.input[0] == x:
            # a lone HardSigmoid stays hardsigmoid; x * HardSigmoid(x) (two users) is hardswish below
            return Activation(UNARY[n.op_type], (n.name,), n.output[0])
        if n.op_type == "Clip" and n.input[0] == x:
            lo, hi = clip_bounds(n, const)
            kind = "relu6" if lo == 0.0 and hi == 6.0 else ("relu" if lo == 0.0 and hi is None else "clip")
            return Activation(kind, (n.name,), n.output[0])
        return None
    if len(users) == 2:
        gate = [u for u in users if u.op_type in ("Sigmoid", "HardSigmoid") and u.input[0] == x]
        mul = [u for u in users if u.op_type == "Mul" and x in u.input]
        if len(gate) == 1 and len(mul) == 1:
            g, m = gate[0], mul[0]
            if set(m.input) == {x, g.output[0]} and [c.name for c in consumers.get(g.output[0], ())] == [m.name]:
                if g.op_type == "Sigmoid":
                    return Activation("swish", (g.name, m.name), m.output[0])
                alpha = attr(g, "alpha", 0.2)
                beta = attr(g, "beta", 0.5)
                if abs(alpha - 1 / 6) < 1e-4 and abs(beta - 0.5) < 1e-4:
                    return Activation("hardswish", (g.name, m.name), m.output[0])
        gelu = _erf_gelu(x, users, consumers, const)
        if gelu is not None:
            return gelu
    return None


def _erf_gelu(x, users, consumers, const) -> Activation | None:
    """x * 0.5 * (1 + erf(x / sqrt(2))) in the orders torch writes it."""
    div = [u for u in users if u.op_type in ("Div", "Mul") and u.input[0] == x]
    if not div:
        return None
    for d in div:
        c = _scalar(const, d.input[1]) if len(d.input) > 1 else None
        if c is None or not (abs(c - 2**0.5) < 1e-3 or abs(c - 2**-0.5) < 1e-3):
            continue
        nxt = consumers.get(d.output[0], ())
        if len(nxt) != 1 or nxt[0].op_type != "Erf":
            continue
        erf = nxt[0]
        nxt = consumers.get(erf.output[0], ())
        if len(nxt) != 1 or nxt[0].op_type != "Add":
            continue
        add = nxt[0]
        nxt = consumers.get(add.output[0], ())
        if len(nxt) != 1 or nxt[0].op_type != "Mul":
            continue
        m1 = nxt[0]
        other = [u for u in users if u is not d]
        if len(other) != 1:
            continue
        if x in m1.input:
            # (x * (1 + erf)) * 0.5
            nxt = consumers.get(m1.output[0], ())
            if len(nxt) == 1 and nxt[0].op_type == "Mul":
                return Activation("gelu", (d.name, erf.name, add.name, m1.name, nxt[0].name), nxt[0].output[0])
        else:
            # (x * 0.5) * (1 + erf)
            half = other[0]
            if half.op_type == "Mul" and half.output[0] in m1.input:
                return Activation("gelu", (d.name, erf.name, add.name, half.name, m1.name), m1.output[0])
    return None
