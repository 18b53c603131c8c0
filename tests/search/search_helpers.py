"""Shared helpers of the search tests: a small model and a fake guard."""

from __future__ import annotations

import onnx

from builders import NetBuilder


def ibn_net(seed: int = 0) -> onnx.ModelProto:
    """A tiny MobileNetV2-like network: stem, four inverted bottlenecks, classifier."""
    return (NetBuilder((1, 3, 32, 32), seed=seed)
            .conv(16, 3, 2, act="relu6")
            .ibn(16, expand=4)
            .ibn(24, expand=4, stride=2)
            .ibn(24, expand=4)
            .ibn(40, expand=4, stride=2)
            .head(10)
            .build())


class FakeGuard:
    """Scores a recipe by how many rewrites it has (fewer = more faithful); counts calls."""

    def __init__(self, threshold: float):
        from archpass.search.guard import Guard

        self.calls: list = []

        def scorer(recipe):
            self.calls.append(recipe)
            return 1.0 - 0.01 * len(recipe)

        self.guard = Guard("fidelity", threshold, scorer, baseline=1.0)

    def factory(self, job, model, structure):
        return self.guard
