"""The zero-shot trainability score (NASWOT) is deterministic for a seed and tells architectures apart."""

from __future__ import annotations

from archpass.model import model_from_proto
from archpass.search.fidelity import trainability
from builders import NetBuilder


def _net(width: int):
    b = NetBuilder((1, 3, 16, 16), seed=0).conv(width, 3, 2, act="relu").ibn(width, expand=4, act="relu")
    return model_from_proto(b.head(10).build())


def test_deterministic_for_a_seed():
    m = _net(16)
    a, b = trainability(m, seed=1, batch=16), trainability(m.proto, seed=1, batch=16)
    assert a == b
    assert trainability(m, seed=2, batch=16) != a


def test_wider_network_scores_higher():
    # more units give more distinct activation codes: NASWOT ranks the wider net above
    assert trainability(_net(32), seed=0, batch=16) > trainability(_net(4), seed=0, batch=16)
