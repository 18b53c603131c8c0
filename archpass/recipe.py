"""Recipes: an ordered list of rewrites, written by hand or by the search.

A recipe is JSON (YAML accepted)::

    {"rewrites": [
        {"pass": "fuse_ibn", "site": "block3"},
        {"pass": "channels", "site": "group7", "channels": 48},
        {"pass": "width_multiplier", "multiplier": 0.75, "parallelism": 8},
        {"pass": "dw_to_dense", "site": "<layer id>"},
        {"pass": "resolution", "height": 192, "width": 192}
    ]}

Every key besides ``pass`` and ``site`` is the rewrite's *choice*.  This module only
parses and serializes; whether a pass, a site or a choice exists is checked against a
model by the engine (:mod:`archpass.passes.engine`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from archpass.errors import RecipeError

_SCALARS = (str, int, float, bool, type(None))


def _freeze(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, where) for v in value)
    raise RecipeError(f"{where} has a value of type {type(value).__name__}",
                      "choices are numbers, strings, booleans or lists of them")


def _thaw(value: Any) -> Any:
    return list(_thaw(v) for v in value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: a pass, its site (None for whole-model passes) and its choice."""

    pass_name: str
    site: str | None = None
    choice: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "choice", MappingProxyType(dict(sorted(self.choice.items()))))

    def __hash__(self) -> int:
        return hash((self.pass_name, self.site, tuple(self.choice.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Rewrite) and (self.pass_name, self.site, dict(self.choice)) == (
            other.pass_name, other.site, dict(other.choice))

    def to_json(self) -> dict:
        d: dict[str, Any] = {"pass": self.pass_name}
        if self.site is not None:
            d["site"] = self.site
        d.update({k: _thaw(v) for k, v in self.choice.items()})
        return d

    @classmethod
    def from_json(cls, d: Any, index: int = 0) -> "Rewrite":
        where = f"rewrite #{index}"
        if not isinstance(d, Mapping):
            raise RecipeError(f"{where} is a {type(d).__name__}, not an object",
                              'write each rewrite as {"pass": NAME, "site": ID, ...choice}')
        if "pass" not in d or not isinstance(d["pass"], str) or not d["pass"]:
            raise RecipeError(f"{where} has no \"pass\" name", 'add "pass": NAME (see `archpass passes`)')
        site = d.get("site")
        if site is not None and not isinstance(site, str):
            raise RecipeError(f"{where} ({d['pass']}) has a site of type {type(site).__name__}",
                              "site ids are strings as `archpass inspect --json` prints them")
        choice = {str(k): _freeze(v, f"{where} ({d['pass']}) key '{k}'") for k, v in d.items() if k not in ("pass", "site")}
        return cls(d["pass"], site, choice)

    def describe(self) -> str:
        parts = [self.pass_name] + ([self.site] if self.site else [])
        parts += [f"{k}={_thaw(v)}" for k, v in self.choice.items()]
        return " ".join(parts)


@dataclass(frozen=True)
class Recipe:
    rewrites: tuple[Rewrite, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rewrites", tuple(self.rewrites))

    def __len__(self) -> int:
        return len(self.rewrites)

    def __iter__(self):
        return iter(self.rewrites)

    def then(self, *rewrites: Rewrite) -> "Recipe":
        return Recipe(self.rewrites + tuple(rewrites))

    # ------------------------------------------------------------------ serialization
    def to_json(self) -> dict:
        return {"rewrites": [r.to_json() for r in self.rewrites]}

    def dumps(self, fmt: str = "json") -> str:
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(self.to_json(), sort_keys=False)
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, doc: Any) -> "Recipe":
        if isinstance(doc, list):
            items = doc
        elif isinstance(doc, Mapping) and isinstance(doc.get("rewrites"), list):
            extra = sorted(set(doc) - {"rewrites"})
            if extra:
                raise RecipeError(f"recipe has unknown top-level key(s) {', '.join(extra)}",
                                  'a recipe is {"rewrites": [...]}')
            items = doc["rewrites"]
        else:
            raise RecipeError("recipe has no \"rewrites\" list", 'write it as {"rewrites": [{"pass": ..., ...}, ...]}')
        return cls(tuple(Rewrite.from_json(d, i) for i, d in enumerate(items)))

    @classmethod
    def loads(cls, text: str, fmt: str | None = None) -> "Recipe":
        """Parse JSON, or YAML when ``fmt == "yaml"`` or the text is not JSON."""
        if fmt != "yaml":
            try:
                return cls.from_json(json.loads(text))
            except json.JSONDecodeError as exc:
                if fmt == "json":
                    raise RecipeError(f"recipe is not valid JSON ({exc.msg} at line {exc.lineno})",
                                      "fix the syntax") from None
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"recipe is neither valid JSON nor YAML{at}", "fix the syntax") from None
        return cls.from_json(doc)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}", "check the path")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe {path} ({type(exc).__name__})", "pass a JSON or YAML text file") from None
        fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else ("json" if path.suffix.lower() == ".json" else None)
        return cls.loads(text, fmt)

    @classmethod
    def of(cls, rewrites: Iterable[Mapping[str, Any] | Rewrite]) -> "Recipe":
        return cls(tuple(r if isinstance(r, Rewrite) else Rewrite.from_json(r, i) for i, r in enumerate(rewrites)))
