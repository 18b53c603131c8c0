"""Weight recovery: refit the layers a lossy recipe touched, from calibration activations.

The rewrites start from naive weights (a composed kernel for ``fuse_ibn``, the kept
slices for ``channels``/``width_multiplier``).  Recovery reconstructs layer outputs by
ridge-regularized least squares, as structured-pruning tools with layer-output
reconstruction do:

* ``fuse_ibn`` on a block: the fused KxK conv is refitted to reproduce the original
  depthwise conv's output (the block's pre-projection activations, before the SE if any),
  then the projection conv to reproduce the original block output;
* ``channels``/``width_multiplier`` shrinking groups: every dense consumer (Conv with
  group 1, Gemm, MatMul) of a shrunk group is refitted to reproduce its original output,
  restricted to the channels it still has.

Layers are refitted in execution order, each on the inputs the partially recovered model
produces (so errors do not compound), against targets from the reference model (the
original, at the candidate's resolution when the recipe changes it).  Details that
measurably help (``benchmarks/fidelity.py``):

* a layer whose output goes straight into a residual Add is fitted to the original *sum*
  minus the candidate's other operand, so it also absorbs the error on the shortcut;
* a layer followed by ReLU/ReLU6 is fitted with the activation in mind: targets the
  activation clips anyway only need the prediction on the clipped side (two re-solves
  with the same normal equations);
* the ridge term pulls towards the naive weights (``|w - w_naive|^2``), not towards zero:
  a wide consumer fitted on few samples (a classifier after a width cut) stays close to
  its sliced weights instead of overfitting; its strength is chosen per layer on a
  held-out fifth of the calibration samples (whole samples: rows of one image are
  correlated), among seven values relative to the mean diagonal of the
  normal matrix; the naive weights are kept when they do better on those rows;
* output positions are subsampled (:func:`row_budget`: up to 32768 rows for narrow
  layers, fewer for wide ones), and the normal equations are solved in float64; layers
  with more than ``MAX_DIM`` inputs per output keep their naive weights (reported);
* the dense layers reading a fused block's output are refitted too, to their original
  outputs: they absorb part of what the fused conv cannot reproduce (a linear KxK conv
  cannot represent the activation between the expand and the depthwise conv).

Recovery runs onnxruntime (:mod:`archpass.search.runner`), which is why it lives with
the measuring code rather than in ``passes/`` (pure graph rewrites, no runtime).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from archpass.passes.engine import Applied
from archpass.search.runner import Stepper
from archpass.structure import Layer, Structure

MAX_ROWS = 32768
GRAM_FLOPS = 4e9  # rows * dim^2 budget per layer (the normal equations dominate the cost)
MAX_DIM = 1600  # wider layers (e.g. ResNet's 3x3 convs over 256+ channels) keep their naive weights
ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
_CENSOR = {"relu": (0.0, None), "relu6": (0.0, 6.0)}


@dataclass(frozen=True)
class Refit:
    layer: str  # layer id in the rewritten model
    reason: str  # "pass:site" of the rewrite that made it necessary


@dataclass(frozen=True)
class LayerFit:
    """What recovery did to one layer: relative squared error of its (activated) output
    against the target on held-out rows, with the naive and the refitted weights."""

    layer: str
    reason: str
    rows: int
    alpha: float | None
    err_naive: float
    err_fit: float
    kept: str  # "refit", "naive" (the refit did not help) or why the layer was skipped

    def to_json(self) -> dict:
        return {"layer": self.layer, "reason": self.reason, "rows": self.rows, "alpha": self.alpha,
                "err_naive": self.err_naive, "err_fit": self.err_fit, "kept": self.kept}


@dataclass(frozen=True)
class Recovered:
    proto: onnx.ModelProto
    fits: tuple[LayerFit, ...] = field(default_factory=tuple)
    #: the recovered model's outputs on the calibration inputs (computed from where the
    #: last refit left off, so scoring it needs no other full run); None when nothing ran
    outputs: tuple[np.ndarray, ...] | None = None


# ---------------------------------------------------------------------------- what to refit
def _groups_changed(entry: Mapping) -> dict[str, tuple[int, int]]:
    """{group: (old, new)} from a channels/width_multiplier record entry."""
    b, a = entry.get("before") or {}, entry.get("after") or {}
    if "group" in b and "channels" in b:
        return {b["group"]: (int(b["channels"]), int(a.get("channels", b["channels"])))}
    if isinstance(b.get("channels"), Mapping):
        return {g: (int(n), int(a["channels"].get(g, n))) for g, n in b["channels"].items()}
    return {}


def _dense(l: Layer) -> bool:
    return (l.op == "Conv" and l.groups == 1) or l.op in ("Gemm", "MatMul")


DOWNSTREAM = True


def _block_consumers(s: Structure, b) -> list[str]:
    """Dense layers reading a block's output (after its residual Add, if any)."""
    pid = b.role("project")
    if not pid or not s.has_layer(pid):
        return []
    out_t = s.layer(pid).act_output or s.layer(pid).output
    if b.residual:
        cons = s.consumers_of(out_t)
        if len(cons) == 1 and cons[0].op == "Add":
            out_t = cons[0].outputs[0]
    layers = [n.layer for n in s.consumers_of(out_t) if n.layer]
    return [lid for lid in layers if s.has_layer(lid) and _dense(s.layer(lid))]


