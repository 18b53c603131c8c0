"""Give an emitted model back the symbolic dims its source had.

Loading pins every dynamic input dim (``--input-shape``), because analysis and the passes
need static shapes.  The output should not lose what the user did not ask to change: a
dynamic batch stays dynamic.  :func:`restore_dynamic_dims` sets the source's symbolic
names (``"N"``, ``"batch"``...) back on the emitted model's inputs and outputs wherever
the recipe left the pinned value unchanged, drops the now stale intermediate shapes, links
the Resize sizes and Reshape shapes that the source computed from its batch (and
canonicalization folded to the pinned one) to the batch again, puts back the source's
computation of other data it derived from its input shapes (:mod:`archpass.shapedata`:
the Gather indices of torch's dynamo ``as_strided``), and keeps the result only
when it demonstrably works: it passes the ONNX checker, runs in
onnxruntime at the pinned sizes and at twice them, and (for a symbolic dim 0, a batch)
the first item of a batch of two equals the output for that item alone.  When that fails
with spatial dims restored too (a detector's anchors or a flattened token count, computed
from the input's height and width in the source, are folded for good by canonicalization),
the batch alone is tried the same way.  Otherwise the model keeps static dims; the
returned notes say which dims stayed static and why.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto

#: Symbolic dims, per input/output name, as the source model declared them (ints are static).
Dims = tuple[tuple[str, tuple[int | str | None, ...]], ...]


def symbolic_dims(proto: ModelProto) -> Dims:
    """The graph inputs (initializers excluded) and outputs that have a symbolic or unknown dim."""
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for vi in [v for v in proto.graph.input if v.name not in inits] + list(proto.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim)
        if any(not isinstance(d, int) for d in dims):
            out.append((vi.name, dims))
    return tuple(out)


#: op -> the input that holds the target shape (Resize: ``sizes``; Reshape: ``shape``)
SHAPE_INPUTS = {"Resize": 3, "Reshape": 1}


def computed_shapes(proto: ModelProto) -> tuple[str, ...]:
    """The output names of the Resize and Reshape nodes whose target shape ``proto``
    computes at run time (from a Shape: exporters write a dynamic batch that way).
    Canonicalization folds those to the pinned sizes, which would tie the optimized
    model to the pinned batch; :func:`restore_dynamic_dims` links them to it again."""
    constants = {i.name for i in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return tuple(n.output[0] for n in proto.graph.node
                 if n.op_type in SHAPE_INPUTS and n.domain in ("", "ai.onnx") and n.output
                 and len(n.input) > SHAPE_INPUTS[n.op_type] and n.input[SHAPE_INPUTS[n.op_type]]
                 and n.input[SHAPE_INPUTS[n.op_type]] not in constants)


def fresh_namer(proto: ModelProto):
    """A function that gives ``base``, or ``base_1``, ``base_2``..., whichever no tensor,
    initializer or node of ``proto`` (nor an earlier call) uses yet."""
    taken = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output} | {
        n.name for n in proto.graph.node}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    return fresh


def constant_reader(proto: ModelProto):
    """A function giving the value of an initializer or Constant node output of ``proto``
    by name (None for anything else: a computed tensor, a Constant without a tensor value)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant" and n.output}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = consts.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    return value


