"""The record of applied rewrites, stored in the output model's ``metadata_props``.

Keys: ``archpass.version``, ``archpass.source_sha256`` and ``archpass.rewrites`` (a JSON
list, one entry per applied rewrite: pass, site, choice, exact, shapes before/after).
Netron and onnxruntime show or ignore metadata_props, so the model stays readable.
"""

from __future__ import annotations

import json

import onnx

PREFIX = "archpass."
PROVENANCE_KEY = "archpass.provenance"


def read_record(proto: onnx.ModelProto) -> dict | None:
    props = {p.key: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}
    if f"{PREFIX}rewrites" not in props:
        return None
    try:
        rewrites = json.loads(props[f"{PREFIX}rewrites"])
    except json.JSONDecodeError:
        rewrites = []
    return {
        "version": props.get(f"{PREFIX}version"),
        "source_sha256": props.get(f"{PREFIX}source_sha256"),
        "recipe": json.loads(props[f"{PREFIX}recipe"]) if f"{PREFIX}recipe" in props else None,
        "rewrites": rewrites,
    }


def write_record(proto: onnx.ModelProto, *, version: str, source_sha256: str, rewrites: list[dict],
                 recipe: dict | None = None) -> None:
    """Replace any previous archpass record in ``proto`` (in place)."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entries = {
        f"{PREFIX}version": version,
        f"{PREFIX}source_sha256": source_sha256,
        f"{PREFIX}rewrites": json.dumps(rewrites, separators=(",", ":")),
    }
    if recipe is not None:
        entries[f"{PREFIX}recipe"] = json.dumps(recipe, separators=(",", ":"))
    for k, v in entries.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
