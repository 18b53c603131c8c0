"""Zero-shot trainability for retrain mode: NASWOT (Mellor et al., ICML 2021), per layer
and per position, scored at the network's weakest layer.

The user retrains the emitted architecture, so the weights do not matter, only how
trainable the architecture is.  NASWOT scores that without training: give the network
freshly initialized weights, run inputs, and read each unit's activation pattern (the
sign of its pre-activation) for each input; samples whose binary codes differ much are
easy to tell apart; the score is ``log det K`` with ``K[i, j]`` = the number of units on
which samples i and j agree.  Mellor et al. report a Kendall tau around 0.5-0.6 with
trained accuracy on NAS-Bench-201 CIFAR-10: it ranks architectures, it does not predict
accuracy.

Summed over a whole network as in the paper, ``log det K`` grows with the number of units
counted (``K`` scales with it: ``n log N`` for ``n`` samples), so it ranks by layer count:
fusing an IBN block removes an activation layer and always lowered the score of
MobileNetV2 (322-334 against the original's 341, seed noise about +-2), however trainable
the fused network is.  Here the kernel is size-independent:

* **per layer, normalized**: ``K_l[i, j]`` = the *fraction* of layer ``l``'s units on which
  samples agree (in [0, 1], diagonal 1), so neither depth nor a layer's size scales it;
* **per position**: a sample is one input at one spatial position, coded by the layer's
  ``C`` channels there (``C`` bits: what the next 1x1 or KxK conv sees).  A layer with few
  channels has few distinct codes and samples it cannot tell apart, which lowers its
  ``log det``; once the channels are many the kernel approaches its infinite-width value
  and widening adds little.  Each input gives ``POSITIONS`` samples at distinct seeded
  random positions (n = batch x POSITIONS samples; a layer without spatial positions, one
  per input); the layer's score is ``log det(K_l + EPS I) / n`` (the ridge keeps exact
  duplicates finite).  Four positions per input halve the seed-to-seed noise of one
  position (standard deviation 0.06 instead of 0.1 on MobileNetV2);
* **the network's score is its weakest layer's** (the minimum over every conv/gemm layer,
  linear projections included, but not a layer that writes a graph output: the
  classifier's width is the task's): a bottleneck limits everything after it, and the
  minimum does not grow or shrink with the number of layers.

So fusion, which keeps every layer's width, keeps the score; a bottleneck of 8 channels,
channels collapsed to the minimum, a width multiplier of 0.25, or a layer whose outputs
do not depend on the input (dead: every code equal, ``K`` all ones) lower it
(tests/search/test_zeroshot.py; benchmarks/search.py ``proxy`` section).  Weights are
redrawn He-normal (fan-in), biases zero, with a NumPy generator seeded by ``seed``;
inputs are seeded standard-normal unless ``data`` is given.  The result is deterministic
for a seed (onnxruntime on CPU, graph optimizations off).  Higher is better; the score is
at most 0 (``log det`` of a matrix with unit diagonal).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

POSITIONS = 4  # samples per input and layer, at distinct random positions
EPS = 1e-2  # ridge added to the normalized kernel (a duplicated sample costs log EPS, not -inf)


def _fresh_weights(proto: onnx.ModelProto, layers, rng) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: i for i, t in enumerate(out.graph.initializer)}
    nodes = {n.name: n for n in out.graph.node}
    for l in layers:
        node = nodes.get(l.id)
        if node is None:
            continue
        for k, name in enumerate(node.input[1:3], start=1):
            if name not in inits:
                continue
            t = out.graph.initializer[inits[name]]
            shape = tuple(t.dims)
            if k == 1:
                fan_in = max(1, int(np.prod(shape[1:])) if l.op == "Conv" else l.cin)
                v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            else:
                v = np.zeros(shape)
            t.CopyFrom(numpy_helper.from_array(v.astype(numpy_helper.to_array(t).dtype), name))
    return out


def _expose(proto: onnx.ModelProto, names) -> None:
    """Make the tensors ``names`` graph outputs of ``proto`` (in place), typed as inferred."""
    from onnx import helper

    from archpass.search.runner import elem_types

    types = elem_types(proto)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
                              for n in dict.fromkeys(names) if n not in have)


def code_score(codes: np.ndarray) -> float:
    """``log det(K + EPS I) / n`` of the normalized agreement kernel of ``codes``
    (n samples x C binary units): 0 for n mutually orthogonal-ish codes is the ceiling
    (``K = I``), ``log EPS`` when every code is equal."""
    c = codes.astype(np.float64)
    n, units = c.shape
    k = (c @ c.T + (1 - c) @ (1 - c).T) / max(units, 1)
    sign, logdet = np.linalg.slogdet(k + EPS * np.eye(n))
    return float(logdet) / n if sign > 0 else float("-inf")


def layer_scores(proto_or_model, *, seed: int = 0, batch: int = 32, data=None) -> dict[str, float]:
    """The per-layer, per-position score of every conv/gemm layer (see the module doc),
    by layer id, in execution order."""
    import onnxruntime as ort

    from archpass.analysis import analyze
    from archpass.model import Model, model_from_proto, random_inputs, typed_feeds

    model = proto_or_model if isinstance(proto_or_model, Model) else model_from_proto(proto_or_model)
    structure = analyze(model)
    rng = np.random.default_rng(seed)
    outputs = {o.name for o in model.proto.graph.output}
    # a layer that writes a graph output (the classifier) has the task's width, not the architecture's
    layers = [l for l in structure.layers if l.output not in outputs] or list(structure.layers)
    if not layers:
        return {}
    proto = _fresh_weights(model.proto, layers, rng)
    if data is not None:
        feeds = {k: v[:batch] for k, v in data.arrays.items()}
    else:
        feeds = random_inputs(proto, model.input_shapes, batch, rng)
    feeds = typed_feeds(proto, feeds)
    names = [l.output for l in layers]
    _expose(proto, names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    static = min(s[0] for _, s in model.input_shapes) or 1
    n = len(next(iter(feeds.values())))
    # per layer: the layer's channels (a binary code) at POSITIONS random positions of every input
    codes: list[list[np.ndarray]] = [[] for _ in layers]
    for i in range(0, n, static):
        outs = sess.run(names, {k: v[i:i + static] for k, v in feeds.items()})
        for j, a in enumerate(outs):
            flat = _samples_channels_positions(a, layers[j].op, static)
            for x in flat:
                pos = rng.choice(x.shape[1], min(POSITIONS, x.shape[1]), replace=False)
                codes[j].append(x[:, pos].T > 0)
    return {l.id: code_score(np.concatenate(c, axis=0)) for l, c in zip(layers, codes)}


def _samples_channels_positions(a: np.ndarray, op: str, samples: int) -> np.ndarray:
    """A layer's output as (samples, channels, positions).  A conv's channels are axis 1
    (NCHW); a Gemm's or MatMul's are the last axis, every other element of a run being a
    position of its samples: a MatMul over [N, H, W, C] (ConvNeXt, transformers) or over
    the rows of a flattened [N*H*W, C] (as exports write a Linear over positions)."""
    if a.ndim < 2:
        return a.reshape(a.shape[0], 1, 1)
    if op == "Conv":
        return a.reshape(a.shape[0], a.shape[1], -1)
    rows = a.reshape(-1, a.shape[-1])
    per = rows.shape[0] // samples if rows.shape[0] % samples == 0 else rows.shape[0]
    return rows.reshape(-1, per, a.shape[-1]).transpose(0, 2, 1)


def trainability(proto_or_model, *, seed: int = 0, batch: int = 32, data=None) -> float:
    """The zero-shot trainability score (see the module doc): the weakest layer's
    per-position NASWOT score, deterministic for ``seed``; higher is better."""
    scores = layer_scores(proto_or_model, seed=seed, batch=batch, data=data)
    return min(scores.values()) if scores else 0.0


def naswot_logdet(proto_or_model, *, seed: int = 0, batch: int = 32, units_per_layer: int = 4096) -> float:
    """The paper's whole-network score (``log det`` of the summed, unnormalized kernel over
    the activation layers, at most ``units_per_layer`` units each), kept to show the size
    effect the score above removes (benchmarks/search.py ``proxy``)."""
    import onnxruntime as ort

    from archpass.analysis import analyze
    from archpass.model import Model, model_from_proto, random_inputs, typed_feeds

    model = proto_or_model if isinstance(proto_or_model, Model) else model_from_proto(proto_or_model)
    structure = analyze(model)
    rng = np.random.default_rng(seed)
    layers = [l for l in structure.layers if l.activation]
    if not layers:
        return 0.0
    proto = _fresh_weights(model.proto, structure.layers, rng)
    feeds = typed_feeds(proto, random_inputs(proto, model.input_shapes, batch, rng))
    names = [l.output for l in layers]
    _expose(proto, names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    static = min(s[0] for _, s in model.input_shapes) or 1
    k = np.zeros((batch, batch))
    per_sample = [sess.run(names, {kk: v[i:i + static] for kk, v in feeds.items()}) for i in range(0, batch, static)]
    for j in range(len(names)):
        acts = np.concatenate([p[j] for p in per_sample], axis=0).reshape(batch, -1)
        if acts.shape[1] > units_per_layer:
            acts = acts[:, np.sort(rng.choice(acts.shape[1], units_per_layer, replace=False))]
        c = (acts > 0).astype(np.float64)
        k += c @ c.T + (1 - c) @ (1 - c).T
    sign, logdet = np.linalg.slogdet(k)
    return float(logdet) if sign > 0 else float("-inf")
