"""The contract every rewrite pass follows.

A pass is *match → check → rewrite*, on two levels that must agree exactly:

* ``sites(structure)`` lists where the pass applies and what it allows there;
* ``check(structure, site, choice)`` returns ``None`` when the choice is valid there,
  or one sentence saying why not (the recipe validator shows it to the user);
* ``apply_shapes(structure, site, choice)`` rewrites the analyzed :class:`Structure`
  alone (no ONNX, no weights).  The search scores thousands of candidates through this
  path, so it must be fast (well under a millisecond) and give exactly the layer shapes
  the ONNX path emits;
* ``apply_graph(graph, structure, site, choice)`` edits an onnx-graphsurgeon graph in
  place (rewire only; the engine runs one ``cleanup().toposort()`` at the end).
  ``structure`` is the structure *before* this rewrite, so ids resolve to nodes and
  tensors of the current graph.  Nodes it creates or changes carry a provenance tag
  (see :func:`tag`).

Both levels return whether the rewrite is exact (same function) or lossy.
Pre/post-conditions (checker, shape inference, numerical checks) live in the engine
and the tests, not in pass bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from archpass.structure import Structure

PROVENANCE_ATTR = "_archpass_provenance"  # Python attribute on graphsurgeon nodes, see tag()


@dataclass(frozen=True)
class Site:
    """Where a pass can apply: ``id`` is a block, group or layer id (None for whole-model
    passes), ``allows`` describes the valid choices (e.g. ``{"channels": {"min": 1}}``)."""

    pass_name: str
    id: str | None
    allows: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        return {"pass": self.pass_name, "site": self.id, "allows": dict(self.allows), "note": self.note}


@dataclass(frozen=True)
class ShapeResult:
    """Outcome of a shape-only rewrite."""

    structure: Structure
    modified: bool
    exact: bool
    before: Mapping[str, Any] = field(default_factory=dict)  # short shape summary of the site
    after: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphResult:
    modified: bool
    exact: bool


class Pass:
    """Base class; subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `archpass passes`
    exactness: ClassVar[str]  # "exact", "lossy", or a short phrase such as "exact when rounding up"
    site_kind: ClassVar[str]  # "block", "group", "layer" or "model"
    choice_keys: ClassVar[tuple[str, ...]] = ()  # recipe keys besides "pass" and "site"

    def sites(self, structure: Structure) -> list[Site]:
        raise NotImplementedError

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> str | None:
        raise NotImplementedError

    def apply_shapes(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> ShapeResult:
        raise NotImplementedError

    def apply_graph(self, graph, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> GraphResult:
        raise NotImplementedError


def tag(node, pass_name: str, site: str | None) -> None:
    """Mark a graphsurgeon node as produced or changed by a pass.

    ONNX forbids unknown attributes on standard ops, so the tag rides on the Python
    object; after export the engine writes it into the node's ``doc_string`` (shown by
    Netron) and into the ``archpass.provenance`` map of the model's metadata_props
    (which survives re-canonicalization, since node names are kept)."""
    label = f"{pass_name}:{site or '*'}"
    tags = list(getattr(node, PROVENANCE_ATTR, ()))
    if label not in tags:
        tags.append(label)
    setattr(node, PROVENANCE_ATTR, tags)


def provenance(node) -> list[str]:
    return list(getattr(node, PROVENANCE_ATTR, ()))


_REGISTRY: dict[str, Pass] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to recipes, the search and the CLI."""
    _REGISTRY[cls.name] = cls()
    return cls


def registry() -> Mapping[str, Pass]:
    from archpass.passes import _load_all  # import every pass module once

    _load_all()
    return dict(_REGISTRY)


def get_pass(name: str) -> Pass:
    reg = registry()
    if name not in reg:
        from archpass.errors import RecipeError

        raise RecipeError(f"unknown pass '{name}'", f"known passes: {', '.join(sorted(reg))}")
    return reg[name]