def refits(applied: Applied) -> list[Refit]:
    """The layers of ``applied`` to refit, in execution order (see the module doc)."""
    final = applied.plan.structure
    out: dict[str, str] = {}
    for st, entry in zip(applied.plan.steps, applied.rewrites):
        if entry.get("exact"):
            continue
        label = f"{st.rewrite.pass_name}:{st.rewrite.site or '*'}"
        if st.rewrite.pass_name == "fuse_ibn":
            b = st.before.block(st.rewrite.site)
            for lid in (b.role("depthwise"), b.role("project")):
                if lid and final.has_layer(lid) and _dense(final.layer(lid)):
                    out.setdefault(lid, label)
            if DOWNSTREAM:
                for lid in _block_consumers(final, b):
                    out.setdefault(lid, label + " (next layer)")
            continue
        for gid, (old, new) in _groups_changed(entry).items():
            if new == old or not final.has_group(gid):
                continue
            for m in final.group(gid).members:
                if m.role == "consumer" and final.has_layer(m.node) and _dense(final.layer(m.node)):
                    out.setdefault(m.node, label)
    order = {n.name: i for i, n in enumerate(final.nodes)}
    return [Refit(lid, why) for lid, why in sorted(out.items(), key=lambda kv: order.get(kv[0], 0))]


