"""Sampling the shapes the passes can produce, for calibration.

Layers are drawn stage by stage the way CNNs are built: a spatial size (input
resolutions from 96 to 320 and their strided stages), channel counts that grow as the
resolution falls (any integer, as width multipliers produce, with a bias towards
multiples of 8 as channel rounding produces), kernel sizes 1/3/5/7, strides 1/2, dense,
depthwise and grouped convolutions, and classifier gemms.  Everything is a pure function
of the seed, so an interrupted calibration resumes on the same sample list.
"""

from __future__ import annotations

import math
import random

from archpass.structure import conv_out


def loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def channels(rng: random.Random, lo: int, hi: int) -> int:
    c = int(round(loguniform(rng, lo, max(hi, lo + 1))))
    r = rng.random()
    if r < 0.45 and c >= 8:
        c = max(8, int(round(c / 8)) * 8)
    elif r < 0.55 and c >= 16:
        c = max(16, int(round(c / 16)) * 16)
    return max(c, 1)


def spatial(rng: random.Random) -> int:
    res = rng.choice([96, 128, 160, 192, 224, 224, 256, 288, 320])
    depth = rng.choice([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    hw = res
    for _ in range(depth):
        hw = -(-hw // 2)
    return hw


def spatial_any(rng: random.Random) -> int:
    """A spatial size from any input resolution (the resolution pass takes any), halved
    the ways strided layers do: with padding (ceil), without (floor), or by a 3x3 kernel
    without padding (SqueezeNet/Inception-style odd sizes such as 111, 55, 27, 13)."""
    hw = rng.randint(64, 320)
    for _ in range(rng.choice([1, 1, 2, 2, 3, 3, 4, 4, 5])):
        hw = rng.choice([-(-hw // 2), hw // 2, (hw - 1) // 2])
    return max(hw, 1)


def channel_cap(hw: int) -> int:
    """A plausible widest tensor at a spatial size (MobileNet/ResNet-like growth)."""
    return int(min(2560, max(48, 64 * 112 / hw * 2.5)))


def sample_layer(rng: random.Random, any_size: bool = False) -> dict:
    """One conv/dwconv/gemm layer spec (:meth:`Kernel.spec` form); ``any_size`` draws
    spatial sizes from any resolution (:func:`spatial_any`)."""
    r = rng.random()
    if r < 0.06:
        cin = channels(rng, 64, 2560)
        cout = rng.choice([10, 100, 1000, 1000, 1001, channels(rng, 16, 2048)])
        return {"kind": "gemm", "op": "Gemm", "cin": cin, "cout": cout, "kernel": [1, 1], "stride": [1, 1],
                "groups": 1, "in_hw": [1, 1], "out_hw": [1, 1], "act": None, "fused_add": False, "post_act": None}
    hw = spatial_any(rng) if any_size else spatial(rng)
    cap = channel_cap(hw)
    if r < 0.36:  # depthwise
        c = channels(rng, 8, int(cap * 1.5))
        k = rng.choice([3, 3, 3, 5, 5, 7])
        s = rng.choice([1, 1, 1, 2])
        cin, cout, g = c, c, c
    elif r < 0.44:  # grouped (ResNeXt/RegNet)
        gw = rng.choice([8, 16, 24, 32, 48, 64])
        g = max(1, int(loguniform(rng, 1, max(2, cap / gw))))
        cin = cout = gw * g
        k, s = 3, rng.choice([1, 1, 2])
    else:
        k = rng.choice([1, 1, 1, 1, 3, 3, 3, 5, 7])
        s = rng.choice([1, 1, 1, 2]) if k > 1 else rng.choice([1, 1, 1, 1, 2])
        if hw >= 112 and rng.random() < 0.15:  # stems read the image
            cin = 3
        else:
            cin = channels(rng, 8, int(cap * (1.5 if k == 1 else 1)))
        cout = channels(rng, 8, int(cap * (1.5 if k == 1 else 1)))
        g = 1
    pad = k // 2
    out = conv_out(hw, k, s, pad, pad)
    if out < 1:
        out, hw = 1, k
    return {"kind": "dwconv" if g == cin and g > 1 else "conv", "op": "Conv", "cin": cin, "cout": cout,
            "kernel": [k, k], "stride": [s, s], "groups": g, "in_hw": [hw, hw], "out_hw": [out, out],
            "act": rng.choice(["relu", "relu6", "hardswish", "swish", None]), "fused_add": False, "post_act": None}


def sample_layers(n: int, seed: int = 0, any_size: bool = False) -> list[dict]:
    rng = random.Random(seed if not any_size else seed + 7919)
    return [sample_layer(rng, any_size) for _ in range(n)]
