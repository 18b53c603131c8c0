"""Generated block chains: the contexts in which runtime targets time their kernels.

A chain is a small random network fragment built the way CNNs are (inverted residuals
with optional squeeze-excitation, ResNet basic and bottleneck blocks, fused-IBN,
plain convs, pooling, two-branch concats, classifier heads), in the ONNX forms exporters
write after canonicalization (BatchNorm folded, Clip(0,6), HardSwish, x*Sigmoid(x)...).
Node names equal their output tensor names, so optimized-graph nodes map back.  A chain
is a pure function of its seed.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from archpass.costmodel.sampling import channel_cap, channels, spatial
from archpass.structure import conv_out

ACTS = ["relu", "relu6", "hardswish", "swish", None]


class ChainBuilder:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.aligned = False

    def ch(self, lo: int, hi: int) -> int:
        """A channel count (a multiple of 8 in aligned chains)."""
        c = channels(self.rng, lo, hi)
        return max(8, -(-c // 8) * 8) if self.aligned else c

    def align(self, c: int) -> int:
        return max(8, -(-c // 8) * 8) if self.aligned else c

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: np.ndarray, prefix: str = "w", dtype=np.float32) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        out = self.fresh(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # ------------------------------------------------------------------ layers
    def act(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        if act == "relu":
            return self.op("Relu", [x], "relu")
        if act == "relu6":
            return self.op("Clip", [x, self.const(np.array(0.0), "c"), self.const(np.array(6.0), "c")], "clip")
        if act == "hardswish":
            return self.op("HardSwish", [x], "hswish")
        if act == "hardsigmoid":
            return self.op("HardSigmoid", [x], "hsig", alpha=1.0 / 6, beta=0.5)
        if act == "sigmoid":
            return self.op("Sigmoid", [x], "sig")
        if act == "swish":
            s = self.op("Sigmoid", [x], "sig")
            return self.op("Mul", [x, s], "swish")
        raise ValueError(act)

    def conv(self, x, shape, cout, k=1, s=1, g=1, act=None):
        c, h, w = shape
        wt = self.const(self.np.standard_normal((cout, c // g, k, k)).astype(np.float32) * (2.0 / (c // g * k * k)) ** 0.5)
        b = self.const(np.zeros(cout, np.float32), "b")
        p = k // 2
        y = self.op("Conv", [x, wt, b], "conv", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g)
        shape = (cout, conv_out(h, k, s, p, p), conv_out(w, k, s, p, p))
        return self.act(y, act), shape

    # ------------------------------------------------------------------ blocks
    def ibn(self, x, shape, cout, expand, k, s, act, se):
        c = shape[0]
        y, sh = self.conv(x, shape, self.align(c * expand), 1, 1, 1, act) if expand > 1 else (x, shape)
        mid = sh[0]
        y, sh = self.conv(y, sh, mid, k, s, mid, act)
        if se:
            y = self.se(y, mid, se)
        y, sh = self.conv(y, sh, cout, 1, 1, 1, None)
        if s == 1 and c == cout:
            y = self.op("Add", [y, x], "add")
        return y, sh

    def se(self, x, c, gate):
        r = max(8, (c // 4) // 8 * 8) if self.aligned or self.rng.random() < 0.7 else max(1, c // 4)
        p = self.op("GlobalAveragePool", [x], "gap")
        y, sh = self.conv(p, (c, 1, 1), r, 1, 1, 1, "relu" if gate == "hardsigmoid" else "swish")
        y, sh = self.conv(y, sh, c, 1, 1, 1, gate)
        return self.op("Mul", [x, y], "semul")

    def basic(self, x, shape, cout, s, act, bottleneck, group_width=0):
        """ResNet basic/bottleneck block; a bottleneck with ``group_width`` has a grouped 3x3
        (ResNeXt/RegNet: groups = mid channels / group width)."""
        c = shape[0]
        groups = 1
        if bottleneck:
            mid = self.align(max(8, cout // self.rng.choice([1, 2, 4])))
            if group_width:
                mid = max(group_width, mid // group_width * group_width)
                groups = mid // group_width
            y, sh = self.conv(x, shape, mid, 1, 1, 1, act)
            y, sh = self.conv(y, sh, mid, 3, s, groups, act)
            y, sh = self.conv(y, sh, cout, 1, 1, 1, None)
        else:
            y, sh = self.conv(x, shape, cout, 3, s, 1, act)
            y, sh = self.conv(y, sh, cout, 3, 1, 1, None)
        sc = x
        if s != 1 or c != cout:
            sc, _ = self.conv(x, shape, cout, 1, s, 1, None)
        y = self.op("Add", [y, sc], "add")
        return self.act(y, act), sh

    def fused(self, x, shape, cout, expand, k, s, act):
        c = shape[0]
        y, sh = self.conv(x, shape, self.align(max(8, c * expand)), k, s, 1, act)
        y, sh = self.conv(y, sh, cout, 1, 1, 1, None)
        if s == 1 and c == cout:
            y = self.op("Add", [y, x], "add")
        return y, sh

    def pool(self, x, shape):
        c, h, w = shape
        kind = self.rng.choice(["MaxPool", "MaxPool", "AveragePool"])
        k, s = self.rng.choice([(3, 2), (2, 2), (3, 1)])
        p = 1 if k == 3 else 0
        y = self.op(kind, [x], "pool", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
        return y, (c, conv_out(h, k, s, p, p), conv_out(w, k, s, p, p))

    def branches(self, x, shape, act):
        c = shape[0]
        a, sa = self.conv(x, shape, self.ch(8, max(16, c)), 1, 1, 1, act)
        b, sb = self.conv(x, shape, self.ch(8, max(16, c)), 3, 1, 1, act)
        parts = [a, b]
        if self.rng.random() < 0.5:
            parts.append(x)
        y = self.op("Concat", parts, "concat", axis=1)
        return y, (sa[0] + sb[0] + (c if len(parts) == 3 else 0), sa[1], sa[2])

    def shuffle_unit(self, x, shape, act):
        """ShuffleNetV2 unit: split channels, transform one half, concat, channel shuffle."""
        c, h, w = shape
        half = c // 2
        a, b = self.fresh("split"), self.fresh("split")
        self.nodes.append(helper.make_node("Split", [x, self.const(np.array([c - half, half]), "s", np.int64)], [a, b],
                                           name=a, axis=1))
        y, sh = self.conv(b, (half, h, w), half, 1, 1, 1, act)
        y, sh = self.conv(y, sh, half, 3, 1, half, None)
        y, sh = self.conv(y, sh, half, 1, 1, 1, act)
        y = self.op("Concat", [a, y], "concat", axis=1)
        r = self.op("Reshape", [y, self.const(np.array([1, 2, c // 2, h, w]), "s", np.int64)], "reshape")
        t = self.op("Transpose", [r], "transpose", perm=[0, 2, 1, 3, 4])
        return self.op("Reshape", [t, self.const(np.array([1, c, h, w]), "s", np.int64)], "reshape"), shape

    def head(self, x, shape, classes):
        c = shape[0]
        p = self.op("GlobalAveragePool", [x], "gap")
        f = self.op("Flatten", [p], "flatten", axis=1)
        w = self.const(self.np.standard_normal((classes, c)).astype(np.float32) * 0.01)
        b = self.const(np.zeros(classes, np.float32), "b")
        y = self.op("Gemm", [f, w, b], "gemm", transB=1)
        return y, (classes,)

    # ------------------------------------------------------------------ chains
    def build(self) -> onnx.ModelProto:
        rng = self.rng
        # half the chains keep every channel count a multiple of 8, as channel rounding and
        # most exported architectures do: on runtimes with blocked layouts (onnxruntime's
        # NCHWc) that context has no layout reorders, and kernels are timed in both contexts
        self.aligned = rng.random() < 0.5
        hw = spatial(rng)
        cap = channel_cap(hw)
        c = 3 if hw >= 96 and rng.random() < 0.2 else self.ch(8, cap)
        shape = (c, hw, hw)
        x = "input"
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *shape])
        for _ in range(rng.randint(2, 5)):
            c, h, _w = shape
            cap = channel_cap(h)
            act = rng.choice(ACTS)
            kind = rng.random()
            s = 2 if rng.random() < 0.25 and h >= 4 else 1
            cout = c if rng.random() < 0.4 and c % 8 == 0 else self.ch(8, cap)
            if kind < 0.40:
                x, shape = self.ibn(x, shape, cout, rng.choice([1, 3, 4, 6, 6]), rng.choice([3, 3, 5, 7]), s,
                                    rng.choice(["relu", "relu6", "hardswish", "swish"]),
                                    rng.choice([None, None, "hardsigmoid", "sigmoid"]))
            elif kind < 0.62:
                x, shape = self.basic(x, shape, cout, s, rng.choice(["relu", "relu", "relu6", None]),
                                      rng.random() < 0.5, rng.choice([0, 0, 8, 16, 24, 32, 48, 64]))
            elif kind < 0.72:
                x, shape = self.fused(x, shape, cout, rng.choice([1, 2, 4]), 3, s, act)
            elif kind < 0.84:
                x, shape = self.conv(x, shape, cout, rng.choice([1, 3, 3, 5, 7]), s, 1, act)
            elif kind < 0.90 and h >= 4:
                x, shape = self.pool(x, shape)
            elif kind < 0.95 and c % (16 if self.aligned else 2) == 0 and c >= 16:
                x, shape = self.shuffle_unit(x, shape, rng.choice(["relu", "relu"]))
            else:
                x, shape = self.branches(x, shape, act)
        if rng.random() < 0.25:
            x, shape = self.head(x, shape, rng.choice([10, 100, 1000]))
        out = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, *shape])
        graph = helper.make_graph(self.nodes, "chain", [inp], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def build_chain(seed: int) -> onnx.ModelProto:
    return ChainBuilder(seed).build()
