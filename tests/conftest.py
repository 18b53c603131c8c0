"""Shared fixtures: real architectures (tests/zoo.py, from committed skeletons) and in-code models (tests/builders.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make `import zoo` / `import builders` work from any test subfolder (tests/passes/...).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402


@pytest.fixture
def zoo_model():
    """Factory: ``zoo_model("resnet18")`` -> Path to a full ONNX model of that architecture.

    The committed skeleton (``tests/skeletons/``) filled with seeded random weights, cached
    (see ``zoo.model_path``); no torch needed.  ``zoo_model("mobilenet_v2", dynamic_batch=True)``
    gives the variant whose input dim 0 is the symbolic ``"N"``.
    """

    def get(name: str, *, dynamic_batch: bool = False) -> Path:
        return zoo.model_path(name, dynamic_batch=dynamic_batch)

    return get


@pytest.fixture(autouse=True)
def _user_targets(tmp_path_factory, monkeypatch):
    """Every test gets an empty per-user target folder (never the developer's own)."""
    monkeypatch.setenv("ARCHPASS_TARGETS", str(tmp_path_factory.mktemp("user-targets")))
