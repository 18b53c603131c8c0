"""The Python API: what the CLI calls, usable directly from a notebook or pipeline.

This facade sits above the core and the subsystems and imports the subsystems lazily,
so ``import archpass`` stays light and the core keeps no dependency on them.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from archpass.analysis import analyze
from archpass.model import Model, load_model
from archpass.structure import Structure

InputShapes = Mapping[str, Sequence[int]] | Sequence[str] | None


def inspect(path: str | os.PathLike, input_shapes: InputShapes = None, target: str | None = None) -> dict:
    """The document ``archpass inspect --json`` prints."""
    model = load_model(path, input_shapes)
    structure = analyze(model)
    return inspect_document(model, structure, target)


def inspect_document(model: Model, structure: Structure, target: str | None = None) -> dict:
    from archpass.record import read_record

    doc = {
        "model": {"path": str(model.path) if model.path else None, "sha256": model.sha256},
        **structure.to_json(),
    }
    doc["notes"] = list(model.notes) + doc["notes"]
    record = read_record(model.proto)
    doc["rewrites"] = record["rewrites"] if record else []
    if record:
        doc["record"] = {k: v for k, v in record.items() if k != "rewrites"}
    if target is not None:
        from archpass.costmodel import estimate, load_target

        doc["estimate"] = estimate(structure, load_target(target)).to_json()
        doc["target"] = target
    return doc
