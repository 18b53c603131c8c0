"""The record of applied rewrites, stored in the output model's ``metadata_props``.

Keys: ``archpass.version``, ``archpass.source_sha256`` and ``archpass.rewrites`` (a JSON
list, one entry per applied rewrite: pass, site, choice, exact, shapes before/after),
``archpass.recipe``, and ``archpass.provenance`` (node name -> the ``pass:site`` tags of
the rewrites that made it; :func:`read_provenance` / :func:`write_provenance`).
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


def read_provenance(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """The ``archpass.provenance`` map (node name -> pass tags); empty when absent or malformed."""
    for p in proto.metadata_props:
        if p.key == PROVENANCE_KEY:
            try:
                doc = json.loads(p.value)
            except json.JSONDecodeError:
                return {}
            if not isinstance(doc, dict):
                return {}
            return {str(k): [str(x) for x in v] for k, v in doc.items() if isinstance(v, list)}
    return {}


def write_provenance(proto: onnx.ModelProto, prov: dict[str, list[str]]) -> None:
    """Replace the ``archpass.provenance`` map of ``proto`` (in place)."""
    keep = [p for p in proto.metadata_props if p.key != PROVENANCE_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    p = proto.metadata_props.add()
    p.key, p.value = PROVENANCE_KEY, json.dumps(prov, separators=(",", ":"), sort_keys=True)
