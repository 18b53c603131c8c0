"""Loading, validating, pinning and canonicalizing ONNX models; atomic saving.

``load_model`` turns whatever a real exporter wrote (external data, dynamic dims,
Constant nodes, unfused BatchNorm) into a :class:`Model`: a checked, canonical,
statically shaped ``onnx.ModelProto``.  Every user mistake raises
:class:`~archpass.errors.ModelLoadError` with one line that names the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto

from archpass.errors import ModelLoadError
from archpass.io import atomic_write_text  # noqa: F401  (re-exported: older callers import it from here)

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"}
TWO_GB = 2**31 - 1
_SHAPE_RE = re.compile(r"^(?P<name>.+):(?P<dims>\d+(,\d+)*)$")


@dataclass(frozen=True)
class Model:
    """A loaded model: canonical, checked, with every input dimension pinned."""

    proto: ModelProto = field(repr=False)
    path: Path | None
    sha256: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    notes: tuple[str, ...] = ()
    #: the source's inputs/outputs with symbolic dims, as declared (see archpass.dynamic)
    symbolic: tuple[tuple[str, tuple[int | str | None, ...]], ...] = ()
    #: Resize/Reshape nodes whose target shape the source computed at run time (from a
    #: Shape) and canonicalization folded to the pinned sizes, and the Reshapes
    #: canonicalization wrote itself (see archpass.dynamic)
    computed_shapes: tuple[str, ...] = ()
    #: other data inputs the source computes from its inputs' shapes (archpass.shapedata),
    #: which canonicalization folds at the pinned sizes
    shape_data: tuple = ()
    #: the Resize nodes whose sizes the source computed from other tensors' dims, element by
    #: element (see archpass.sizelinks): the analysis records them for the resolution pass
    size_links: tuple = ()
    #: the data-dependent post-processing set aside (a detector's box decoding and NMS),
    #: put back by :func:`archpass.tail.attach` on emit; see archpass.tail
    tail: object = None
    #: inputs without a batch axis, given one of size 1 for the analysis; see archpass.batchaxis
    batchless: tuple[str, ...] = ()

    @property
    def inputs(self) -> dict[str, tuple[int, ...]]:
        return dict(self.input_shapes)

    @property
    def source_inputs(self) -> dict[str, tuple[int, ...]]:
        """The pinned input shapes as the source reads them (without the batch axis of one
        that archpass.batchaxis gives an input that has none)."""
        return {k: v[1:] if k in self.batchless else v for k, v in self.input_shapes}


# --------------------------------------------------------------------------- parsing flags
def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``NAME:D0,D1,...`` flags (the onnxsim/onnxslim/polygraphy form)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        m = _SHAPE_RE.match(spec.strip())
        if not m:
            raise ModelLoadError(
                f"malformed --input-shape '{spec}'",
                "write it as NAME:D0,D1,... with positive integers, e.g. --input-shape input:1,3,224,224",
            )
        dims = tuple(int(d) for d in m.group("dims").split(","))
        if any(d <= 0 for d in dims):
            raise ModelLoadError(f"--input-shape '{spec}' has a non-positive dimension", "use positive integers only")
        name = m.group("name")
        if name in shapes:
            raise ModelLoadError(f"--input-shape names input '{name}' twice", "give each input once")
        shapes[name] = dims
    return shapes


# --------------------------------------------------------------------------- reading
def _read_proto(path: Path) -> ModelProto:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file", "pass the path of an .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, RuntimeError from the C++ parser, UnicodeError...
        raise ModelLoadError(
            f"{path} is not an ONNX model or is truncated ({type(exc).__name__})",
            "re-export the model or check that the download finished",
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(
            f"{path} is not an ONNX model (no graph or no nodes)",
            "pass an .onnx file written by an exporter",
        )
    _check_names(proto, path)
    return proto


def _check_names(proto: ModelProto, path: Path) -> None:
    """Refuse names that are not valid UTF-8 (protobuf hands them over as bytes): a
    corrupted file, which would otherwise fail deep inside analysis."""
    g = proto.graph
    names = [n.name for n in g.node] + [n.op_type for n in g.node] + [n.domain for n in g.node]
    names += [x for n in g.node for x in list(n.input) + list(n.output)]
    names += [v.name for v in list(g.input) + list(g.output) + list(g.value_info) + list(g.initializer)]
    bad = next((x for x in names if not isinstance(x, str)), None)
    if bad is not None:
        raise ModelLoadError(f"{path} holds a name that is not valid UTF-8 ({bytes(bad)[:40]!r}): the file is corrupted",
                             "re-export the model or check that the download finished")


def _external_tensors(proto: ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(proto) if uses_external_data(t)]


def _check_external_data(proto: ModelProto, base: Path) -> None:
    """Refuse external data that points outside the model's folder or is missing."""
    base_real = base.resolve()
    for t in _external_tensors(proto):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or not target.is_relative_to(base_real):
            raise ModelLoadError(
                f"external data of tensor '{t.name}' points outside the model's folder ({loc!r})",
                "keep external data files next to the model and reference them by a relative name",
            )
        if not target.is_file():
            raise ModelLoadError(
                f"external data file {loc!r} of tensor '{t.name}' is missing",
                f"put it in {base}",
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_bytes(proto: ModelProto) -> int:
    """Bytes of tensor data the model holds (initializers and Constant nodes), computed
    without serializing: protobuf cannot serialize a message above 2 GB."""
    from onnx.external_data_helper import _get_all_tensors

    total = 0
    for t in _get_all_tensors(proto):
        total += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (
            len(t.int64_data) + len(t.double_data) + len(t.uint64_data)) + sum(len(b) for b in t.string_data)
    return total


def is_large(proto: ModelProto) -> bool:
    """Above the protobuf limit (with a margin for the graph itself)."""
    return weight_bytes(proto) > TWO_GB - (64 << 20)


def weightless(proto: ModelProto) -> ModelProto:
    """A copy whose large tensors keep only dims and type (marked external): enough for
    the checker and shape inference, small enough to serialize."""
    from onnx.external_data_helper import _get_all_tensors

    skel = ModelProto()
    skel.CopyFrom(proto)
    for t in _get_all_tensors(skel):
        if len(t.raw_data) > 1024:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            e = t.external_data.add()
            e.key, e.value = "location", "archpass-skeleton"
    return skel


def infer_shapes(proto: ModelProto, *, in_place: bool = False) -> ModelProto:
    """``proto`` with the shapes strict ONNX inference gives (``value_info`` and outputs
    replaced), inferred on :func:`_weights_as_inputs`'s copy so the weights are neither
    copied nor serialized (nor limited to 2 GB).  A new proto unless ``in_place``.  ONNX's
    errors propagate; loading turns them into a ``ModelLoadError``."""
    out = proto
    if not in_place:
        out = ModelProto()
        out.CopyFrom(proto)
    return _infer_with_weights_as_inputs(
        out, lambda m: onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True))