def _relink_batch(proto: ModelProto, computed: tuple[str, ...], batch: int, batch_input: str,
                  shapes: dict[str, tuple[int, ...]]) -> int:
    """In ``proto`` (changed in place), give the ``computed`` Resize/Reshape nodes their
    run-time batch again.  Those whose folded target shape starts with ``batch``: Resize
    ``sizes`` becomes Concat(Shape(X)[0:1], the rest), Reshape's leading dim 0 (copy the
    input's) where the input's dim 0 (``shapes``: at the pinned size) is the batch, else
    Concat(Shape(``batch_input``)[0:1], the rest) (a Reshape after onnxslim's Gemm over
    (batch x tokens, C) reads a flattened dim 0); a Reshape whose dim 0 is not the batch
    but holds it (N x C x patches) gets -1 there and its other dims as the pinned output has
    them.  Returns how many nodes were relinked;
    whether that is right is what :func:`_runs_at_other_sizes` then checks."""
    from onnx import helper, numpy_helper

    wanted = set(computed)
    fresh = fresh_namer(proto)
    value = constant_reader(proto)

    nodes, relinked, replaced = [], 0, set()
    for n in proto.graph.node:
        k = SHAPE_INPUTS.get(n.op_type)
        target = value(n.input[k]) if k is not None and n.output and n.output[0] in wanted and len(n.input) > k else None
        if target is None or target.ndim != 1 or len(target) < 1:
            nodes.append(n)
            continue
        target_name = n.input[k]
        if n.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in n.attribute):
            nodes.append(n)
            continue
        if int(target[0]) != batch:
            static = shapes.get(n.output[0])
            if n.op_type != "Reshape" or not static or len(static) != len(target) or min(static) < 1:
                nodes.append(n)
                continue
            # a batch folded into dim 0 (MobileViT's unfold to (N x C x patches, ...)): -1 there
            # keeps it, the other dims as the pinned model has them
            shape = np.array([-1, *static[1:]], dtype=np.int64)
            name = fresh(f"{n.output[0]}_shape")
            proto.graph.initializer.append(numpy_helper.from_array(shape, name))
            n.input[k] = name
        elif n.op_type == "Reshape" and shapes.get(n.input[0], (None,))[:1] == (batch,):
            shape = target.astype(np.int64).copy()
            shape[0] = 0  # copy the input's dim 0
            name = fresh(f"{n.output[0]}_shape")
            proto.graph.initializer.append(numpy_helper.from_array(shape, name))
            n.input[k] = name
        else:  # sizes/shape = Concat(Shape(X)[0:1], the folded rest); X: the input, or the model's
            of = n.input[0] if n.op_type == "Resize" else batch_input
            dims, idx, tail, sizes = (fresh(f"{n.output[0]}_{s}") for s in ("in_shape", "batch_index", "tail", "sizes"))
            proto.graph.initializer.extend([numpy_helper.from_array(np.array([0], dtype=np.int64), idx),
                                            numpy_helper.from_array(target[1:].astype(np.int64), tail)])
            batch_of = fresh(f"{n.output[0]}_batch")
            nodes += [helper.make_node("Shape", [of], [dims], name=fresh(f"{n.name}_shape")),
                      helper.make_node("Gather", [dims, idx], [batch_of], name=fresh(f"{n.name}_batch"), axis=0),
                      helper.make_node("Concat", [batch_of, tail], [sizes], name=fresh(f"{n.name}_sizes"), axis=0)]
            n.input[k] = sizes
        replaced.add(target_name)
        nodes.append(n)
        relinked += 1
    used = {i for n in nodes for i in n.input} | {o.name for o in proto.graph.output}
    unused = replaced - used  # the folded shapes no node reads any more
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output and n.output[0] in unused)]
    kept = [i for i in proto.graph.initializer if i.name not in unused]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return relinked


