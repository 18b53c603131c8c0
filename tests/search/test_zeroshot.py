"""The zero-shot trainability score: deterministic for a seed, size-independent in depth and
for fusion, and low for architectures that really damage trainability (collapsed channels,
width x0.25, an 8-channel bottleneck, dead activations) — the default retrain guard rejects those."""

from __future__ import annotations

import numpy as np
import pytest

from archpass.analysis import analyze
from archpass.model import load_model, model_from_proto
from archpass.passes.engine import apply_recipe
from archpass.recipe import Recipe, Rewrite
from archpass.search.fidelity import trainability
from archpass.search.guard import PROXY_TOLERANCE, proxy_guard
from archpass.search.zeroshot import EPS, _samples_channels_positions, code_score, layer_scores, naswot_logdet
from builders import NetBuilder


def _net(width: int = 32, blocks: int = 2, *, dead: bool = False, bottleneck: int | None = None):
    b = NetBuilder((1, 3, 16, 16), seed=0)
    if dead:  # the input never reaches the network: every activation code is the same for every input
        zero = b.tensor("zero", np.zeros((1,), np.float32))
        b.x = b.node("Mul", [b.x, zero], "kill")
    b.conv(width, 3, 1, act="relu")
    for i in range(blocks):
        b.ibn(bottleneck if (bottleneck and i == blocks // 2) else width, expand=4, act="relu")
    return model_from_proto(b.head(10).build())


def test_deterministic_for_a_seed():
    m = _net(16)
    a, b = trainability(m, seed=1, batch=16), trainability(m.proto, seed=1, batch=16)
    assert a == b
    assert trainability(m, seed=2, batch=16) != a


def test_code_score_bounds():
    rng = np.random.default_rng(0)
    distinct = rng.random((32, 4096)) > 0.5
    same = np.ones((32, 64), bool)
    assert code_score(distinct) <= 0
    assert code_score(same) == pytest.approx((31 * np.log(EPS) + np.log(32 + EPS)) / 32)
    assert code_score(distinct) > code_score(distinct[:, :8]) > code_score(same)


def test_score_does_not_grow_with_depth_unlike_naswot():
    shallow, deep = _net(32, 1), _net(32, 4)
    assert naswot_logdet(deep, batch=16) > naswot_logdet(shallow, batch=16) + 5  # the paper's score counts layers
    s, d = (np.mean([trainability(m, seed=k, batch=16) for k in range(3)]) for m in (shallow, deep))
    # more layers of the same width do not raise it (deeper layers of a random ReLU net see inputs
    # more alike, so it may fall a little: that is signal propagation, not a count)
    assert d <= s + 0.05


def test_one_score_per_layer_the_network_score_is_the_weakest():
    m = _net(32, 2, bottleneck=8)
    scores = layer_scores(m, seed=0, batch=16)
    # every conv/gemm layer but the classifier (its width is the number of classes)
    assert set(scores) == {l.id for l in analyze(m).layers} - {"head_fc"}
    assert trainability(m, seed=0, batch=16) == min(scores.values())
    narrow = [l.id for l in analyze(m).layers if l.cout == 8]
    assert narrow and min(scores, key=scores.get) in narrow


@pytest.mark.parametrize("damage", ["dead", "bottleneck8"])
def test_damaged_builder_nets_score_lower(damage):
    good = np.mean([trainability(_net(32, 3), seed=k, batch=16) for k in range(2)])
    bad_net = _net(32, 3, dead=True) if damage == "dead" else _net(32, 3, bottleneck=8)
    bad = np.max([trainability(bad_net, seed=k, batch=16) for k in range(2)])
    assert bad < good - 2 * PROXY_TOLERANCE


def test_linear_layers_code_their_last_axis():
    """A conv's channels are axis 1; a Gemm's or MatMul's are the last axis, whether it runs
    over [N, H, W, C] or over the flattened [N*H*W, C] rows an export writes."""
    x = np.arange(2 * 5 * 5 * 7).reshape(2, 5, 5, 7).astype(np.float32)
    nhwc = _samples_channels_positions(x, "MatMul", 2)
    assert nhwc.shape == (2, 7, 25)
    np.testing.assert_array_equal(nhwc[1, 3], x[1, :, :, 3].reshape(-1))
    rows = _samples_channels_positions(x.reshape(50, 7), "Gemm", 2)  # the same data, flattened
    np.testing.assert_array_equal(rows, nhwc)
    assert _samples_channels_positions(np.zeros((4, 10)), "Gemm", 4).shape == (4, 10, 1)  # after a flatten
    nchw = np.zeros((2, 3, 4, 4))
    assert _samples_channels_positions(nchw, "Conv", 2).shape == (2, 3, 16)


@pytest.mark.slow
def test_convnext_scores_every_layer(zoo_model):
    """ConvNeXt's Linears run over the positions of each image: 3136 rows per image in the
    first stage, which counted as samples once asked for a 100352 x 100352 kernel."""
    m = load_model(zoo_model("convnext_tiny"))
    scores = layer_scores(m, seed=0, batch=8)
    layers = [l for l in analyze(m).layers if l.op != "Conv"]
    assert len(layers) > 30
    assert set(scores) >= {l.id for l in layers[:-1]}
    assert all(np.isfinite(v) and v <= 0 for v in scores.values())


@pytest.fixture(scope="module")
def mbv2(zoo_model):
    m = load_model(zoo_model("mobilenet_v2"))
    return m, analyze(m)


@pytest.fixture(scope="module")
def zoo_model():  # module-scoped twin of tests/conftest.py's fixture (the guard is built once)
    import zoo

    return lambda name: zoo.model_path(name)


def test_default_guard_on_mobilenet_v2_passes_fusion_and_rejects_real_damage(mbv2):
    model, s = mbv2
    guard = proxy_guard(model, s)
    assert guard.threshold == pytest.approx(guard.baseline - PROXY_TOLERANCE)
    ibn = [b.id for b in s.blocks if b.kind == "ibn"]
    adj = [g.id for g in s.groups if g.adjustable]
    fuse_all = Recipe(tuple(Rewrite("fuse_ibn", b) for b in ibn))
    assert guard.check(fuse_all).ok  # 16 activation layers fewer: NASWOT drops 20 points, this score does not
    assert naswot_logdet(apply_recipe(model, fuse_all, structure=s, verify=False).proto) < \
        naswot_logdet(model) - 10
    damaged = {
        "width x0.25": Recipe((Rewrite("width_multiplier", None, {"multiplier": 0.25, "parallelism": 8}),)),
        "channels at the minimum": Recipe(tuple(Rewrite("channels", g, {"channels": 8}) for g in adj)),
        "bottleneck of 8": Recipe((Rewrite("channels", "group11", {"channels": 8}),)),
    }
    for name, r in damaged.items():
        res = guard.check(r)
        assert not res.ok, f"{name} passed the default guard ({res.score:.3f} >= {res.threshold:.3f})"


def test_half_precision_export_scores_like_its_float32_original():
    """A float16 export: inputs fed in float16, layer outputs exposed with their own type
    (a float32-typed output made onnxruntime refuse the session)."""
    from builders import half_precision

    m32 = _net(16)
    m16 = model_from_proto(half_precision(m32.proto))
    s32, s16 = layer_scores(m32, seed=1, batch=16), layer_scores(m16, seed=1, batch=16)
    assert s16.keys() == s32.keys()
    assert all(np.isfinite(v) for v in s16.values())
    assert trainability(m16, seed=1, batch=16) == pytest.approx(trainability(m32, seed=1, batch=16), abs=0.15)
    assert np.isfinite(naswot_logdet(m16, seed=1, batch=16))