# ---------------------------------------------------------------------------- channel maps
def channel_index(t: str, final: Structure, source: Structure, maps: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """For each channel of tensor ``t`` in the rewritten model, its channel in the source
    model (-1 = a padded channel); None when the two cannot be lined up."""
    a, b = final.tensors.get(t), source.tensors.get(t)
    if a is None or b is None or a.channel_axis is None or b.channel_axis is None:
        return None
    if not a.segments or len(a.segments) != len(b.segments):
        return np.arange(a.shape[a.channel_axis]) if a.shape == b.shape else None
    parts, off = [], 0
    for sa, sb in zip(a.segments, b.segments):
        n_old = source.group(sb).channels
        m = maps.get(sa)
        if m is None:
            if final.group(sa).channels != n_old:
                return None
            parts.append(np.arange(n_old) + off)
        else:
            parts.append(np.where(m >= 0, m + off, -1))
        off += n_old
    return np.concatenate(parts).astype(np.int64)


# ---------------------------------------------------------------------------- least squares
def ridge_fit(a: np.ndarray, y: np.ndarray, *, intercept: bool = True, activation: str | None = None,
              naive: tuple[np.ndarray, np.ndarray | None] | None = None, seed: int = 0,
              alphas=ALPHAS, samples: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Weights ``w`` (d, k) and bias (k,) minimizing ``|act(a w + b) - act(y)|^2 + lam |w - w0|^2``
    (``w0`` the naive weights when given, else 0).

    ``y`` holds pre-activation targets; with ``activation`` relu/relu6 the clipped targets
    only need the prediction on the clipped side (re-solved twice).  ``lam`` is picked on
    a held-out fifth of the rows (of the ``samples`` the rows come from, when given).  ``naive`` (w, b) are returned instead when they do
    better on those rows (``info["kept"] == "naive"``)."""
    import scipy.linalg as sla

    r, d = a.shape
    a = a.astype(np.float32, copy=False)
    if intercept:
        a = np.concatenate([a, np.ones((r, 1), np.float32)], axis=1)
    lo, hi = _CENSOR.get(activation or "", (None, None))

    def act(v):
        if lo is not None:
            v = np.maximum(v, lo)
        if hi is not None:
            v = np.minimum(v, hi)
        return v

    def effective(z, p):
        if lo is None:
            return z
        t = np.where(z <= lo, np.minimum(p, lo), z)
        return t if hi is None else np.where(z >= hi, np.maximum(p, hi), t)

    rng = np.random.default_rng(seed)
    if samples is not None and len(np.unique(samples)) >= 5:
        # hold out whole samples: rows of one image are correlated, so a row-level split
        # would judge the ridge strength on what it was fitted to
        ids = np.unique(samples)
        hold = np.isin(samples, ids[rng.random(len(ids)) < 0.2])
        if hold.all():
            hold[:] = False
    else:
        hold = rng.random(r) < 0.2 if r >= 50 else np.zeros(r, bool)
    fit = ~hold if hold.any() else np.ones(r, bool)
    a_tr, y_tr = a[fit], y[fit].astype(np.float32, copy=False)
    g_tr = (a_tr.T @ a_tr).astype(np.float64)
    reg = np.ones(a.shape[1])
    if intercept:
        reg[-1] = 0.0
    scale = float(np.mean(np.diag(g_tr)[:d])) or 1.0
    prior = None  # ridge pulls towards the naive weights (a good start: slices, compositions)
    if naive is not None:
        w0, b0 = naive
        prior = np.asarray(w0, np.float64)
        if intercept:
            prior = np.concatenate([prior, np.zeros((1, prior.shape[1]))], axis=0)

    def solve(g, rhs, lam, exact_only=False):
        m = g + lam * scale * np.diag(reg)
        if prior is not None:
            rhs = rhs + lam * scale * reg[:, None] * prior
        try:
            return sla.cho_solve(sla.cho_factor(m, check_finite=False), rhs, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            # the float32 Gram matrix is not positive definite to the precision this ridge
            # needs (the weakest one on a wide layer); a least-squares solve of it costs an
            # SVD, 1 s at 1536 inputs, for weights that fit float32 rounding
            if exact_only:
                return None
            return np.linalg.lstsq(m, rhs, rcond=None)[0]

    def fitted(g, a_, z, lam, censor=True, rhs=None, exact_only=False):
        w = solve(g, rhs if rhs is not None else (a_.T @ z).astype(np.float64), lam, exact_only)
        for _ in range(2 if lo is not None and censor and w is not None else 0):
            w = solve(g, (a_.T @ effective(z, a_ @ w.astype(np.float32)).astype(np.float32)).astype(np.float64), lam)
        return w

    a_te, y_te = (a[hold], y[hold]) if hold.any() else (a_tr, y_tr)
    target_te = act(y_te.astype(np.float64))
    denom = float(np.sum((target_te - target_te.mean(axis=0)) ** 2)) or 1.0

    def err(w):
        return float(np.sum((act(a_te @ w.astype(np.float32)).astype(np.float64) - target_te) ** 2)) / denom

    rhs_tr = (a_tr.T @ y_tr).astype(np.float64)  # the same for every ridge strength
    best = None
    for i, lam in enumerate(alphas):
        # a ridge too weak to factor is skipped (its solution would fit float32 rounding), unless it is the last
        w = fitted(g_tr, a_tr, y_tr, lam, censor=False, rhs=rhs_tr, exact_only=best is not None or i < len(alphas) - 1)
        if w is None:
            continue
        e = err(w)
        if best is None or e < best[0]:
            best = (e, lam)
    lam = best[1]
    a_all, y_all = a, y.astype(np.float32, copy=False)
    g = g_tr + (a_te.T @ a_te).astype(np.float64) if hold.any() else g_tr
    censor = False
    if lo is not None:  # the activation-aware fit, kept when it does better on the held-out rows
        e_c = err(fitted(g_tr, a_tr, y_tr, lam, rhs=rhs_tr))
        if e_c < best[0]:
            best, censor = (e_c, lam), True
    rhs_all = rhs_tr + (a_te.T @ y_te.astype(np.float32)).astype(np.float64) if hold.any() else rhs_tr
    w = fitted(g, a_all, y_all, lam, censor=censor, rhs=rhs_all)
    e_fit = best[0]
    info = {"alpha": lam, "err_fit": e_fit, "rows": r, "kept": "refit", "err_naive": float("nan"), "censored": censor}
    if naive is not None:
        w0, b0 = naive
        wn = np.concatenate([w0, (b0 if b0 is not None else np.zeros(w0.shape[1]))[None]], axis=0) if intercept else w0
        e0 = err(wn.astype(np.float64))
        info["err_naive"] = e0
        if e0 <= e_fit:
            info["kept"] = "naive"
            return w0, b0, info
    w = w.astype(np.float32)
    return (w[:-1], w[-1], info) if intercept else (w, None, info)


def row_budget(dim: int, max_rows: int = MAX_ROWS) -> int:
    """Output positions to sample for a layer with ``dim`` inputs per position: all up to
    ``max_rows`` for small layers, fewer for wide ones (``GRAM_FLOPS``), never below 4 * dim."""
    return int(max(4 * dim, min(max_rows, GRAM_FLOPS // max(dim, 1) ** 2)))


def _rows(total: int, rows: int, key: str, seed: int) -> np.ndarray:
    """``rows`` of ``total`` rows, seeded by the layer, in order (all when they fit)."""
    if rows >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(total, size=rows, replace=False))


def _positions(n: int, h: int, w: int, rows: int, key: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = _rows(n * h * w, rows, key, seed)
    return flat // (h * w), (flat // w) % h, flat % w


def _image(t: np.ndarray) -> np.ndarray:
    """A conv's activation as (N, C, H, W): a 1-D conv's (N, C, L) is one of height 1 (its
    layer's kernel, stride and pads are (1, k), (1, s) and (0, p, 0, q))."""
    return t[:, :, None, :] if t.ndim == 3 else t


def _patches(x: np.ndarray, l: Layer, ni, hi, wi) -> np.ndarray:
    """im2col rows of conv ``l``'s input ``x`` (N, C, H, W) at output positions (ni, hi, wi):
    (rows, C*kh*kw) in the weight's [cin, kh, kw] order."""
    pt, pl, pb, pr = l.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(l.pads) else x
    (kh, kw), (sh, sw), (dh, dw) = l.kernel, l.stride, l.dilation
    cols = np.empty((len(ni), x.shape[1], kh, kw), np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[ni, :, hi * sh + i * dh, wi * sw + j * dw]
    return cols.reshape(len(ni), -1)


# ---------------------------------------------------------------------------- the model edits
class _Weights:
    """Read and replace a layer's weight and bias initializers in a proto (in place)."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.inits = {t.name: i for i, t in enumerate(proto.graph.initializer)}
        self.uses: dict[str, int] = {}
        for n in proto.graph.node:
            for t in n.input:
                self.uses[t] = self.uses.get(t, 0) + 1
        self.nodes = {n.name: n for n in proto.graph.node}

    def get(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        if i >= len(node.input) or node.input[i] not in self.inits:
            return None
        return numpy_helper.to_array(self.proto.graph.initializer[self.inits[node.input[i]]])

    def set(self, node: onnx.NodeProto, i: int, value: np.ndarray, dtype) -> None:
        value = np.ascontiguousarray(value.astype(dtype))
        if i < len(node.input) and node.input[i] in self.inits and self.uses.get(node.input[i], 0) == 1:
            name = node.input[i]
            self.proto.graph.initializer[self.inits[name]].CopyFrom(numpy_helper.from_array(value, name))
            return
        base = f"{node.name}.recovered_{'weight' if i == 1 else 'bias'}"
        name, k = base, 1
        while name in self.inits or name in self.uses:
            name, k = f"{base}_{k}", k + 1
        self.proto.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = len(self.proto.graph.initializer) - 1
        self.uses[name] = 1
        while len(node.input) <= i:
            node.input.append("")
        if node.input[i]:
            self.uses[node.input[i]] -= 1
        node.input[i] = name


def _residual_partner(structure: Structure, l: Layer) -> tuple[str, str] | None:
    """(Add output, other operand) when ``l``'s output (no activation) goes only into a residual Add."""
    if l.activation or l.act_output not in ("", l.output):
        return None
    cons = structure.consumers_of(l.output)
    if len(cons) != 1 or cons[0].op != "Add" or len(cons[0].inputs) != 2:
        return None
    add = cons[0]
    other = add.inputs[1] if add.inputs[0] == l.output else add.inputs[0]
    t_o, t_y = structure.tensors.get(other), structure.tensors.get(l.output)
    if t_o is None or t_y is None or t_o.shape != t_y.shape:
        return None
    # the other operand must not depend on this layer
    frontier, seen = [other], set()
    while frontier:
        t = frontier.pop()
        if t == l.output:
            return None
        if t in seen:
            continue
        seen.add(t)
        p = structure.producer_of(t)
        if p is not None:
            frontier.extend(p.inputs)
    return add.outputs[0], other


# ---------------------------------------------------------------------------- recovery
class ReferenceRows:
    """Rows of the reference model's activations, computed forward once (a
    :class:`Stepper`) and cached by (tensor, positions)."""

    def __init__(self, proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, dynamic: bool | None = None):
        self.stepper = Stepper(proto, feeds, dynamic=dynamic)
        self.cache: dict[tuple, np.ndarray] = {}
        self.has = {o for n in proto.graph.node for o in n.output}

    def rows(self, name: str, pos_key: tuple, pick) -> np.ndarray:
        key = (name,) + pos_key
        if key not in self.cache:
            self.cache[key] = pick(self.stepper.get([name])[0])
        return self.cache[key]


def recover(applied: Applied, reference: ReferenceRows, feeds: Mapping[str, np.ndarray], *, source: Structure,
            seed: int = 0, max_rows: int = MAX_ROWS, dynamic: bool | None = None,
            with_outputs: bool = False) -> Recovered:
    """Refit the layers :func:`refits` lists (see the module doc); returns a new proto."""
    plan = refits(applied)
    proto = onnx.ModelProto()
    proto.CopyFrom(applied.proto)
    if not plan:
        return Recovered(proto, ())
    final = applied.plan.structure
    weights = _Weights(proto)
    stepper = Stepper(proto, feeds, dynamic=dynamic)
    fits = []
    for rf in plan:
        l = final.layer(rf.layer)
        node = weights.nodes.get(l.id)
        skip = _unsupported(l, node)
        idx = channel_index(l.output, final, source, applied.channel_maps)
        if skip is None and _fan_in(l) > MAX_DIM:
            skip = f"{_fan_in(l)} inputs per output, above {MAX_DIM} (too slow to refit)"
        if skip is None and (idx is None or l.output not in reference.has):
            skip = "its output cannot be lined up with the reference model"
        if skip:
            fits.append(LayerFit(l.id, rf.reason, 0, None, float("nan"), float("nan"), f"skipped: {skip}"))
            continue
        partner = _residual_partner(final, l)
        if partner is not None and (partner[0] not in reference.has
                                    or channel_index(partner[0], final, source, applied.channel_maps) is None):
            partner = None
        names = [l.input] + ([partner[1]] if partner else [])
        vals = stepper.get(names)
        x = vals[0]
        n = x.shape[0]
        w0 = weights.get(node, 1)
        b0 = weights.get(node, 2)
        if l.op == "Conv":
            ho, wo = l.out_hw
            dim = w0[0].size
            rows = min(n * ho * wo, row_budget(dim, max_rows))
            ni, hi, wi = _positions(n, ho, wo, rows, l.id, seed)
            a = _patches(_image(x), l, ni, hi, wi)

            def pick(t, ni=ni, hi=hi, wi=wi):
                return _image(t)[ni, :, hi, wi]
            pos_key = (n, ho, wo, rows, seed, l.id)
            w_naive = w0.reshape(w0.shape[0], -1).T
        else:
            # a Gemm's or MatMul's channels are the last axis; every other element is a row:
            # one per sample after a flatten, one per position for a Linear over [N, H, W, C]
            # or over the flattened [N*H*W, C] an export writes
            x2 = x.reshape(-1, x.shape[-1])
            total = x2.shape[0]
            dim = x2.shape[1]
            samples = len(next(iter(feeds.values()))) if feeds else total
            per = total // samples if samples and total % samples == 0 else 1
            rows = min(total, row_budget(dim, max_rows))
            sel = _rows(total, rows, l.id, seed)
            ni = sel // per
            a = x2[sel]

            def pick(t, sel=sel):
                return t.reshape(-1, t.shape[-1])[sel]
            pos_key = (total, rows, seed, l.id)
            trans_b = _attr(node, "transB", 0) if l.op == "Gemm" else 0
            w_naive = w0.T if trans_b else w0
        target = _mapped(reference.rows(partner[0] if partner else l.output, pos_key, pick),
                         channel_index(partner[0] if partner else l.output, final, source, applied.channel_maps))
        if partner:
            other = vals[1]
            target = target - (_image(other)[ni, :, hi, wi] if l.op == "Conv" else other.reshape(-1, other.shape[-1])[sel])
        bias_naive = b0.reshape(-1) if b0 is not None else None
        intercept = l.op != "MatMul"
        w, b, info = ridge_fit(a, target, intercept=intercept, activation=l.activation if not partner else None,
                               naive=(w_naive, bias_naive), seed=seed, samples=ni)
        if info["kept"] == "refit":
            if l.op == "Conv":
                weights.set(node, 1, w.T.reshape(w0.shape), w0.dtype)
            else:
                weights.set(node, 1, w.T if (l.op == "Gemm" and _attr(node, "transB", 0)) else w, w0.dtype)
            if b is not None:
                weights.set(node, 2, b.reshape(-1), w0.dtype)
            stepper.invalidate(node.name)
        fits.append(LayerFit(l.id, rf.reason, int(a.shape[0]), info["alpha"], info["err_naive"], info["err_fit"],
                             info["kept"]))
        del dim
    outputs = tuple(stepper.get([o.name for o in proto.graph.output])) if with_outputs else None
    return Recovered(proto, tuple(fits), outputs)


def _fan_in(l: Layer) -> int:
    return l.cin // max(l.groups, 1) * l.kernel[0] * l.kernel[1]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _unsupported(l: Layer, node: onnx.NodeProto | None) -> str | None:
    if node is None:
        return "no node of that name"
    if l.op == "Conv":
        return None if len(l.in_hw) == 2 and l.groups == 1 else "not a dense 2-D conv"
    if l.op == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "a Gemm with transA, alpha or beta"
        return None
    if l.op == "MatMul":
        return None
    return f"a {l.op} layer"


def _mapped(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = rows[:, np.maximum(idx, 0)].astype(np.float32)
    if (idx < 0).any():
        out[:, idx < 0] = 0.0
    return out
