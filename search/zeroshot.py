"""Zero-shot trainability for retrain mode: NASWOT (Mellor et al., ICML 2021).

The user retrains the emitted architecture, so the weights do not matter, only how
trainable the architecture is.  NASWOT scores that without training: give the network
freshly initialized weights, run a batch of inputs, and for every ReLU-like unit record
whether it is active (pre-activation > 0) for each input.  Inputs whose binary codes
differ much are easy to tell apart for the network; the score is
``log det K`` with ``K[i, j] = number of units on which inputs i and j agree``.  Mellor
et al. report that it correlates with accuracy after training on NAS-Bench-101/201 and
NDS (Kendall tau around 0.5-0.6 on NAS-Bench-201 CIFAR-10, better than random and
cheaper than one training step); it ranks architectures, it does not predict accuracy.

Here: every conv/gemm layer followed by an activation contributes its pre-activation
sign pattern (for hardswish/swish/gelu too: the sign is where those bend); at most
``UNITS_PER_LAYER`` units per layer are kept (a seeded random subset) to bound memory.
Weights are redrawn He-normal (fan-in), biases zero, with a NumPy generator seeded by
``seed``; inputs are seeded standard-normal unless ``data`` is given.  The result is
deterministic for a seed (onnxruntime on CPU, graph optimizations off).  Higher is better.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

UNITS_PER_LAYER = 4096


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


def trainability(proto_or_model, *, seed: int = 0, batch: int = 32, data=None) -> float:
    """NASWOT score of the architecture (see the module doc): deterministic for ``seed``."""
    import onnxruntime as ort
    from onnx import helper

    from archpass.analysis import analyze
    from archpass.model import Model, model_from_proto

    model = proto_or_model if isinstance(proto_or_model, Model) else model_from_proto(proto_or_model)
    structure = analyze(model)
    rng = np.random.default_rng(seed)
    layers = [l for l in structure.layers if l.activation]
    if not layers:
        return 0.0
    proto = _fresh_weights(model.proto, structure.layers, rng)
    if data is not None:
        feeds = {k: v[:batch] for k, v in data.arrays.items()}
    else:
        feeds = {name: rng.standard_normal((batch, *shape[1:])).astype(np.float32) for name, shape in model.input_shapes}
    names = [l.output for l in layers]
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    static = min(s[0] for _, s in model.input_shapes) or 1
    n = len(next(iter(feeds.values())))
    k = np.zeros((n, n))
    per_sample: list[list[np.ndarray]] = []
    for i in range(0, n, static):
        per_sample.append(sess.run(names, {kk: v[i:i + static] for kk, v in feeds.items()}))
    for j, name in enumerate(names):
        acts = np.concatenate([p[j] for p in per_sample], axis=0).reshape(n, -1)
        if acts.shape[1] > UNITS_PER_LAYER:
            acts = acts[:, np.sort(rng.choice(acts.shape[1], UNITS_PER_LAYER, replace=False))]
        c = (acts > 0).astype(np.float64)
        k += c @ c.T + (1 - c) @ (1 - c).T
    sign, logdet = np.linalg.slogdet(k)
    return float(logdet) if sign > 0 else float("-inf")
