"""Weight-free ONNX skeletons of the test architectures, and their seeded random fill.

A skeleton is an ONNX model whose large float initializers are *stubs*: a TensorProto
with its name, dims and data type but no data, and ``doc_string`` ``"skeleton:<fill>"``
naming how to fill it.  Everything else is kept exactly as exported: the graph, the
attributes, Constant nodes, and every initializer that is small or not floating point
(shape constants, Reshape targets, Slice bounds, Clip bounds...), since those decide
the structure.  ``strip`` makes a skeleton from a full model (``tests/make_skeletons.py``
runs it on torch exports); ``fill`` turns a skeleton back into a full, loadable model.

The fill is what an exported, trained-then-folded network looks like numerically, so the
random models stay sane through 50+ layers (finite, neither vanishing nor exploding
outputs; ``tests/test_zoo.py`` checks it on every model):

* ``he``: weights of Conv/Gemm/MatMul, normal with std sqrt(2 / fan_in) (fan_in from the
  dims and, for Gemm, ``transB``), so a ReLU chain keeps its variance;
* ``shift``: biases, BatchNorm bias and running mean, LayerNorm bias and constants that
  are added, normal with std 0.1;
* ``scale``: BatchNorm and LayerNorm scales, BatchNorm running variance (must be
  positive), constants that multiply or divide, uniform in [0.5, 1.5].

Each stub is filled from its own generator, seeded by ``SEED`` and the tensor's name, so
the values do not depend on initializer order.  A float initializer whose consumers ask
for different fills, or that feeds an op this table does not know, keeps its data.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import numpy_helper

SEED = 0
PREFIX = "skeleton:"
#: Initializers up to this many elements keep their data (scalars, shape constants...).
KEEP_SMALL = 16

# (op, input index) -> fill; "*" matches any input index.
_FILLS = {
    ("Conv", 1): "he",
    ("ConvTranspose", 1): "he",
    ("Gemm", 1): "he",
    ("MatMul", 1): "he",
    ("Conv", 2): "shift",
    ("ConvTranspose", 2): "shift",
    ("Gemm", 2): "shift",
    ("BatchNormalization", 1): "scale",
    ("BatchNormalization", 2): "shift",
    ("BatchNormalization", 3): "shift",
    ("BatchNormalization", 4): "scale",
    ("LayerNormalization", 1): "scale",
    ("LayerNormalization", 2): "shift",
    ("InstanceNormalization", 1): "scale",
    ("InstanceNormalization", 2): "shift",
    ("Add", "*"): "shift",
    ("Sub", "*"): "shift",
    ("Mul", "*"): "scale",
    ("Div", 1): "scale",
}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def _fill_kind(name: str, consumers) -> str | None:
    """The one fill every (non-Identity) consumer of ``name`` asks for, or None."""
    kinds: set[str | None] = set()
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, i in consumers.get(t, []):
            if node.op_type == "Identity":  # torch shares equal initializers through Identity
                todo.extend(node.output)
                continue
            kinds.add(_FILLS.get((node.op_type, i), _FILLS.get((node.op_type, "*"))))
    return kinds.pop() if len(kinds) == 1 else None


def strip(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A skeleton of ``model`` and the number of initializers that became stubs."""
    skel = onnx.ModelProto()
    skel.CopyFrom(model)
    consumers = _consumers(skel.graph)
    stubs = 0
    for t in skel.graph.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        if int(np.prod(t.dims)) <= KEEP_SMALL:
            continue
        kind = _fill_kind(t.name, consumers)
        if kind is None:
            continue
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=PREFIX + kind)
        t.CopyFrom(stub)
        stubs += 1
    return skel, stubs


def _gemm_trans_b(graph: onnx.GraphProto, name: str) -> bool:
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == name:
            return any(a.name == "transB" and a.i for a in node.attribute)
    return False


def _values(graph: onnx.GraphProto, t: onnx.TensorProto, kind: str) -> np.ndarray:
    dims = tuple(t.dims)
    rng = np.random.default_rng([SEED, zlib.crc32(t.name.encode())])
    if kind == "he":
        if len(dims) >= 3:  # conv weight: (cout, cin/groups, k...)
            fan_in = int(np.prod(dims[1:]))
        elif len(dims) == 2:  # Gemm B is (N, K) with transB, else (K, N); MatMul B is (K, N)
            fan_in = dims[1] if _gemm_trans_b(graph, t.name) else dims[0]
        else:
            fan_in = dims[-1] if dims else 1
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), dims)
    if kind == "shift":
        return rng.normal(0.0, 0.1, dims)
    if kind == "scale":
        return rng.uniform(0.5, 1.5, dims)
    raise ValueError(f"unknown skeleton fill {kind!r} for {t.name}")


def is_skeleton(model: onnx.ModelProto) -> bool:
    return any(t.doc_string.startswith(PREFIX) for t in model.graph.initializer)


def fill(skel: onnx.ModelProto) -> onnx.ModelProto:
    """The full model: every stub replaced by seeded random data of its dims and type."""
    model = onnx.ModelProto()
    model.CopyFrom(skel)
    for t in model.graph.initializer:
        if not t.doc_string.startswith(PREFIX):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        values = _values(model.graph, t, t.doc_string[len(PREFIX):]).astype(dtype)
        t.CopyFrom(numpy_helper.from_array(values, t.name))
    return model