def _static_shapes(proto: ModelProto, computed: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The static shape of every tensor of the static ``proto`` (inferred when its value_info
    does not have the inputs and outputs of the ``computed`` nodes)."""
    def table(m: ModelProto) -> dict[str, tuple[int, ...]]:
        out = {}
        for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                out[vi.name] = tuple(d.dim_value for d in dims)
        return out

    have = table(proto)
    wanted = set(computed)
    if all(n.input[0] in have and n.output[0] in have
           for n in proto.graph.node if n.output and n.output[0] in wanted and n.input):
        return have
    try:
        return table(onnx.shape_inference.infer_shapes(proto))
    except Exception:  # noqa: BLE001 - without shapes every Reshape takes the model's batch
        return have


def _restorable(proto: ModelProto, source: Dims, pinned: dict[str, tuple[int, ...]]) -> dict[str, dict[int, str]]:
    """name -> {axis: symbol} for the dims to make symbolic again: symbolic in the source and
    unchanged by the recipe (an input still at its pinned value; an output dim whose symbol
    is one of the restored input symbols)."""
    src = dict(source)
    restore: dict[str, dict[int, str]] = {}
    symbols: set[str] = set()
    for vi in proto.graph.input:
        if vi.name not in src or vi.name not in pinned:
            continue
        now = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        was = src[vi.name]
        if len(now) != len(was):
            continue
        axes = {i: (w if isinstance(w, str) else f"{vi.name}_dim{i}") for i, w in enumerate(was)
                if not isinstance(w, int) and now[i] == pinned[vi.name][i]}
        if axes:
            restore[vi.name] = axes
            symbols.update(axes.values())
    for vi in proto.graph.output:
        was = src.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if was is None or len(was) != len(dims):
            continue
        axes = {i: w for i, w in enumerate(was) if isinstance(w, str) and w in symbols}
        if axes:
            restore[vi.name] = axes
    return restore


def random_feeds(proto: ModelProto, seed: int = 0, scale: dict[str, dict[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input at its declared (static, else 1) shape, with
    ``scale[name][axis]`` multiplying a dim; floats are normal, other types zeros."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value or 1 for d in tt.shape.dim]
        for axis, factor in (scale or {}).get(vi.name, {}).items():
            shape[axis] *= factor
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else (
            np.zeros(shape, dtype=dtype))
    return feeds


def restore_dynamic_dims(proto: ModelProto, source: Dims, pinned: dict[str, tuple[int, ...]],
                         computed: tuple[str, ...] = (), data: tuple = ()) -> tuple[ModelProto, list[str]]:
    """``proto`` with the source's symbolic dims restored where that is safe (see the
    module), and notes for the user.  ``computed`` (``Model.computed_shapes``): the
    Resize/Reshape nodes whose target shape the source computed at run time; when only a
    batch is restored, those folded to the pinned batch follow the input's batch again.
    ``data`` (``Model.shape_data``): other inputs the source computed from its input
    shapes, computed that way again (archpass.shapedata).  ``proto`` itself is never modified."""
    from archpass.model import is_large

    restore = _restorable(proto, source, pinned)
    if not restore:
        return proto, []
    inputs = {i.name for i in proto.graph.input}

    def label(r: dict[str, dict[int, str]]) -> str:
        return ", ".join(f"{n}[{','.join(str(a) for a in sorted(ax))}]" for n, ax in r.items() if n in inputs)

    names = label(restore)
    if is_large(proto):
        return proto, [f"kept the pinned dims {names} static: models above 2 GB are not re-checked at other sizes"]
    custom = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        return proto, [f"kept the pinned dims {names} static: onnxruntime cannot run the custom-domain ops "
                       f"{', '.join(custom)} here to check other sizes"]
    out, why = _restore(proto, restore, pinned, computed, data)
    if out is not None:
        return out, [f"kept the source's dynamic dims {names} dynamic (checked in onnxruntime at two sizes)"]
    static = [f"kept the pinned dims {names} static: the rewritten model does not run with them dynamic ({why})"]
    # spatial dims the source computed sizes from (anchors, flattened token counts) are folded
    # for good by canonicalization; the batch alone may still be restorable
    batch = _batch_only(restore)
    if batch and batch != restore:
        out, _ = _restore(proto, batch, pinned, computed, data)
        if out is not None:
            rest = {n: {a: s for a, s in ax.items() if a not in batch.get(n, {})} for n, ax in restore.items()}
            return out, [f"kept the source's dynamic dims {label(batch)} dynamic (checked in onnxruntime at two sizes)",
                         f"kept the pinned dims {label({n: ax for n, ax in rest.items() if ax})} static: the rewritten "
                         f"model does not run with them dynamic ({why})"]
    return proto, static


def _batch_only(restore: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    """The part of ``restore`` that is a batch: dim 0 of the inputs, and the output dims
    named by those inputs' dim-0 symbols."""
    symbols: set[str] = set()
    out: dict[str, dict[int, str]] = {}
    for name, axes in restore.items():
        if 0 in axes and not any(axes[0] == s for ax in restore.values() for a, s in ax.items() if a != 0):
            symbols.add(axes[0])
    for name, axes in restore.items():
        kept = {a: s for a, s in axes.items() if s in symbols}
        if kept:
            out[name] = kept
    return out


