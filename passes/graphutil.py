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
    """The value of a graphsurgeon tensor that is an initializer, or None.  (Loading turns every
    Constant node into an initializer, so passes never meet one.)"""
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def fresh_const(name: str, values: np.ndarray) -> gs.Constant:
    """A new constant (never edit a shared one in place: onnxslim dedups identical initializers)."""
    return gs.Constant(name, np.ascontiguousarray(values))