def _check(proto: ModelProto, path: Path | None) -> None:
    try:
        if is_large(proto):
            if path is not None:
                onnx.checker.check_model(str(path))
            else:
                onnx.checker.check_model(weightless(proto))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model fails the ONNX checker: {first}", "fix or re-export the model") from None


# --------------------------------------------------------------------------- dims
def _graph_inputs(proto: ModelProto):
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def input_dtypes(proto: ModelProto) -> dict[str, np.dtype]:
    """The NumPy dtype of every tensor graph input (float16 for a half-precision export):
    what onnxruntime must be fed, whatever precision calibration data or random inputs are in."""
    from onnx import helper

    return {vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            for vi in _graph_inputs(proto) if vi.type.tensor_type.elem_type}


def _index_bounds(proto: ModelProto) -> dict[str, int]:
    """For each graph input used as Gather indices into a constant table (a token id into an
    embedding): the number of rows it may index, the smallest over its Gathers."""
    consts = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = tuple(n.attribute[0].t.dims)
    names = {vi.name for vi in _graph_inputs(proto)}
    bounds: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in names and n.input[0] in consts:
            dims = consts[n.input[0]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                bounds[n.input[1]] = min(bounds.get(n.input[1], dims[axis]), int(dims[axis]))
    return bounds


def random_inputs(proto: ModelProto, shapes: Sequence[tuple[str, tuple[int, ...]]], n: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` random samples per input (float32 arrays; :func:`typed_feeds` casts them): standard
    normal for a float input; for an integer input, ids drawn uniformly from the rows of the
    embedding table it indexes (a Gather), else 0 or 1 (a mask); for a bool input, 0 or 1.
    Standard-normal values cast to int64 were token ids -2 to 2: every sample nearly alike."""
    dtypes, bounds = input_dtypes(proto), _index_bounds(proto)
    out = {}
    for name, shape in shapes:
        size = (n, *shape[1:])
        dt = dtypes.get(name, np.dtype(np.float32))
        if dt.kind in "iub":
            out[name] = rng.integers(0, bounds.get(name, 2) if dt.kind != "b" else 2, size).astype(np.float32)
        else:
            out[name] = rng.standard_normal(size).astype(np.float32)
    return out


def typed_feeds(proto: ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` cast to the dtypes of ``proto``'s inputs (:func:`input_dtypes`; others as they are)."""
    dtypes = input_dtypes(proto)
    return {k: v.astype(dtypes.get(k, v.dtype), copy=False) for k, v in feeds.items()}


def _dims(vi) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _pin_inputs(proto: ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    inputs = _graph_inputs(proto)
    names = [i.name for i in inputs]
    for name in shapes:
        if name not in names:
            raise ModelLoadError(
                f"--input-shape names unknown input '{name}'",
                f"the model's inputs are: {', '.join(names)}",
            )
    pinned = []
    missing = []
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise ModelLoadError(f"input '{vi.name}' is not a tensor", "archpass handles tensor inputs only")
        dims = _dims(vi)
        if vi.name in shapes:
            want = shapes[vi.name]
            if len(want) != len(dims):
                raise ModelLoadError(
                    f"--input-shape for '{vi.name}' has {len(want)} dims but the input has rank {len(dims)}",
                    f"give {len(dims)} dims, e.g. {vi.name}:{','.join(str(d) if isinstance(d, int) else '1' for d in dims)}",
                )
            for have, w in zip(dims, want):
                if isinstance(have, int) and have != w:
                    raise ModelLoadError(
                        f"--input-shape {vi.name}:{','.join(map(str, want))} contradicts the model's static shape "
                        f"{vi.name}:{','.join(str(d) for d in dims)}",
                        "only dynamic dimensions can be pinned (use the resolution pass to change static ones)",
                    )
            final = tuple(want)
        else:
            if any(not isinstance(d, int) for d in dims):
                missing.append((vi.name, dims))
                continue
            final = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        shape = vi.type.tensor_type.shape
        for d, v in zip(shape.dim, final):
            d.Clear()
            d.dim_value = v
        pinned.append((vi.name, final))
    if missing:
        desc = "; ".join(f"{n} has dims [{', '.join(str(d) if d is not None else '?' for d in dims)}]" for n, dims in missing)
        example = " ".join(
            f"--input-shape {n}:{','.join(str(d) if isinstance(d, int) else ('1' if i == 0 else '224') for i, d in enumerate(dims))}"
            for n, dims in missing
        )
        raise ModelLoadError(f"dynamic input dimensions: {desc}", f"pin them with {example}")
    # Outputs and intermediate value_info may carry stale symbolic dims; inference recomputes them.
    for vi in proto.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
    del proto.graph.value_info[:]
    return tuple(pinned)


# --------------------------------------------------------------------------- canonicalization
def _custom_ops(proto: ModelProto) -> list[onnx.NodeProto]:
    local_funcs = {(f.domain, f.name) for f in proto.functions}
    return [n for n in proto.graph.node if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in local_funcs]


def _custom_op_shapes(proto: ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The declared value_info of every custom-domain op's outputs (shape inference cannot
    see through such an op: it is accepted only when the graph declares what it makes)."""
    custom = _custom_ops(proto)
    if not custom:
        return {}
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    out = {}
    for n in custom:
        for o in n.output:
            if o and o not in known:
                raise ModelLoadError(
                    f"cannot infer shapes through custom-domain op {n.op_type} (domain '{n.domain}') at node "
                    f"'{n.name or n.op_type}': the graph does not declare the shape of its output '{o}'",
                    "declare its output shapes in graph.value_info, or export it with standard ONNX ops",
                )
            if o:
                out[o] = known[o]
    return out


def declared_custom_shapes(proto: ModelProto) -> list[onnx.ValueInfoProto]:
    """The value_info entries of custom-domain ops' outputs: shape inference cannot recompute
    them, so whoever clears value_info to re-infer must put these back first."""
    outs = {o for n in _custom_ops(proto) for o in n.output if o}
    return [v for v in proto.graph.value_info if v.name in outs]


def _declare(proto: ModelProto, declared: dict[str, onnx.ValueInfoProto], symbolic, pinned: dict) -> None:
    """Put the custom ops' declared output shapes back (pinning removed them), with the
    symbolic dims the inputs were pinned to (``N`` -> 1)."""
    value: dict[str, int] = {}
    for name, dims in symbolic:
        for d, v in zip(dims, pinned.get(name, ())):
            if isinstance(d, str):
                value[d] = v
    outputs = {o.name: o for o in proto.graph.output}
    for name, vi in declared.items():
        new = onnx.ValueInfoProto()
        new.CopyFrom(vi)
        for d in new.type.tensor_type.shape.dim:
            if not (d.HasField("dim_value") and d.dim_value > 0):
                if d.dim_param in value:
                    v = value[d.dim_param]
                    d.Clear()
                    d.dim_value = v
                else:
                    raise ModelLoadError(
                        f"the declared shape of '{name}' (output of a custom-domain op) has a dynamic dim "
                        f"'{d.dim_param or '?'}' no input pins",
                        "declare static dims for it, or name the input dim it follows",
                    )
        if name in outputs:
            outputs[name].CopyFrom(new)
        else:
            proto.graph.value_info.append(new)


def _folded_sizes(proto: ModelProto):
    """(node, bytes) of the tensors constant folding would build from constant inputs
    (ConstantOfShape, Expand, Tile, Range): a corrupted or hostile shape constant must not
    make canonicalization allocate more memory than the machine has."""
    import numpy as np
    from onnx import numpy_helper

    consts = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t

    def value(name):
        t = consts.get(name)
        if t is None:
            return None
        if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or len(t.dims) > 1 or (
                t.dims and t.dims[0] > 64):
            return None
        return numpy_helper.to_array(t).reshape(-1).astype(np.float64)  # floats: no overflow

    for n in proto.graph.node:
        elems = None
        if n.op_type == "ConstantOfShape" and n.input:
            v = value(n.input[0])
            elems = None if v is None else float(np.prod(np.maximum(v, 0)))
        elif n.op_type in ("Expand", "Tile") and len(n.input) > 1 and n.input[0] in consts:
            v = value(n.input[1])
            src = float(np.prod(consts[n.input[0]].dims)) if consts[n.input[0]].dims else 1.0
            if v is not None:
                elems = float(np.prod(np.maximum(v, 1))) * (src if n.op_type == "Tile" else 1.0)
        if elems is not None:
            yield n, elems * 8  # up to 8 bytes an element


def _check_folding(proto: ModelProto) -> None:
    from archpass.limits import available_memory

    avail = available_memory()
    if avail is None:
        return
    for n, nbytes in _folded_sizes(proto):
        if nbytes > avail / 2:
            raise ModelLoadError(
                f"{n.op_type} node '{n.name or n.op_type}' would build a constant of about {nbytes / 1e9:,.0f} GB, "
                f"more than this machine can hold",
                "check the model: its shape constants look corrupted",
            )


def _infer(proto: ModelProto) -> ModelProto:
    try:
        return infer_shapes(proto, in_place=True)  # the proto is loading's own copy
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot infer the model's shapes: {first}", "re-export the model with static shapes or valid ops") from None


def _unshaped(proto: ModelProto) -> tuple[str, str] | None:
    """The first node output without a static shape, as (node, tensor)."""
    return next(iter(_unshaped_outputs(proto)), None)


def _cut_tail(pre: ModelProto, whole: ModelProto, canonical: bool):
    """(tail, network): the data-dependent post-processing cut from the source ``pre`` (the
    tail stays as the source wrote it: onnxslim has rewritten a Mask R-CNN's mask-pasting
    Loop into one that pastes a single mask) and the network before it canonicalized; or
    the tail cut from the canonical ``whole`` model when the source's own shape inference
    starts it earlier (fewer layers before it).  (None, whole) when nothing can be cut."""
    from archpass import tail as tails

    unshaped = _unshaped_all(whole)
    canonical_seeds = tails.seeds(whole, unshaped, DATA_DEPENDENT_OPS)
    wanted = tails.layers_before(whole, canonical_seeds)
    types = {vi.name: vi for vi in list(whole.graph.value_info) + list(whole.graph.output)}
    src_types = _source_types(pre, data_prop=True)
    src_unshaped = {o for n in pre.graph.node for o in n.output if o and not _static(src_types.get(o))}
    head = ModelProto()
    head.CopyFrom(pre)
    tail = tails.split(head, tails.seeds(pre, src_unshaped, DATA_DEPENDENT_OPS), {**src_types, **types},
                       {t.name: t for t in whole.graph.initializer})
    if tail is not None:
        net = canonicalize(head) if canonical else _infer(head)
        tail = tails.settle(net, tail)
        have = {o for n in net.graph.node for o in n.output} | {i.name for i in net.graph.input}
        layers = sum(n.op_type in tails.LAYER_OPS for n in net.graph.node)  # the same set layers_before counts
        if all(name in have for name in tail.frontier) and layers >= wanted:
            return tail, net
    tail = tails.split(whole, canonical_seeds, types, {})  # the canonical tail: shapes folded first
    return tail, whole


def _static(vi) -> bool:
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)


def _source_types(proto: ModelProto, data_prop: bool = False) -> dict[str, onnx.ValueInfoProto]:
    """The element types (and shapes, where known) ONNX inference gives ``proto``'s tensors
    before canonicalization (inferred on the weightless copy; not strict)."""
    light, names = _weights_as_inputs(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - the canonical types are the fallback
        return {}
    return {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output) if vi.name not in names}


def _unshaped_all(proto: ModelProto) -> set[str]:
    return {t for _, t in _unshaped_outputs(proto)}


def _unshaped_outputs(proto: ModelProto):
    """Every node output without a static shape, as (node, tensor), in graph order."""
    known = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            known[vi.name] = True
    for init in proto.graph.initializer:
        known[init.name] = True
    for n in proto.graph.node:
        for o in n.output:
            if o and o not in known:
                yield n.name or n.op_type, o


# Ops onnxslim leaves as they are when their inputs are not all constants: a graph made
# only of these, with nothing to fold, is already canonical.
CANONICAL_OPS = {
    "Conv", "Gemm", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Add", "Mul",
    "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Concat",
}


def _trivially_canonical(proto: ModelProto) -> ModelProto | None:
    """The model with Constant nodes turned into initializers and Identity nodes bypassed,
    when nothing else needs canonicalization (no BatchNorm to fold, no constant subgraph,
    only :data:`CANONICAL_OPS`); None when onnxslim has real work to do.  Such graphs are
    common (clean exports, and every model archpass emits), and skipping onnxslim saves
    importing it (a third of a second)."""
    outputs = {o.name for o in proto.graph.output}
    consts = {i.name for i in proto.graph.initializer}
    alias: dict[str, str] = {}
    new_inits = []
    kept = []
    for n in proto.graph.node:
        ins = [alias.get(i, i) for i in n.input]
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            new_inits.append(t)
            consts.add(t.name)
            continue
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = ins[0]
            continue
        if n.op_type not in CANONICAL_OPS or n.domain not in ("", "ai.onnx"):
            return None
        if all(i in consts for i in ins if i):  # a constant subgraph to fold
            return None
        kept.append((n, ins))
    used = {i for _, ins in kept for i in ins}
    if any(i.name not in used for i in list(proto.graph.initializer) + new_inits):
        return None  # dead initializers: let onnxslim remove them
    names = [n.name for n, _ in kept]
    if "" in names or len(set(names)) != len(names):
        return None
    out = ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    for n, ins in kept:
        m = out.graph.node.add()
        m.CopyFrom(n)
        m.input[:] = ins
    out.graph.initializer.extend(new_inits)
    # the same topological order onnxslim's graph (a graphsurgeon fork) gives, so ids
    # (groups are numbered in that order) do not depend on which path a model took
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(out)
    g.toposort()
    by_name = {n.name: n for n in out.graph.node}
    ordered = [by_name[n.name] for n in g.nodes]
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


def _weights_as_inputs(model: ModelProto) -> tuple[ModelProto, set[str]]:
    """A copy of ``model`` whose float weights of more than 64 elements (and any tensor of
    more than 1,024: quantized weights) are typed graph inputs instead of initializers, and
    their names: what shape inference needs (it reads no float weight's values: shape
    tensors are small integer vectors, and small float ones such as Resize scales stay) at
    a fraction of the size to serialize; the weights themselves are never copied."""
    g = model.graph
    declared = {i.name for i in g.input}
    big = [t for t in g.initializer if t.name not in declared
           and np.prod(t.dims) > (64 if t.data_type in _FLOAT_TYPES else 1024)]
    names = {t.name for t in big}
    light = ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, f, getattr(model, f))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    lg.initializer.extend(t for t in g.initializer if t.name not in names)
    lg.sparse_initializer.extend(g.sparse_initializer)
    return light, names


def _infer_with_weights_as_inputs(model: ModelProto, infer) -> ModelProto:
    """``infer(model)``'s shapes, inferred on :func:`_weights_as_inputs`'s copy, put back
    on ``model``.  onnxslim infers shapes after each of its (up to ten) rounds,
    serializing the whole model several times a round: ViT-B/16 (346 MB) spent 33 of its
    44 s there."""
    light, names = _weights_as_inputs(model)
    if not names:
        return infer(model)
    inferred = infer(light)
    # in place: onnxslim replaces the model it passes with the one returned, and
    # infer_shapes copies first unless its caller owns the proto (copying the weights again
    # would cost a third of what this saves)
    g = model.graph
    del g.value_info[:]
    g.value_info.extend(v for v in inferred.graph.value_info if v.name not in names)
    del g.output[:]
    g.output.extend(inferred.graph.output)
    return model


@contextlib.contextmanager
def _weights_as_inputs_for_shape_inference():
    """While onnxslim runs, its shape inference goes through
    :func:`_infer_with_weights_as_inputs` (the same shapes, without serializing the
    weights); left as it is if onnxslim's layout ever changes."""
    from onnxslim import core

    infer = getattr(core, "shape_infer", None)
    if infer is None:
        yield
        return
    core.shape_infer = lambda model: _infer_with_weights_as_inputs(model, infer)
    try:
        yield
    finally:
        core.shape_infer = infer


def canonicalize(proto: ModelProto) -> ModelProto:
    """Constant folding, BatchNorm folding, dead-code removal (onnxslim) and static shape
    inference.  Graphs that only need Constant/Identity clean-up skip onnxslim.  The
    shapes may be written on ``proto`` itself as well."""
    fast = _trivially_canonical(proto)
    if fast is not None:
        slim = fast
    else:
        import onnxslim

        logging.getLogger("onnxslim").setLevel(logging.ERROR)
        try:
            with _weights_as_inputs_for_shape_inference():
                slim = onnxslim.slim(proto)
        except Exception:
            slim = None
    if slim is None or len(slim.graph.node) == 0:
        # onnxslim could not process the graph; keep the model and let inference judge it
        slim = proto
    elif slim is not proto and fast is None and len(proto.graph.value_info):
        # the declared shapes of custom-domain ops' outputs (the only value_info left after
        # pinning): onnxslim re-adds them as rank-less duplicates, which inference would
        # take; put the declared ones back in their place
        declared = {v.name for v in proto.graph.value_info}
        kept = [v for v in slim.graph.value_info if v.name not in declared]
        del slim.graph.value_info[:]
        slim.graph.value_info.extend(kept + list(proto.graph.value_info))
    # onnxslim leaves names empty on nodes it creates; name them deterministically
    seen: set[str] = set()
    for i, n in enumerate(slim.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type.lower()}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            n.name = name
        seen.add(n.name)
    return _infer(slim)


def load_model(
    path: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    *,
    canonical: bool = True,
) -> Model:
    """Read, check, pin and canonicalize an ONNX model.

    ``input_shapes`` maps input names to shapes, or is a list of ``NAME:D0,D1,...``
    strings as given on the command line.
    """
    path = Path(path)
    if input_shapes is None or isinstance(input_shapes, Mapping):
        shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    else:
        shapes = parse_input_shapes(list(input_shapes))
    proto = _read_proto(path)
    if _external_tensors(proto):
        _check_external_data(proto, path.parent)
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(path.parent))
    return model_from_proto(proto, shapes, path=path, sha256=_sha256(path), canonical=canonical)


#: ops whose output shape depends on the values of their inputs, not only their shapes
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress", "TopK", "Loop", "If", "Scan",
                                "RoiAlign", "StringSplit"})


