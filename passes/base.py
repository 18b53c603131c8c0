"""The contract every rewrite pass follows.

A pass is *match → check → rewrite*, on two levels that must agree exactly:

* ``sites(structure)`` lists where the pass applies (:class:`Site`) and what it may
  choose there: one typed :data:`Domain` per choice key (:class:`IntDomain`,
  :class:`FloatDomain`, :class:`CategoricalDomain`) with finite bounds a sampler reads
  directly, and the value the model has now (``current``);
* ``check(structure, site, choice)`` returns a :class:`Match` (everything the rewrite
  needs, computed once) or one sentence saying why the choice does not apply (the recipe
  validator shows it to the user).  A value outside the site's domain is refused;
* ``apply_shapes(structure, match)`` rewrites the analyzed :class:`Structure` alone (no
  ONNX, no weights).  The search scores thousands of candidates through this path, so it
  must be fast (well under a millisecond) and give exactly the layer shapes the ONNX path
  emits;
* ``apply_graph(graph, structure, match)`` edits an onnx-graphsurgeon graph in place
  (rewire only; the engine runs one ``cleanup().toposort()`` at the end).  ``structure``
  is the structure *before* this rewrite (the one ``check`` saw), so ids resolve to nodes
  and tensors of the current graph.  Nodes it creates or changes carry a provenance tag
  (see :func:`tag`).

The engine calls ``check`` once per rewrite and hands its Match to both apply methods;
pass bodies never call ``check`` again.  Pass instances hold no state: the registered
instance is shared by every caller (threads, search trials), so everything a rewrite
computes travels in its Match.

Both levels return whether the rewrite is exact (same function) or lossy.
Pre/post-conditions (checker, shape inference, numerical checks) live in the engine
and the tests, not in pass bodies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

import numpy as np

from archpass.structure import Structure

PROVENANCE_ATTR = "_archpass_provenance"  # Python attribute on graphsurgeon nodes, see tag()

#: Site kinds: what a site id names.  ``stage`` sites are stage ids or None (the whole model).
SITE_KINDS = ("block", "group", "layer", "stage", "model")


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (an integral float too, as JSON may give), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def as_real(value: Any) -> float | None:
    """``value`` as a finite float (ints included, booleans not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class IntDomain:
    """The integers ``low..high`` (inclusive) reachable as ``low + k*step``; ``current`` is
    the value the model has now."""

    low: int
    high: int
    step: int = 1
    current: int | None = None

    def contains(self, value: Any) -> bool:
        v = as_int(value)
        return v is not None and self.low <= v <= self.high and (v - self.low) % self.step == 0

    def describe(self) -> str:
        return f"an integer in {self.low}..{self.high}" + (f" in steps of {self.step}" if self.step != 1 else "")

    def to_json(self) -> dict:
        return {"type": "int", "low": self.low, "high": self.high, "step": self.step, "current": self.current}


@dataclass(frozen=True)
class FloatDomain:
    """The reals ``low..high`` (inclusive); ``log`` says a sampler should draw on a log scale."""

    low: float
    high: float
    log: bool = False
    current: float | None = None

    def contains(self, value: Any) -> bool:
        v = as_real(value)
        return v is not None and self.low <= v <= self.high

    def describe(self) -> str:
        return f"a number in {self.low:g}..{self.high:g}"

    def to_json(self) -> dict:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log, "current": self.current}


@dataclass(frozen=True)
class CategoricalDomain:
    """One of ``values``."""

    values: tuple
    current: object = None

    def contains(self, value: Any) -> bool:
        return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def to_json(self) -> dict:
        return {"type": "categorical", "values": list(self.values), "current": self.current}


Domain = Union[IntDomain, FloatDomain, CategoricalDomain]


def outside(key: str, domain: Domain, value: Any) -> str | None:
    """Why ``value`` is not in ``domain`` (one sentence naming ``key``), or None."""
    return None if domain.contains(value) else f"{key} must be {domain.describe()}, got {value!r}"


@dataclass(frozen=True)
class Site:
    """Where a pass can apply.  ``kind`` is one of :data:`SITE_KINDS`; ``id`` is a block,
    group, layer or stage id (None only for whole-model sites); ``domains`` maps each
    choice key to its typed domain ({} when the pass takes no choice)."""

    pass_name: str
    kind: str
    id: str | None
    domains: Mapping[str, Domain] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        return {"pass": self.pass_name, "kind": self.kind, "site": self.id,
                "domains": {k: d.to_json() for k, d in self.domains.items()}, "note": self.note}


@dataclass(frozen=True)
class Match:
    """What ``check()`` found at a site for a choice: everything apply_shapes/apply_graph
    need, computed once.  ``found`` is pass-specific (the layers, the new group sizes, the
    propagated Structure, ...)."""

    pass_name: str
    site: str | None
    choice: Mapping[str, Any]
    found: Mapping[str, Any] = field(default_factory=dict)


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
    """Base class; subclasses set the class attributes and implement the four methods.
    Subclasses keep no instance state (see the module doc)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `archpass passes`
    exactness: ClassVar[str]  # "exact", "lossy", or a short phrase such as "exact when rounding up"
    site_kind: ClassVar[str]  # one of SITE_KINDS
    choice_keys: ClassVar[tuple[str, ...]] = ()  # recipe keys besides "pass" and "site"

    def sites(self, structure: Structure) -> list[Site]:
        raise NotImplementedError

    def check(self, structure: Structure, site: str | None, choice: Mapping[str, Any]) -> Match | str:
        raise NotImplementedError

    def apply_shapes(self, structure: Structure, match: Match) -> ShapeResult:
        raise NotImplementedError

    def apply_graph(self, graph, structure: Structure, match: Match) -> GraphResult:
        raise NotImplementedError

    def site(self, kind_id: str | None, domains: Mapping[str, Domain] | None = None, note: str = "") -> Site:
        """A :class:`Site` of this pass (shorthand for the implementations)."""
        return Site(self.name, self.site_kind, kind_id, dict(domains or {}), note)

    def match(self, site: str | None, choice: Mapping[str, Any], **found: Any) -> Match:
        """A :class:`Match` of this pass (shorthand for the implementations)."""
        return Match(self.name, site, dict(choice), found)


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
