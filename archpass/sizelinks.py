"""Which tensors' sizes a Resize's ``sizes`` were computed from, in the source model.

Exporters write "upsample to the size of that tensor" (``F.interpolate(x, size=y.shape[-2:])``
in a segmentation head or a feature pyramid) as shape arithmetic: ``Concat(Shape(x)[0:2],
Gather(Shape(y), 2), Gather(Shape(y), 3))``.  Loading pins the input and canonicalization
folds that to a constant, which is right for the analysis but forgets the link: at another
input resolution the Resize would still produce the old size.  :func:`size_links` traces
each Resize's ``sizes`` in the source (before folding) with a small interpreter over 1-D
integer vectors (Shape with start/end, Gather and Slice with constant indices, Concat,
Unsqueeze/Squeeze, Cast, Identity, constants): each element is a dim of a named tensor or a
constant, or unknown (any arithmetic), in which case the Resize gets no link.  The analysis
records the links on the Resize nodes (``sizes_from``), :mod:`archpass.spatial` computes
the sizes from the linked tensors' new shapes, and the resolution pass writes them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

#: one element of a traced shape vector: ("dim", tensor, axis) or ("const", value)
Element = tuple

#: Resize output name -> its sizes, element by element
Links = tuple[tuple[str, tuple[Element, ...]], ...]

_PASS_THROUGH = {"Cast", "Identity"}


class _Unknown(Exception):
    pass


def size_links(source: onnx.ModelProto, ranks: dict[str, int]) -> Links:
    """The Resize nodes of ``source`` whose ``sizes`` are computed from other tensors'
    dims (and constants) only, keyed by the Resize's output name.  ``ranks``: the rank of
    each tensor (of the canonical model; a tensor it does not know makes the link unknown)."""
    g = source.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    memo: dict[str, tuple[Element, ...]] = {}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_ints"):
                    return np.array(onnx.helper.get_attribute_value(a))
        return None

    def attr(n, key, default=None):
        for a in n.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    def ints(name: str) -> list[int]:
        v = const(name)
        if v is None or v.dtype.kind not in "iu":
            raise _Unknown
        return [int(x) for x in np.atleast_1d(v)]

    def vec(name: str) -> tuple[Element, ...]:
        if name in memo:
            return memo[name]
        v = const(name)
        if v is not None:
            if v.dtype.kind not in "iu" or v.ndim > 1:
                raise _Unknown
            out = tuple(("const", int(x)) for x in np.atleast_1d(v))
        else:
            n = producer.get(name)
            if n is None:
                raise _Unknown
            op = n.op_type
            if op == "Shape":
                rank = ranks.get(n.input[0])
                if rank is None:
                    raise _Unknown
                dims = tuple(("dim", n.input[0], a) for a in range(rank))
                start, end = attr(n, "start", 0), attr(n, "end", None)
                out = dims[start:end]
            elif op in _PASS_THROUGH or op in ("Squeeze", "Unsqueeze"):
                out = vec(n.input[0])  # scalars and one-element vectors alike
            elif op == "Concat":
                out = tuple(e for i in n.input for e in vec(i))
            elif op == "Gather":
                if attr(n, "axis", 0) != 0:
                    raise _Unknown
                data = vec(n.input[0])
                out = tuple(data[i] for i in ints(n.input[1]))
            elif op == "Slice":
                data = vec(n.input[0])
                starts, ends = ints(n.input[1]), ints(n.input[2])
                axes = ints(n.input[3]) if len(n.input) > 3 and n.input[3] else [0]
                steps = ints(n.input[4]) if len(n.input) > 4 and n.input[4] else [1]
                if axes not in ([0], [-1]) or len(starts) != 1:
                    raise _Unknown
                out = data[slice(starts[0], ends[0], steps[0])]
            else:
                raise _Unknown
        memo[name] = out
        return out

    links = []
    for n in g.node:
        if n.op_type != "Resize" or len(n.input) < 4 or not n.input[3] or const(n.input[3]) is not None:
            continue
        try:
            elems = vec(n.input[3])
        except (_Unknown, IndexError, KeyError):
            continue
        if any(e[0] == "dim" for e in elems[2:]):  # a spatial size follows another tensor
            links.append((n.output[0], elems))
    return tuple(links)


__all__ = ["size_links", "Links", "Element"]
