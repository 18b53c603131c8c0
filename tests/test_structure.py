"""Structure totals: the MACs and weights of compute that is not a layer (other_compute)."""

from __future__ import annotations

from archpass.analysis import analyze
from archpass.model import model_from_proto
from builders import NetBuilder, attention_net, video_net


def test_a_3d_conv_counts_its_macs_and_weights():
    s = analyze(model_from_proto(video_net()))
    assert [l.id for l in s.layers] == ["conv2d"]
    (c,) = s.other_compute
    # each of 8x4x8x8 outputs sums 3 channels x 27 taps
    assert (c.node, c.what, c.macs, c.params) == ("conv3d", "3-D Conv", 8 * 4 * 8 * 8 * 3 * 27, 8 * 81 + 8)
    layer = 16 * 8 * 8 * 32 * 9
    assert s.layer("conv2d").macs == layer and s.macs == layer + c.macs and s.other_macs == c.macs
    assert s.params == 16 * 32 * 9 + c.params
    assert s.totals()["other_macs"] == c.macs and s.totals()["macs"] == s.macs
    assert s.unsupported == ("Conv (3-D)",)  # not the 2-D Conv archpass rewrites


def test_attention_matmuls_einsum_and_conv_transpose_count():
    s = analyze(model_from_proto(attention_net()))
    assert [l.id for l in s.layers] == ["proj"]
    got = {c.node: (c.what, c.macs) for c in s.other_compute}
    assert got == {
        "scores": ("MatMul", 16 * 16 * 32),  # (16x32) @ (32x16)
        "mix": ("Einsum", 16 * 16 * 32),  # b i j k: 1 x 16 x 16 x 32
        # every input pixel (8 channels, 4x4) meets 2 output channels x 4x4 taps
        "up": ("ConvTranspose", 8 * 4 * 4 * 2 * 16),
    }
    assert s.macs == 16 * 32 * 32 + sum(m for _, m in got.values())


def test_a_plain_cnn_has_no_other_compute():
    s = analyze(model_from_proto(NetBuilder((1, 3, 16, 16)).conv(8, 3).ibn(8, expand=4).head(4).build()))
    assert s.other_compute == () and s.macs == sum(l.macs for l in s.layers)
