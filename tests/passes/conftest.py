"""Make the shared helpers of the pass tests (apply_helpers, resize_helpers) importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
