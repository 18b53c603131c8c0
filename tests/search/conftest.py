"""Make the search tests' helpers importable; the small-model fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_helpers import ibn_net  # noqa: E402


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save_model(ibn_net(), str(path))
    return path