def _computed_resize(proto: ModelProto) -> bool:
    """Whether a Resize in ``proto`` takes ``sizes`` that no initializer or Constant holds."""
    consts = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    return any(n.op_type == "Resize" and len(n.input) > 3 and n.input[3] and n.input[3] not in consts
               for n in proto.graph.node)


def _size_links(canonical: ModelProto, source_graph) -> tuple:
    """:func:`archpass.sizelinks.size_links` of the source graph, with the canonical model's
    tensor ranks; only links whose Resize and tensors the canonical model still has."""
    from archpass.sizelinks import size_links

    g = canonical.graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    ranks.update({i.name: len(i.dims) for i in g.initializer})
    src = ModelProto()
    src.graph.CopyFrom(source_graph)
    return tuple((out, elems) for out, elems in size_links(src, ranks)
                 if out in ranks and all(e[0] == "const" or e[1] in ranks for e in elems))


def model_from_proto(
    proto: ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    path: Path | None = None,
    sha256: str | None = None,
    canonical: bool = True,
) -> Model:
    """Like :func:`load_model` for a proto already in memory (it is copied, never changed)."""
    work = ModelProto()
    work.CopyFrom(proto)
    _check(work, path)
    declared = _custom_op_shapes(work)
    from archpass.dynamic import computed_shapes, symbolic_dims
    from archpass.shapedata import shape_data

    symbolic = symbolic_dims(work)
    computed = computed_shapes(work) if symbolic else ()
    derived = shape_data(work) if symbolic else ()
    pinned = _pin_inputs(work, {k: tuple(v) for k, v in (input_shapes or {}).items()})
    notes: list[str] = []
    if declared:
        _declare(work, declared, symbolic, dict(pinned))
        ops = sorted({f"{n.domain}.{n.op_type}" for n in _custom_ops(work)})
        notes.append(f"custom-domain ops {', '.join(ops)} are opaque: archpass keeps their declared output shapes "
                     "and rewrites nothing through them")
    if sha256 is None:
        sha256 = hashlib.sha256(weightless(proto).SerializeToString() if is_large(proto)
                                else proto.SerializeToString()).hexdigest()
    if canonical and is_large(work):
        # onnxslim serializes the model; above 2 GB it cannot.  The analysis handles
        # Constant nodes and unfused BatchNorm itself, so only folding is lost.
        notes.append("model above 2 GB: canonicalization (constant and BatchNorm folding) skipped")
        canonical = False
    if canonical:
        _check_folding(work)
    source_graph = work.graph if _computed_resize(work) else None  # canonicalize returns a new proto
    pre = None
    if any(n.op_type in DATA_DEPENDENT_OPS for n in work.graph.node):  # the source, should a tail be cut
        pre = ModelProto()
        pre.CopyFrom(work)
    reshaped = {n.output[0] for n in work.graph.node if n.op_type == "Reshape" and n.output} if symbolic else set()
    work = canonicalize(work) if canonical else _infer(work)
    if symbolic:  # Reshapes canonicalization wrote (onnxslim's MatMul -> Gemm over flattened rows, a
        # Flatten as a Reshape) spell the pinned batch as a literal: relinkable like the source's computed ones
        computed += tuple(n.output[0] for n in work.graph.node
                          if n.op_type == "Reshape" and n.output and n.output[0] not in reshaped
                          and n.output[0] not in computed)
    links = _size_links(work, source_graph) if source_graph is not None else ()
    missing = _unshaped(work)
    tail = None
    if missing and pre is not None:
        tail, work = _cut_tail(pre, work, canonical)
        if tail is not None:
            links = ()  # the resolution pass is off with a tail
            notes.append(tail.note())
            missing = _unshaped(work)
    batchless = ()
    if not missing:
        from archpass import batchaxis

        batchless = batchaxis.find(work)
        if batchless:
            batchaxis.wrap(work, batchless)
            pinned = tuple((k, (1, *v) if k in batchless else v) for k, v in pinned)
            notes.append(f"input{'s' if len(batchless) > 1 else ''} {', '.join(repr(n) for n in batchless)} "
                         f"{'have' if len(batchless) > 1 else 'has'} no batch axis (the graph adds it): archpass "
                         "reads one sample per run, calibration data as (N, *input shape), and the emitted model "
                         "keeps the source's input")
    if missing:
        node, tensor = missing
        op = next((n.op_type for n in work.graph.node if n.name == node), "")
        if op in DATA_DEPENDENT_OPS:
            raise ModelLoadError(
                f"cannot infer a static shape for tensor '{tensor}': node '{node}' ({op}) gives a shape that "
                "depends on the data",
                "archpass needs static shapes throughout: export the network without its data-dependent "
                "post-processing (a detector's box decoding and NMS, for instance) and run that part after "
                "the optimized model",
            )
        raise ModelLoadError(
            f"cannot infer a static shape for tensor '{tensor}' (output of node '{node}')",
            "pin every dynamic input with --input-shape or re-export with static shapes",
        )
    return Model(proto=work, path=path, sha256=sha256, input_shapes=pinned, notes=tuple(notes), symbolic=symbolic,
                 computed_shapes=computed, shape_data=derived, size_links=links, tail=tail, batchless=batchless)


