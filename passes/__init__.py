"""Rewrite passes: one per module, registered by name (see :mod:`archpass.passes.base`)."""

from __future__ import annotations

import importlib

# Every pass module, in the order `archpass passes` lists them.
PASS_MODULES = ["fuse_ibn", "channels", "width_multiplier", "dw_to_dense", "resolution"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in PASS_MODULES:
        try:
            importlib.import_module(f"archpass.passes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"archpass.passes.{name}":
                raise
    _loaded = True
