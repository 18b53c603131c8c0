"""Generated networks: the contexts in which runtime targets time their kernels.

A kernel's time on a CPU depends on its context: a kernel at the start of a short
fragment pays the cold input and the conversion into the runtime's blocked layout, and
every kernel of a short fragment runs slower than the same kernel deep inside a whole
network (measured on MobileNetV2 x0.35: the blocks 8-11 cut out as a four-block
fragment take 14% longer than inside the network; cut with a few blocks either side they
take the same).  Predictions are for whole networks, so calibration times kernels inside
whole generated networks (:func:`build_network`): a stem reading an image, stages of
repeated blocks whose widths grow as the resolution falls, and usually a classifier head.

Blocks are built the way CNNs are (inverted residuals with optional squeeze-excitation,
ResNet basic and bottleneck blocks, grouped bottlenecks, fused-IBN, plain convs, pooling,
two-branch concats, ShuffleNet units, classifier heads), in the ONNX forms exporters write
after canonicalization (BatchNorm folded, Clip(0,6), HardSwish, x*Sigmoid(x)...).  Node
names equal their output tensor names, so optimized-graph nodes map back.  A network is a
pure function of its seed.  :func:`build_chain` (short random fragments) is kept for
datasets measured with it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from archpass.costmodel.sampling import channel_cap, channels, loguniform, spatial
from archpass.structure import conv_out

ACTS = ["relu", "relu6", "hardswish", "swish", None]

#: Stage plans (expansion, base width, blocks, stride) of inverted-residual families the
#: templates scale: MobileNetV2-, MnasNet-, EfficientNet- and MobileNetV3-like.
IBN_PLANS = {
    "mobilenet_v2": [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)],
    "mnasnet": [(1, 16, 1, 1), (3, 24, 3, 2), (3, 40, 3, 2), (6, 80, 3, 2), (6, 96, 2, 1), (6, 192, 4, 2), (6, 320, 1, 1)],
    "efficientnet": [(1, 16, 1, 1), (6, 24, 2, 2), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1), (6, 192, 4, 2), (6, 320, 1, 1)],
    "mobilenet_v3": [(1, 16, 1, 1), (4, 24, 2, 2), (3, 40, 3, 2), (6, 80, 4, 2), (6, 112, 2, 1), (6, 160, 3, 2)],
}


class ChainBuilder:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.aligned = False
        self.macs = 0
        self.params = 0

    def ch(self, lo: int, hi: int) -> int:
        """A channel count (a multiple of 8 in aligned chains)."""
        return self.align(channels(self.rng, lo, hi))

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
        self.macs += cout * (c // g) * k * k * shape[1] * shape[2]
        self.params += cout * (c // g) * k * k
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
        return self.residual(y, sh, x, shape, s, act)

    def residual(self, y, sh, x, shape, s, act):
        """``y`` (shape ``sh``) plus the block input ``x`` (shape ``shape``), through a
        strided/projecting 1x1 conv when the shapes differ, then ``act``."""
        sc = x
        if s != 1 or shape[0] != sh[0]:
            sc, _ = self.conv(x, shape, sh[0], 1, s, 1, None)
        y = self.op("Add", [y, sc], "add")
        return self.act(y, act), sh

    def fused(self, x, shape, cout, expand, k, s, act, se=None):
        """A fused inverted residual (what IBN fusion makes of one): a dense ``k`` x ``k``
        expand conv, optional squeeze-excitation, a 1x1 projection, the residual add."""
        c = shape[0]
        y, sh = self.conv(x, shape, self.align(max(8, c * expand)), k, s, 1, act)
        if se:
            y = self.se(y, sh[0], se)
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

    def stem_pool(self, x, shape):
        """ResNet's and ShuffleNet's 3x3 stride-2 max-pooling after the stem."""
        y = self.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
        return y, (shape[0], conv_out(shape[1], 3, 2, 1, 1), conv_out(shape[2], 3, 2, 1, 1))

    def image_input(self, aligned_share: float):
        """Draw whether the network keeps aligned widths and its input resolution (96-256):
        the input's shape and value info."""
        self.aligned = self.rng.random() < aligned_share
        res = self.rng.choice([96, 128, 160, 160, 192, 224, 224, 256])
        shape = (3, res, res)
        return shape, helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *shape])

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
        return self.channel_shuffle(y, shape), shape

    def channel_shuffle(self, x, shape):
        """ShuffleNet's channel shuffle of two groups, as exporters write it: Reshape to
        (1, 2, C/2, H, W), Transpose, Reshape back."""
        c, h, w = shape
        r = self.op("Reshape", [x, self.const(np.array([1, 2, c // 2, h, w]), "s", np.int64)], "reshape")
        t = self.op("Transpose", [r], "transpose", perm=[0, 2, 1, 3, 4])
        return self.op("Reshape", [t, self.const(np.array([1, c, h, w]), "s", np.int64)], "reshape")

    def shuffle_down(self, x, shape, cout, act):
        """ShuffleNetV2 downsampling unit: a strided depthwise 3x3 then 1x1 beside a 1x1,
        strided depthwise 3x3 and 1x1, each branch half of ``cout``, concat, channel shuffle."""
        c = shape[0]
        half = cout // 2
        a, sa = self.conv(x, shape, c, 3, 2, c, None)
        a, sa = self.conv(a, sa, half, 1, 1, 1, act)
        b, sb = self.conv(x, shape, half, 1, 1, 1, act)
        b, sb = self.conv(b, sb, half, 3, 2, half, None)
        b, sb = self.conv(b, sb, half, 1, 1, 1, act)
        y = self.op("Concat", [a, b], "concat", axis=1)
        shape = (2 * half, sa[1], sa[2])
        return self.channel_shuffle(y, shape), shape

    def head(self, x, shape, classes):
        c = shape[0]
        p = self.op("GlobalAveragePool", [x], "gap")
        f = self.op("Flatten", [p], "flatten", axis=1)
        w = self.const(self.np.standard_normal((classes, c)).astype(np.float32) * 0.01)
        b = self.const(np.zeros(classes, np.float32), "b")
        y = self.op("Gemm", [f, w, b], "gemm", transB=1)
        return y, (classes,)

    # ------------------------------------------------------------------ networks
    def build_network(self, max_macs: float = 2.0e9) -> onnx.ModelProto:
        """A whole CNN: stem, 3-6 stages of 1-4 repeated blocks (the first strided), an
        optional wide 1x1 conv and classifier head.  Widths are any integer (as width
        multipliers give) or, in aligned networks, multiples of 8; stages stop before the
        network passes ``max_macs``."""
        rng = self.rng
        self.aligned = rng.random() < 0.5
        res = rng.choice([96, 128, 128, 160, 160, 192, 224, 224, 256])
        shape = (3, res, res)
        x = "input"
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *shape])

        def grow(c: int, lo: float, hi: float) -> int:
            return self.align(max(8, int(round(c * rng.uniform(lo, hi)))))

        c0 = self.ch(8, 64)
        x, shape = self.conv(x, shape, c0, rng.choice([3, 3, 3, 5, 7]), 2, 1, rng.choice(["relu", "relu6", "hardswish", "swish"]))
        if rng.random() < 0.2:
            x, shape = self.pool(x, shape)
        family = rng.random()
        for stage in range(rng.randint(3, 6)):
            c, h, _w = shape
            if h < 3:
                break
            kind = rng.random() if rng.random() < 0.3 else family  # networks mostly keep one block family
            act = rng.choice(["relu", "relu6", "hardswish", "swish"])
            cout = grow(c, 1.0, 2.2)
            repeats = rng.choice([1, 2, 2, 3, 3, 4])
            expand = rng.choice([1, 3, 4, 6, 6])
            k = rng.choice([3, 3, 5, 7])
            se = rng.choice([None, None, "hardsigmoid", "sigmoid"])
            gw = rng.choice([0, 0, 8, 16, 24, 32, 48])
            bottleneck = rng.random() < 0.5
            for i in range(repeats):
                if self.macs > max_macs:
                    break
                s = 2 if i == 0 and (stage > 0 or rng.random() < 0.5) and shape[1] >= 4 else 1
                if kind < 0.45:
                    x, shape = self.ibn(x, shape, cout, expand if (i > 0 or expand > 1 or shape[0] == cout) else 6, k, s,
                                        act, se)
                elif kind < 0.70:
                    x, shape = self.basic(x, shape, cout, s, rng.choice(["relu", "relu", "relu6"]), bottleneck, gw)
                elif kind < 0.82:
                    x, shape = self.fused(x, shape, cout, rng.choice([1, 2, 4]), 3, s, act, se)
                elif kind < 0.90:
                    x, shape = self.conv(x, shape, cout, rng.choice([1, 3, 3, 5]), s, 1, act)
                elif kind < 0.95 and shape[0] % 2 == 0 and shape[0] >= 16 and s == 1:
                    x, shape = self.shuffle_unit(x, shape, "relu")
                else:
                    x, shape = self.branches(x, shape, act) if s == 1 else self.conv(x, shape, cout, 3, s, 1, act)
        if rng.random() < 0.5:
            wide = self.align(int(rng.choice([1.0, 2.0, 4.0, 6.0]) * shape[0]))
            x, shape = self.conv(x, shape, min(wide, 2048), 1, 1, 1, rng.choice(["relu", "relu6", "hardswish"]))
        if rng.random() < 0.7:
            x, shape = self.head(x, shape, rng.choice([10, 100, 1000, 1000, 1000]))
        return self._model(x, inp, shape, "network")

    def build_template(self, se_first: bool = False) -> onnx.ModelProto:
        """A network on the stage plan of a known architecture family, as the passes rewrite
        them: MobileNetV2/MnasNet/EfficientNet/MobileNetV3-like inverted-residual nets (any
        width multiplier, expansion, kernel sizes, SE, activations, early blocks fused) or
        ResNet/ResNeXt/RegNet-like nets (basic, bottleneck or grouped blocks), at input
        resolutions 96-256, with their classifier heads.  ``se_first`` lets the SE blocks
        start in the first, expansion-1 block (style ``template2``; without it a seed's
        network stays what calibration datasets measured for it)."""
        rng = self.rng
        shape, inp = self.image_input(0.6)
        mult = loguniform(rng, 0.25, 1.5)

        def width(c: float) -> int:
            w = max(4, int(round(c * mult)))
            return max(8, int(w + 4) // 8 * 8) if self.aligned else w

        if rng.random() < 0.65:
            act = rng.choice(["relu6", "relu6", "relu", "hardswish", "swish"])
            x, shape = self.conv("input", shape, width(rng.choice([16, 24, 32])), 3, 2, 1, act)
            plan = rng.choice(list(IBN_PLANS.values()))
            # real networks often keep one expansion, kernel size and activation throughout
            uniform = rng.random() < 0.45
            t_all, k_all = rng.choice([4, 6, 6]), rng.choice([3, 3, 5])
            fused_upto = rng.choice([0, 0, 0, 1, 2, 3])  # EfficientNetV2-style fused early stages
            # SE from this stage on (MobileNetV3/EfficientNet; with se_first 0 too: in the
            # first, expansion-1 block, as MobileNetV3-Small and EfficientNet have it)
            se_from = rng.choice([99, 99, 2, 3, 1, 0] if se_first else [99, 99, 2, 3, 1])
            gate = rng.choice(["hardsigmoid", "sigmoid"])
            for i, (t, c, n, s) in enumerate(plan):
                n = max(1, n + rng.choice([-1, 0, 0, 1]))
                t = t if t == 1 else (t_all if uniform else rng.choice([3, 4, 6, 6, 6]))
                k = k_all if uniform else rng.choice([3, 3, 5])
                stage_act = act if uniform or rng.random() < 0.7 else rng.choice(["relu", "hardswish", "swish"])
                cout = width(c)
                for j in range(n):
                    stride = s if j == 0 else 1
                    if t == 1:
                        y, sh = self.conv(x, shape, shape[0], 3, stride, shape[0], stage_act)
                        if i >= se_from:
                            y = self.se(y, sh[0], gate)
                        x, shape = self.conv(y, sh, cout, 1, 1, 1, None)
                    elif i <= fused_upto:
                        x, shape = self.fused(x, shape, cout, rng.choice([1, 4]), k, stride, stage_act,
                                              gate if i >= se_from else None)
                    else:
                        x, shape = self.ibn(x, shape, cout, t, k, stride, stage_act, gate if i >= se_from else None)
            last = rng.choice([960, 1024, 1280, 1280, int(1280 * max(1.0, mult))])
            x, shape = self.conv(x, shape, self.align(last), 1, 1, 1, act)
        else:
            act = rng.choice(["relu", "relu", "relu6"])
            x, shape = self.conv("input", shape, width(rng.choice([32, 64])), rng.choice([3, 7]), 2, 1, act)
            pooled = rng.random() < 0.6  # ResNet: max-pool after the stem; RegNet: a strided first block
            if pooled:
                x, shape = self.stem_pool(x, shape)
            bottleneck = rng.random() < 0.5
            gw = rng.choice([0, 0, 8, 16, 24, 32])
            for i, c in enumerate([64, 128, 256, 512]):
                cout = width(c * (4 if bottleneck and not gw else 1))
                for j in range(rng.choice([1, 2, 2, 3, 4, 6])):
                    if self.macs > 3e9:
                        break
                    x, shape = self.basic(x, shape, cout, 2 if j == 0 and (i > 0 or not pooled) else 1, act, bottleneck, gw)
        x, shape = self.head(x, shape, rng.choice([1000, 1000, 1000, 100, 10]))
        return self._model(x, inp, shape, "template")

    def build_shuffle(self) -> onnx.ModelProto:
        """A ShuffleNetV2-like network: a 3x3 stem to 24 channels and max-pooling, three
        stages of a downsampling unit and 1-8 split units (channel split, 1x1, depthwise
        3x3, 1x1, concat, channel shuffle) at any width multiplier (even widths, as
        ShuffleNetV2 x0.5-x2.0 has: 48-976), a wide 1x1 conv and a classifier reading the
        spatial mean (ReduceMean, as torchvision exports it) or a global pool."""
        rng = self.rng
        shape, inp = self.image_input(0.3)
        mult = loguniform(rng, 0.4, 2.2)
        step = 32 if self.aligned else 4  # both halves even (whole 16-channel blocks when aligned)
        x, shape = self.conv("input", shape, 24, 3, 2, 1, "relu")
        x, shape = self.stem_pool(x, shape)
        for base, repeats in ((116, 4), (232, 8), (464, 4)):
            cout = max(step, int(round(base * mult / step)) * step)
            for j in range(max(1, repeats + rng.choice([-2, -1, 0, 0, 0, 1]))):
                if j == 0:
                    x, shape = self.shuffle_down(x, shape, cout, "relu")
                else:
                    x, shape = self.shuffle_unit(x, shape, "relu")
        x, shape = self.conv(x, shape, 2048 if mult > 1.8 else 1024, 1, 1, 1, "relu")
        classes = rng.choice([1000, 1000, 100, 10])
        if rng.random() < 0.6:
            p = self.op("ReduceMean", [x], "mean", axes=[2, 3], keepdims=0)
            w = self.const(self.np.standard_normal((classes, shape[0])).astype(np.float32) * 0.01)
            b = self.const(np.zeros(classes, np.float32), "b")
            x, shape = self.op("Gemm", [p, w, b], "gemm", transB=1), (classes,)
        else:
            x, shape = self.head(x, shape, classes)
        return self._model(x, inp, shape, "shuffle")

    def build_grouped(self, max_macs: float = 1.0e9, max_params: float = 8e6) -> onnx.ModelProto:
        """A RegNet/ResNeXt-like network of grouped bottlenecks in four stages: bottleneck
        widths from RegNet's quantized linear rule (:func:`regnet_stages`, 24-1024
        channels), a 3x3 stride-2 stem, every stage starting with a strided block, and a
        classifier head.  RegNet-like (70%): bottleneck ratio 1 and a group width of 8-64
        (groups = width / group width, at most 80: many groups in the later stages), squeeze-excitation
        in half of them (RegNetY); ResNeXt-like: the block's output 2 or 4 times its grouped
        3x3's width (24-512 channels), a fixed number of groups (8-64; group width 8-64
        where the width allows).  Past ``max_macs`` a stage keeps only its first block."""
        rng = self.rng
        self.aligned = True
        res = rng.choice([128, 160, 192, 224, 224, 224, 256])
        shape = (3, res, res)
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *shape])
        w0 = rng.choice(range(24, 104, 8))
        wm = rng.uniform(2.0, 2.9)
        depth = rng.randint(10, 22)
        # the slope that makes four stages: round(log_wm(1 + wa (depth - 1) / w0)) == 3
        wa = w0 * (wm ** rng.uniform(2.55, 3.45) - 1) / (depth - 1)
        regnet = rng.random() < 0.7
        ratio = 1 if regnet else rng.choice([2, 4])
        gw = rng.choice([8, 8, 16, 16, 24, 32, 48, 64])
        groups = rng.choice([8, 16, 32, 32, 64])
        se = regnet and rng.random() < 0.5
        act = "relu"
        x, shape = self.conv("input", shape, 32, 3, 2, 1, act)
        for stage in regnet_stages(w0, wa, wm, depth, cap=1024 if regnet else 512):
            w = stage[0]
            if regnet:  # RegNet's group/width compatibility adjustment (at most 80 groups)
                g = min(max(gw, -(-w // 640) * 8), w)
                mid = max(g, int(w + g / 2) // g * g)
            else:  # ResNeXt: a fixed number of groups, group width 8-64 where the width allows
                n = max(1, min(groups, w // 8), -(-w // 64))
                g = max(1, int(round(w / n)))
                mid = g * n
            for i in range(len(stage)):
                if i and (self.macs > max_macs or self.params > max_params):
                    break
                s = 2 if i == 0 and shape[1] >= 4 else 1
                x, shape = self.grouped_block(x, shape, mid * ratio, mid, g, s, act, se)
        x, shape = self.head(x, shape, rng.choice([1000, 1000, 1000, 100, 10]))
        return self._model(x, inp, shape, "grouped")

    def grouped_block(self, x, shape, cout, mid, group_width, s, act, se):
        """RegNet's residual bottleneck: 1x1 to ``mid``, grouped 3x3 (``mid / group_width``
        groups, stride ``s``), optional SE squeezed to a quarter of the input width, 1x1 to
        ``cout``; a strided/projected 1x1 shortcut when the shape changes; ReLU after the add."""
        c = shape[0]
        y, sh = self.conv(x, shape, mid, 1, 1, 1, act)
        y, sh = self.conv(y, sh, mid, 3, s, mid // group_width, act)
        if se:
            p = self.op("GlobalAveragePool", [y], "gap")
            r, rs = self.conv(p, (mid, 1, 1), max(8, int(round(0.25 * c))), 1, 1, 1, "relu")
            r, _ = self.conv(r, rs, mid, 1, 1, 1, "sigmoid")
            y = self.op("Mul", [y, r], "semul")
        y, sh = self.conv(y, sh, cout, 1, 1, 1, None)
        return self.residual(y, sh, x, shape, s, act)

    def _model(self, x: str, inp, shape, name: str) -> onnx.ModelProto:
        out = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, *shape])
        graph = helper.make_graph(self.nodes, name, [inp], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)

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
        return self._model(x, inp, shape, "chain")


def regnet_stages(w0: int, wa: float, wm: float, depth: int, cap: int = 1024) -> list[list[int]]:
    """RegNet's quantized linear widths, block by block (``w0 * wm^round(log_wm((w0 + wa j) / w0))``
    at multiples of 8, at most ``cap``), grouped into stages of equal width."""
    stages: list[list[int]] = []
    for j in range(depth):
        q = round(math.log((w0 + wa * j) / w0) / math.log(wm))
        w = min(cap, max(8, int(round(w0 * wm ** q / 8)) * 8))
        if stages and stages[-1][0] == w:
            stages[-1].append(w)
        else:
            stages.append([w])
    return stages


def build_chain(seed: int) -> onnx.ModelProto:
    """A short random fragment of 2-5 blocks (the older calibration context)."""
    return ChainBuilder(seed).build()


def build_network(seed: int) -> onnx.ModelProto:
    """A whole generated network (the calibration context of runtime targets)."""
    return ChainBuilder(seed).build_network()


def build_template(seed: int) -> onnx.ModelProto:
    """A generated network on a known architecture family's stage plan."""
    return ChainBuilder(seed).build_template()


def build_template2(seed: int) -> onnx.ModelProto:
    """:func:`build_template` whose SE blocks may start in the first, expansion-1 block
    (MobileNetV3-Small's and EfficientNet's first block: depthwise conv, SE, projection)."""
    return ChainBuilder(seed).build_template(se_first=True)


def build_grouped(seed: int) -> onnx.ModelProto:
    """A generated RegNet/ResNeXt-like network of grouped bottlenecks."""
    return ChainBuilder(seed).build_grouped()


def build_shuffle(seed: int) -> onnx.ModelProto:
    """A generated ShuffleNetV2-like network (split, concat and channel-shuffle units)."""
    return ChainBuilder(seed).build_shuffle()


BUILDERS = {"chain": build_chain, "network": build_network, "template": build_template, "template2": build_template2,
            "grouped": build_grouped, "shuffle": build_shuffle}
