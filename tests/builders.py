"""Small ONNX models built in code for tests (opset 17, seeded random float32 weights).

:class:`NetBuilder` chains layers and blocks onto a running NCHW tensor::

    model = (
        NetBuilder((1, 3, 32, 32))
        .conv(16, k=3, stride=2, act="relu6")
        .ibn(16, expand=4, se="hardsigmoid", act="hardswish")
        .head(10)
        .build()
    )

Every model ``build()`` returns has passed ``onnx.checker.check_model(full_check=True)``.
Activations can be written in each form exporters produce (see :data:`ACTIVATIONS`), weights
as initializers or as Constant nodes, BatchNormalization left unfused. :func:`messy_model`
combines all of those with dynamic input dims. :func:`run_ort` runs a model in onnxruntime
with graph optimizations disabled, for numeric comparisons.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

#: Activation forms: name -> what the builder emits after a layer.
ACTIVATIONS = {
    "relu": "Relu",
    "relu6": "Clip(min=0, max=6) with min/max as initializers",
    "relu6_constant": "Clip(min=0, max=6) with min/max from Constant nodes",
    "hardswish": "HardSwish op",
    "hardswish_mul": "x * HardSigmoid(x) (Mul)",
    "sigmoid": "Sigmoid",
    "silu": "x * Sigmoid(x) (Mul)",
    "hardsigmoid": "HardSigmoid (alpha=1/6, beta=0.5, as torch exports it)",
}

Dim = int | str | None


class NetBuilder:
    """Build a single-input, single-output NCHW network one layer/block at a time.

    ``input_shape`` may contain strings for symbolic dims (``("N", 3, "H", "W")``).
    ``weights`` is the default storage of conv/BN/Gemm parameters: ``"initializer"`` or
    ``"constant"`` (Constant nodes). Node names are readable and deterministic
    (``conv0``, ``conv0_bn``, ``conv0_act``...), so tests can refer to them.
    """

    def __init__(
        self,
        input_shape: Sequence[Dim] = (1, 3, 32, 32),
        *,
        seed: int = 0,
        input_name: str = "input",
        output_name: str = "output",
        weights: str = "initializer",
        name: str = "net",
    ):
        if len(input_shape) != 4:
            raise ValueError(f"input_shape must be NCHW, got {input_shape}")
        if weights not in ("initializer", "constant"):
            raise ValueError(f"weights must be 'initializer' or 'constant', got {weights!r}")
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.input_name = input_name
        self.output_name = output_name
        self.default_weights = weights
        self.input_shape = list(input_shape)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}
        self._used: set[str] = set()
        # the running tensor and its shape (None = unknown extent)
        self.x = input_name
        self.shape: list[Dim] = list(input_shape)

    # ----------------------------------------------------------------- plumbing
    @property
    def channels(self) -> int:
        c = self.shape[1]
        if not isinstance(c, int):
            raise ValueError(f"channel dim of {self.x} is not static: {c!r}")
        return c

    def fresh(self, prefix: str) -> str:
        """A new unique name ``prefix<N>``."""
        n = self._counts.get(prefix, 0)
        while f"{prefix}{n}" in self._used:
            n += 1
        self._counts[prefix] = n + 1
        self._used.add(f"{prefix}{n}")
        return f"{prefix}{n}"

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def tensor(self, name: str, value: np.ndarray, weights: str | None = None) -> str:
        """Add ``value`` as an initializer or a Constant node; returns the tensor name."""
        storage = weights or self.default_weights
        t = numpy_helper.from_array(np.asarray(value), name)
        if storage == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=t))
        else:
            self.initializers.append(t)
        return name

    def _rand(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)

    # ----------------------------------------------------------------- layers
    def activation(self, act: str | None, name: str | None = None) -> "NetBuilder":
        """Apply ``act`` (a key of :data:`ACTIVATIONS`, or None) to the running tensor."""
        if act is None:
            return self
        x = self.x
        name = name or self.fresh(f"{x}_act")
        if act == "relu":
            self.x = self.node("Relu", [x], name)
        elif act in ("relu6", "relu6_constant"):
            storage = "constant" if act == "relu6_constant" else "initializer"
            lo = self.tensor(f"{name}_min", np.array(0.0, np.float32), storage)
            hi = self.tensor(f"{name}_max", np.array(6.0, np.float32), storage)
            self.x = self.node("Clip", [x, lo, hi], name)
        elif act == "hardswish":
            self.x = self.node("HardSwish", [x], name)
        elif act == "hardsigmoid":
            self.x = self.node("HardSigmoid", [x], name, alpha=1.0 / 6, beta=0.5)
        elif act == "hardswish_mul":
            gate = self.node("HardSigmoid", [x], f"{name}_hsig", alpha=1.0 / 6, beta=0.5)
            self.x = self.node("Mul", [x, gate], name)
        elif act == "sigmoid":
            self.x = self.node("Sigmoid", [x], name)
        elif act == "silu":
            gate = self.node("Sigmoid", [x], f"{name}_sig")
            self.x = self.node("Mul", [x, gate], name)
        else:
            raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        return self

    def conv(
        self,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        *,
        bn: bool = False,
        bias: bool | None = None,
        weights: str | None = None,
        name: str | None = None,
    ) -> "NetBuilder":
        """KxK conv (pads k//2) -> optional unfused BatchNormalization -> optional activation.

        ``groups=channels`` with ``cout=channels`` is a depthwise conv. ``bias`` defaults
        to ``not bn`` (as exporters do). ``weights`` overrides the builder default storage.
        """
        cin = self.channels
        if cin % groups or cout % groups:
            raise ValueError(f"groups={groups} must divide cin={cin} and cout={cout}")
        name = name or self.fresh("conv")
        bias = (not bn) if bias is None else bias
        w = self.tensor(f"{name}_w", self._rand((cout, cin // groups, k, k), cin // groups * k * k), weights)
        inputs = [self.x, w]
        if bias:
            inputs.append(self.tensor(f"{name}_b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32), weights))
        p = k // 2
        self.x = self.node(
            "Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=groups
        )
        self.shape = [self.shape[0], cout, *(_conv_dim(d, k, stride, p) for d in self.shape[2:])]
        if bn:
            self.batchnorm(name=f"{name}_bn", weights=weights)
        return self.activation(act, f"{name}_act")

    def batchnorm(self, *, name: str | None = None, weights: str | None = None) -> "NetBuilder":
        """Unfused BatchNormalization (inference form) with random positive variances."""
        c = self.channels
        name = name or self.fresh("bn")
        r = self.rng
        scale = self.tensor(f"{name}_scale", (1.0 + 0.1 * r.standard_normal(c)).astype(np.float32), weights)
        shift = self.tensor(f"{name}_shift", (0.1 * r.standard_normal(c)).astype(np.float32), weights)
        mean = self.tensor(f"{name}_mean", (0.1 * r.standard_normal(c)).astype(np.float32), weights)
        var = self.tensor(f"{name}_var", r.uniform(0.5, 1.5, c).astype(np.float32), weights)
        self.x = self.node("BatchNormalization", [self.x, scale, shift, mean, var], name, epsilon=1e-5)
        return self

    def dw(self, k: int = 3, stride: int = 1, act: str | None = "relu", **kw) -> "NetBuilder":
        """Depthwise KxK conv (groups = cin = cout)."""
        c = self.channels
        return self.conv(c, k, stride, groups=c, act=act, **kw)

    # ----------------------------------------------------------------- blocks
    def se(self, gate: str = "hardsigmoid", ratio: float = 0.25, *, name: str | None = None) -> "NetBuilder":
        """Squeeze-excite: GlobalAveragePool -> 1x1 conv -> Relu -> 1x1 conv -> gate -> Mul."""
        if gate not in ("hardsigmoid", "sigmoid"):
            raise ValueError(f"SE gate must be 'hardsigmoid' or 'sigmoid', got {gate!r}")
        c = self.channels
        name = name or self.fresh("se")
        x, shape = self.x, self.shape
        self.x = self.node("GlobalAveragePool", [x], f"{name}_pool")
        self.shape = [shape[0], c, 1, 1]
        self.conv(max(1, int(c * ratio)), 1, act="relu", name=f"{name}_reduce")
        self.conv(c, 1, act=gate, name=f"{name}_expand")
        self.x = self.node("Mul", [x, self.x], f"{name}_mul")
        self.shape = shape
        return self

    def ibn(
        self,
        cout: int,
        expand: float = 6,
        k: int = 3,
        stride: int = 1,
        act: str | None = "relu6",
        *,
        se: str | None = None,
        residual: bool | None = None,
        bn: bool = False,
        name: str | None = None,
    ) -> "NetBuilder":
        """Inverted bottleneck: 1x1 expand -> act -> KxK dw -> act -> [SE] -> 1x1 project -> [+x].

        ``se`` is the SE gate (``"hardsigmoid"``/``"sigmoid"``) or None. ``residual``
        defaults to stride 1 and cin == cout.
        """
        cin, x_in, shape_in = self.channels, self.x, self.shape
        name = name or self.fresh("ibn")
        hidden = int(round(cin * expand))
        self.conv(hidden, 1, act=act, bn=bn, name=f"{name}_expand")
        self.conv(hidden, k, stride, groups=hidden, act=act, bn=bn, name=f"{name}_dw")
        if se:
            self.se(se, name=f"{name}_se")
        self.conv(cout, 1, act=None, bn=bn, name=f"{name}_project")
        return self._residual(residual, stride == 1 and cin == cout, x_in, shape_in, name)

    def fused_ibn(
        self,
        cout: int,
        expand: float = 4,
        k: int = 3,
        stride: int = 1,
        act: str | None = "relu",
        *,
        residual: bool | None = None,
        bn: bool = False,
        name: str | None = None,
    ) -> "NetBuilder":
        """Fused inverted bottleneck: KxK dense expand -> act -> 1x1 project -> [+x]."""
        cin, x_in, shape_in = self.channels, self.x, self.shape
        name = name or self.fresh("fused")
        self.conv(int(round(cin * expand)), k, stride, act=act, bn=bn, name=f"{name}_expand")
        self.conv(cout, 1, act=None, bn=bn, name=f"{name}_project")
        return self._residual(residual, stride == 1 and cin == cout, x_in, shape_in, name)

    def dw_separable(
        self, cout: int, k: int = 3, stride: int = 1, act: str | None = "relu", *, bn: bool = False,
        name: str | None = None,
    ) -> "NetBuilder":
        """Depthwise-separable: KxK depthwise -> act -> 1x1 pointwise -> act."""
        name = name or self.fresh("dws")
        self.dw(k, stride, act=act, bn=bn, name=f"{name}_dw")
        return self.conv(cout, 1, act=act, bn=bn, name=f"{name}_pw")

    def _residual(self, residual: bool | None, possible: bool, x_in: str, shape_in: list, name: str) -> "NetBuilder":
        if residual is None:
            residual = possible
        if residual:
            if not possible:
                raise ValueError(f"{name}: residual needs stride 1 and cin == cout")
            self.x = self.node("Add", [x_in, self.x], f"{name}_add")
            self.shape = shape_in
        return self

    def add(self, *branches: Callable[["NetBuilder"], object], name: str | None = None) -> "NetBuilder":
        """Elementwise Add of the outputs of ``branches`` (a branch returning None = identity)."""
        return self._merge("Add", branches, name or self.fresh("add"))

    def concat(self, *branches: Callable[["NetBuilder"], object], name: str | None = None) -> "NetBuilder":
        """Concat (axis 1) of branches, each a callable chaining ops from the current tensor::

            b.concat(lambda b: b.conv(8, 1), lambda b: b.conv(8, 3))
        """
        return self._merge("Concat", branches, name or self.fresh("concat"))

    def _merge(self, op: str, branches, name: str) -> "NetBuilder":
        if len(branches) < 2:
            raise ValueError(f"{op} needs at least two branches")
        x0, shape0 = self.x, self.shape
        outs, shapes = [], []
        for branch in branches:
            self.x, self.shape = x0, list(shape0)
            branch(self)
            outs.append(self.x)
            shapes.append(self.shape)
        if any(s[2:] != shapes[0][2:] for s in shapes):
            raise ValueError(f"{name}: branch spatial shapes differ: {shapes}")
        if op == "Concat":
            self.x = self.node("Concat", outs, name, axis=1)
            chans = [s[1] for s in shapes]
            c = sum(chans) if all(isinstance(v, int) for v in chans) else None
            self.shape = [shapes[0][0], c, *shapes[0][2:]]
        else:
            if any(s[1] != shapes[0][1] for s in shapes):
                raise ValueError(f"{name}: Add branches have different channels: {shapes}")
            self.x = self.node(op, outs, name)
            self.shape = shapes[0]
        return self

    def channel_shuffle(self, groups: int = 2, *, name: str | None = None) -> "NetBuilder":
        """ShuffleNet channel shuffle: Reshape(N,g,C/g,H,W) -> Transpose -> Reshape(N,C,H,W).

        The shapes are literal constants (as torchvision exports fold them), so spatial dims
        must be static; the batch dim is copied (0).
        """
        c = self.channels
        h, w = self.shape[2:]
        if not (isinstance(h, int) and isinstance(w, int)):
            raise ValueError("channel_shuffle needs static H and W")
        if c % groups:
            raise ValueError(f"groups={groups} must divide channels={c}")
        name = name or self.fresh("shuffle")
        s1 = self.tensor(f"{name}_shape5", np.array([0, groups, c // groups, h, w], np.int64), "initializer")
        s2 = self.tensor(f"{name}_shape4", np.array([0, c, h, w], np.int64), "initializer")
        y = self.node("Reshape", [self.x, s1], f"{name}_split")
        y = self.node("Transpose", [y], f"{name}_transpose", perm=[0, 2, 1, 3, 4])
        self.x = self.node("Reshape", [y, s2], f"{name}_merge")
        return self

    def reshape(self, shape: Sequence[int], out_shape: Sequence[Dim] | None = None, *, name: str | None = None) -> "NetBuilder":
        """Reshape to a literal ``shape`` (0 copies, -1 infers); ``out_shape`` is the tracked result."""
        name = name or self.fresh("reshape")
        s = self.tensor(f"{name}_shape", np.array(list(shape), np.int64), "initializer")
        self.x = self.node("Reshape", [self.x, s], name)
        self.shape = list(out_shape) if out_shape is not None else [d if d > 0 else None for d in shape]
        return self

    def head(
        self,
        num_classes: int = 10,
        *,
        flatten: str = "flatten",
        weights: str | None = None,
        name: str = "head",
    ) -> "NetBuilder":
        """GlobalAveragePool -> Flatten -> Gemm (transB=1, as torch exports Linear).

        ``flatten="reshape"`` flattens with ``Reshape(x, [-1, C])`` instead: a Reshape whose
        literal shape fixes the channel count (torch's ``x.view(-1, C)``).
        """
        c = self.channels
        self.x = self.node("GlobalAveragePool", [self.x], f"{name}_pool")
        if flatten == "flatten":
            self.x = self.node("Flatten", [self.x], f"{name}_flatten", axis=1)
            self.shape = [self.shape[0], c]
        elif flatten == "reshape":
            self.reshape([-1, c], [self.shape[0], c], name=f"{name}_reshape")
        else:
            raise ValueError(f"flatten must be 'flatten' or 'reshape', got {flatten!r}")
        w = self.tensor(f"{name}_fc_w", self._rand((num_classes, c), c), weights)
        b = self.tensor(f"{name}_fc_b", (0.1 * self.rng.standard_normal(num_classes)).astype(np.float32), weights)
        self.x = self.node("Gemm", [self.x, w, b], f"{name}_fc", transB=1)
        self.shape = [self.shape[0], num_classes]
        return self

    # ----------------------------------------------------------------- output
    def build(self, *, check: bool = True) -> onnx.ModelProto:
        """The model (single output named ``output_name``), checked with ``full_check=True``."""
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in self.nodes]
        out = self.x
        if out == self.input_name:
            raise ValueError("empty network: add at least one layer")
        # rename the last tensor to the requested output name in its producer
        for n in nodes:
            n.output[:] = [self.output_name if o == out else o for o in n.output]
            n.input[:] = [self.output_name if i == out else i for i in n.input]
        graph = helper.make_graph(
            nodes,
            self.name,
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(self.output_name, TensorProto.FLOAT, self.shape)],
            initializer=[onnx.TensorProto.FromString(t.SerializeToString()) for t in self.initializers],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="archpass-tests")
        model.ir_version = 8  # opset 17 era; loadable by every onnxruntime >= 1.14
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def _conv_dim(d: Dim, k: int, s: int, p: int) -> Dim:
    if isinstance(d, int):
        return (d + 2 * p - k) // s + 1
    if isinstance(d, str) and k == 1 and s == 1 and p == 0:
        return d
    return None


# --------------------------------------------------------------------- ready-made models
def messy_model(seed: int = 0) -> onnx.ModelProto:
    """A model the way careless exporters write it.

    Input ``input`` of shape ``("N", 3, "H", "W")`` (dynamic batch and spatial dims); some
    conv weights fed through Constant nodes; unfused BatchNormalization after convs;
    ReLU6 as Clip with Constant-node min/max; HardSwish as x*HardSigmoid(x); an SE block;
    a residual IBN. Needs ``--input-shape input:1,3,H,W`` (H, W multiples of 8) to analyze.
    """
    b = NetBuilder(("N", 3, "H", "W"), seed=seed, name="messy")
    b.conv(16, 3, 2, act="relu6_constant", bn=True, weights="constant")  # stem
    b.ibn(16, expand=1, act="relu6_constant", bn=True)  # residual IBN (expand 1x1 still present)
    b.ibn(24, expand=4, stride=2, act="hardswish_mul", se="hardsigmoid", bn=True)  # SE, no residual
    b.ibn(24, expand=3, act="hardswish_mul", bn=True, name="ibn_res")  # residual IBN
    b.dw_separable(32, stride=2, act="relu6_constant", bn=True)
    b.conv(64, 1, act="hardswish_mul", bn=True, weights="constant")
    b.head(10, weights="constant")
    return b.build()


def half_precision(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in float16 as a half-precision export writes it: every float32 initializer,
    Constant value, graph input/output and value_info in float16 (the builders' nets use no
    op whose float inputs must stay float32)."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def half(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))

    for t in g.initializer:
        half(t)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                half(a.t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out, full_check=True)
    return out


def random_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], *, optimize: bool = False) -> list[np.ndarray]:
    """Run ``model`` on CPU; graph optimizations disabled unless ``optimize`` (numeric comparisons)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def qdq_model() -> onnx.ModelProto:
    """A quantized (QDQ) two-conv net as onnxruntime's static quantizer writes it: int8
    weights through DequantizeLinear, activations through QuantizeLinear/DequantizeLinear."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper_from(np.array(0.02, np.float32), "s"), numpy_helper_from(np.array(0, np.int8), "z")]
    nodes, x = [], "input"
    for i, (cin, cout) in enumerate([(3, 16), (16, 32)]):
        y = "r0" if i == 0 else "output"
        inits.append(numpy_helper_from(rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8), f"w{i}_q"))
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"x{i}_q"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"x{i}_q", "s", "z"], [f"x{i}_dq"], name=f"dq{i}"),
                  helper.make_node("DequantizeLinear", [f"w{i}_q", "s", "z"], [f"w{i}"], name=f"dqw{i}"),
                  helper.make_node("Conv", [f"x{i}_dq", f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [y], name=f"relu{i}")]
        x = y
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32, 16, 16])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="archpass-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def numpy_helper_from(a: np.ndarray, name: str) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(a, name)


def nhwc_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (one NCHW image input) fed NHWC, as TensorFlow/Keras exports are: the input
    becomes ``nhwc`` of shape (N, H, W, C) and a Transpose makes it NCHW for the network."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    name = g.input[0].name
    n, c, h, w = (d.dim_value for d in g.input[0].type.tensor_type.shape.dim)
    g.node.insert(0, helper.make_node("Transpose", ["nhwc"], [name], name="to_nchw", perm=[0, 3, 1, 2]))
    del g.input[0]
    g.input.insert(0, helper.make_tensor_value_info("nhwc", TensorProto.FLOAT, [n, h, w, c]))
    onnx.checker.check_model(out, full_check=True)
    return out


def _rand_init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _io_model(nodes, inits, x_shape, y_shape, name="m"):
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def video_net():
    """A 3-D conv (8 of 3x3x3x3 on a 4x8x8 clip), folded into 32 channels for a 2-D conv."""
    return _io_model([
        helper.make_node("Conv", ["x", "w3", "b3"], ["c3"], name="conv3d", pads=[1] * 6),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3d"),
        helper.make_node("Reshape", ["r3", "shape"], ["flat"], name="fold"),
        helper.make_node("Conv", ["flat", "w2"], ["y"], name="conv2d", pads=[1, 1, 1, 1]),
    ], [_rand_init("w3", 8, 3, 3, 3, 3), _rand_init("b3", 8), numpy_helper.from_array(np.array([1, 32, 8, 8], np.int64), "shape"),
        _rand_init("w2", 16, 32, 3, 3)], [1, 3, 4, 8, 8], [1, 16, 8, 8], "video")


def attention_net():
    """Tokens through a projection (a layer), then two MatMuls of activations and an Einsum."""
    return _io_model([
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["att"], name="scores"),
        helper.make_node("Softmax", ["att"], ["p"], name="softmax", axis=-1),
        helper.make_node("Einsum", ["p", "q"], ["ctx"], name="mix", equation="bij,bjk->bik"),
        helper.make_node("ConvTranspose", ["img", "wt"], ["up"], name="up", strides=[2, 2]),
        helper.make_node("Reshape", ["up", "shape"], ["upf"], name="flat"),
        helper.make_node("Add", ["ctx", "upf"], ["y"], name="add"),
    ], [_rand_init("wq", 32, 32), _rand_init("img", 1, 8, 4, 4), _rand_init("wt", 8, 2, 4, 4),
        numpy_helper.from_array(np.array([1, 16, 32], np.int64), "shape")], [1, 16, 32], [1, 16, 32], "attention")


def conv1d_net(expand_act: bool = True, expand_bias: bool = True, length: int = 32) -> onnx.ModelProto:
    """A 1-D network (keyword spotting, time series): a stem conv, one residual IBN of 1-D
    convs (expand 1, depthwise 5, project 1), mean over time and a linear head."""
    r = np.random.default_rng(3)

    def w(name, *shape):
        return numpy_helper.from_array((r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    def b(name, n):
        return numpy_helper.from_array((0.1 * r.standard_normal(n)).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["s"], name="stem", pads=[1, 1]),
             helper.make_node("Relu", ["s"], ["s_act"], name="stem_relu"),
             helper.make_node("Conv", ["s_act", "w_exp"] + (["b_exp"] if expand_bias else []), ["e"], name="exp")]
    if expand_act:
        nodes.append(helper.make_node("Relu", ["e"], ["e_act"], name="exp_relu"))
    nodes += [helper.make_node("Conv", ["e_act" if expand_act else "e", "w_dw", "b_dw"], ["d"], name="dw", pads=[2, 2],
                               group=64),
              helper.make_node("Relu", ["d"], ["d_act"], name="dw_relu"),
              helper.make_node("Conv", ["d_act", "w_proj", "b_proj"], ["p"], name="proj"),
              helper.make_node("Add", ["s_act", "p"], ["res"], name="residual"),
              helper.make_node("ReduceMean", ["res"], ["pooled"], name="pool", axes=[2], keepdims=0),
              helper.make_node("Gemm", ["pooled", "w_head", "b_head"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, length])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [w("w_stem", 16, 8, 3), b("b_stem", 16), w("w_exp", 64, 16, 1)]
                          + ([b("b_exp", 64)] if expand_bias else []) + [w("w_dw", 64, 1, 5), b("b_dw", 64), w("w_proj", 16, 64, 1), b("b_proj", 16),
                           w("w_head", 4, 16), b("b_head", 4)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def flatten_fc_model() -> onnx.ModelProto:
    """Conv -> Flatten of the 6x6 map -> Gemm: the Gemm fixes the spatial size."""
    w = helper.make_tensor("w", TensorProto.FLOAT, (4, 3, 3, 3), np.ones(108, np.float32).tolist())
    fc = helper.make_tensor("fc", TensorProto.FLOAT, (144, 2), np.ones(288, np.float32).tolist())
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["f"], name="flat", axis=1),
         helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def detector_model(batched: bool = True, threshold: float = 0.5) -> onnx.ModelProto:
    """A detector exported whole: a small backbone with a class head (3 anchors) and a box
    head, then post-processing whose shapes depend on the data: the anchors whose sigmoid
    score passes ``threshold`` (``NonZero``) and their boxes, and an ``If`` on whether any
    passed whose branches read the backbone's pooled features from the outer scope.
    Outputs ``boxes`` (K, 4), ``scores`` (K,), ``summary`` (1, 32, 1, 1).  With ``batched``
    False the input is one ``image`` (3, 32, 32), normalized and unsqueezed to a batch of
    one inside the graph, as torchvision's detectors export."""
    b = NetBuilder((1, 3, 32, 32), input_name="x", output_name="feat", seed=5)
    base = b.conv(16, k=3, stride=2, act="relu").ibn(16, expand=4, act="relu6").conv(32, k=1, act="relu").build(check=False)
    g = base.graph
    r = np.random.default_rng(7)
    inits = list(g.initializer) + [
        numpy_helper.from_array((r.standard_normal((3, 32, 1, 1)) / 4).astype(np.float32), "w_cls"),
        numpy_helper.from_array((r.standard_normal((12, 32, 1, 1)) / 4).astype(np.float32), "w_reg"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "by4"),
        numpy_helper.from_array(np.array(threshold, np.float32), "threshold"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    then_g = helper.make_graph([helper.make_node("Identity", ["pooled"], ["kept"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("kept", TensorProto.FLOAT, [1, 32, 1, 1])])
    else_g = helper.make_graph([helper.make_node("Sub", ["pooled", "pooled"], ["none"], name="else_sub")], "else", [],
                               [helper.make_tensor_value_info("none", TensorProto.FLOAT, [1, 32, 1, 1])])
    nodes = list(g.node) + [
        helper.make_node("Conv", ["feat", "w_cls"], ["cls"], name="head_cls"),
        helper.make_node("Conv", ["feat", "w_reg"], ["reg"], name="head_reg"),
        helper.make_node("GlobalAveragePool", ["feat"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["cls", "flat"], ["cls_flat"], name="cls_flat"),
        helper.make_node("Sigmoid", ["cls_flat"], ["prob"], name="prob"),
        helper.make_node("Greater", ["prob", "threshold"], ["keep"], name="keep"),
        helper.make_node("NonZero", ["keep"], ["nz"], name="nonzero"),
        helper.make_node("Squeeze", ["nz", "axis0"], ["idx"], name="idx"),
        helper.make_node("Gather", ["prob", "idx"], ["scores"], name="gather_scores", axis=0),
        helper.make_node("Reshape", ["reg", "by4"], ["reg_rows"], name="reg_rows"),
        helper.make_node("Gather", ["reg_rows", "idx"], ["boxes"], name="gather_boxes", axis=0),
        helper.make_node("Size", ["idx"], ["count"], name="count"),
        helper.make_node("Greater", ["count", "zero"], ["any"], name="any"),
        helper.make_node("If", ["any"], ["summary"], name="summary", then_branch=then_g, else_branch=else_g),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])]
    if not batched:
        inits.append(numpy_helper.from_array(np.full((3, 1, 1), 0.5, np.float32), "mean"))
        nodes = [helper.make_node("Sub", ["image", "mean"], ["centered"], name="normalize"),
                 helper.make_node("Unsqueeze", ["centered", "axis0"], ["x"], name="add_batch")] + nodes
        inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, 32, 32])]
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
               helper.make_tensor_value_info("summary", TensorProto.FLOAT, [1, 32, 1, 1])]
    graph = helper.make_graph(nodes, "detector", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="archpass-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
