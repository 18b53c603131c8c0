"""Small helpers the rewrite passes share for editing onnx-graphsurgeon graphs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from archpass.errors import ArchpassError


def node_named(graph: gs.Graph, name: str) -> gs.Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise ArchpassError(f"node '{name}' is missing from the graph being rewritten",
                        "this is an archpass bug; please report it with the recipe")


def const_value(t) -> np.ndarray | None:
    """The value of a graphsurgeon tensor that is an initializer or a Constant node's output."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return np.asarray(v.values) if isinstance(v, gs.Constant) else (None if v is None else np.asarray(v))
    return None


def fresh_const(name: str, values: np.ndarray) -> gs.Constant:
    """A new constant (never edit a shared one in place: onnxslim dedups identical initializers)."""
    return gs.Constant(name, np.ascontiguousarray(values))