def source_form(proto: ModelProto, model: Model) -> ModelProto:
    """A rewritten ``model.proto`` with the source's interface again: inputs without a batch
    axis read as the source read them (archpass.batchaxis), the post-processing loading set
    aside put back (archpass.tail).  Symbolic dims are :func:`archpass.dynamic.restore_dynamic_dims`'s."""
    if model.batchless:
        from archpass.batchaxis import unwrap

        proto = unwrap(proto, model.batchless)
    if model.tail is not None:
        from archpass.tail import attach

        proto = attach(proto, model.tail)
    return proto


# --------------------------------------------------------------------------- saving
def save_model(proto: ModelProto, dest: str | os.PathLike) -> Path | None:
    """Write atomically through :func:`archpass.io.write_atomically` (which refuses
    directories, devices and unwritable folders; the null device validates only).
    Models over 2 GB are saved with external data (``<name>.data`` beside the model)."""
    from archpass.io import write_atomically

    def write(tmp: Path) -> None:
        if is_large(proto):
            copy = ModelProto()
            copy.CopyFrom(proto)  # save_model converts tensors in place: keep the caller's proto intact
            onnx.save_model(copy, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=Path(dest).name + ".data", size_threshold=0)
        else:
            onnx.save_model(proto, str(tmp))

    return write_atomically(dest, write)