def _restore(proto: ModelProto, restore: dict[str, dict[int, str]], pinned: dict[str, tuple[int, ...]],
             computed: tuple[str, ...], data: tuple = ()) -> tuple[ModelProto | None, str]:
    """``proto`` with the ``restore`` dims symbolic, checked (see the module); (None, why not)
    when it fails."""
    from archpass.shapedata import relink as relink_data

    batches = {pinned[n][0] for n, ax in restore.items() if n in pinned}
    batch_only = all(set(ax) == {0} for ax in restore.values()) and len(batches) == 1
    relink = (bool(computed) and batch_only) or bool(data)
    # with the computed shapes linked to the batch first; should that fail (a Reshape whose
    # leading 1 was not the batch, say), as the folded model has them (the reason given: this one's)
    why = ""
    for linked in ((True, False) if relink else (False,)):
        out = ModelProto()
        out.CopyFrom(proto)
        for vi in list(out.graph.input) + list(out.graph.output):
            for axis, sym in restore.get(vi.name, {}).items():
                d = vi.type.tensor_type.shape.dim[axis]
                d.Clear()
                d.dim_param = sym
        del out.graph.value_info[:]  # intermediate shapes were inferred at the pinned size
        if linked:
            relinked = 0
            if computed and batch_only:
                relinked += _relink_batch(out, computed, next(iter(batches)), next(n for n in restore if n in pinned),
                                          _static_shapes(proto, computed))
            relinked += relink_data(out, data, proto)
            if not relinked:  # the same model as the plain attempt that follows: checked once
                continue
        try:
            out = onnx.shape_inference.infer_shapes(out, check_type=True)
            onnx.checker.check_model(out, full_check=True)
            why = _runs_at_other_sizes(proto, out, restore)
        except Exception as exc:  # noqa: BLE001 - any failure means: keep the static model
            why = _failure(exc)
        if not why:
            return out, ""
    return None, why


def _failure(exc: Exception) -> str:
    """One line on why a restored model failed: the node onnxruntime stopped at, when it says."""
    import re

    text = str(exc).strip()
    m = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    if m:
        return f"onnxruntime fails in {m.group(1)} '{m.group(2)}' with the dims dynamic"
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:160]}"


def _runs_at_other_sizes(static: ModelProto, dynamic: ModelProto, restore: dict[str, dict[int, str]]) -> str | None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # a failure here is an answer (the dims stay static), not an error to print
    sess = ort.InferenceSession(dynamic.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    base = random_feeds(static, 0)
    ref = sess.run(None, base)
    static_ref = ort.InferenceSession(static.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, base)
    def close(a, b, rtol: float, atol: float) -> bool:
        # atol relative to the output's range: kernels chosen by batch size round differently
        # (1e-6 of the range), mixing items is of the order of the values
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        return bool(np.allclose(a, b, rtol=rtol, atol=atol * scale))

    for a, b in zip(ref, static_ref):
        if a.shape != b.shape or not close(a, b, 1e-5, 1e-6):
            return "it computes something else at the pinned size"
    inputs = {vi.name for vi in static.graph.input}
    big = random_feeds(static, 1, {n: {a: 2 for a in ax} for n, ax in restore.items() if n in inputs})
    batch_only = all(set(ax) == {0} for ax in restore.values())
    if batch_only:  # the first items of the doubled batch are the pinned-size input
        for n in base:
            if n in restore:
                big[n][: base[n].shape[0]] = base[n]
    outs = sess.run(None, big)
    for vi, o, r in zip(dynamic.graph.output, outs, ref):
        for axis in restore.get(vi.name, {}):
            if o.shape[axis] == r.shape[axis]:
                return f"output '{vi.name}' keeps dim {axis} at {r.shape[axis]} when the input grows"
        if batch_only and 0 in restore.get(vi.name, {}) and not close(o[: r.shape[0]], r, 1e-4, 1e-5):
            return f"output '{vi.name}' mixes the items of a batch"
    return None
