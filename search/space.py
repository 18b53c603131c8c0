"""The search space: which rewrites a trial may pick, defined by run.

Sites change as a recipe grows (a fused block has no expand layer, ``dw_to_dense``
makes new channel groups), so the space is not a fixed list of parameters: a trial
walks the passes in a fixed order and asks each for its sites on the structure *so far*,
suggesting one parameter per site it may change:

1. ``resolution`` (only with ``resolutions``): one of the given input sizes;
2. ``width_multiplier``: one global multiplier from a short list;
3. ``fuse_ibn``: per IBN block, fuse or not;
4. ``dw_to_dense`` (only when asked for): per depthwise conv, convert or not;
5. ``channels``: per adjustable channel group, a factor from a short list; the count is
   the group's current size times the factor, snapped to a multiple of the target's
   parallelism (so every candidate count is one of a handful of multiples around the
   original).

Every parameter has a fixed distribution whatever the trial chose before (Optuna's
samplers require it), and the neutral value of each (multiplier 1, factor 1, no
fusion) emits no rewrite, so the unchanged model is one point of the space.  Sites
are read through :func:`pass_sites`, the one place that knows the pass contract's
site format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from archpass.errors import ArchpassError
from archpass.passes.engine import plan
from archpass.recipe import Recipe, Rewrite
from archpass.structure import Structure

#: Passes the default space draws from; ``dw_to_dense`` and ``resolution`` are opt-in.
DEFAULT_PASSES = ("width_multiplier", "fuse_ibn", "channels")
SEARCHABLE = ("resolution", "width_multiplier", "fuse_ibn", "dw_to_dense", "channels")
MULTIPLIERS = (0.5, 0.625, 0.75, 0.875, 1.0)
FACTORS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25)


class SpaceError(ArchpassError):
    """The search space cannot be built as asked (unknown pass, unknown frozen site)."""


@dataclass(frozen=True)
class SiteRef:
    """One site as the search sees it: pass, kind, id (None: whole model), typed choice domains."""

    pass_name: str
    kind: str
    id: str | None
    domains: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def allows(self, key: str, value: Any) -> bool:
        d = self.domains.get(key)
        return d is None or d.contains(value)

    @property
    def key(self) -> str:
        return f"{self.pass_name}:{self.id}" if self.id is not None else self.pass_name


def pass_sites(pass_name: str, structure: Structure) -> list[SiteRef]:
    """The sites of a registered pass on ``structure`` (the one reader of the pass contract's sites)."""
    from archpass.passes.base import get_pass

    return [SiteRef(pass_name, s.kind, s.id, s.domains) for s in get_pass(pass_name).sites(structure)]


def snap(channels: float, parallelism: int) -> int:
    """To the nearest multiple of ``parallelism`` (halves up), never below it."""
    return max(parallelism, int(channels / parallelism + 0.5) * parallelism)


@dataclass(frozen=True)
class Space:
    """A curated space over one model's structure for one target."""

    structure: Structure
    parallelism: int = 8
    passes: tuple[str, ...] = DEFAULT_PASSES
    frozen: frozenset[str] = frozenset()
    multipliers: tuple[float, ...] = MULTIPLIERS
    factors: tuple[float, ...] = FACTORS
    resolutions: tuple[int, ...] = ()
    granularity: str = "group"  # channel counts per adjustable "group", or per "stage" (width_multiplier stage sites)
    #: no rewrite may leave a layer narrower than this (0: no floor); retrain mode sets it to the
    #: original's narrowest layer, where the zero-shot guard's score sits (:func:`width_floor`)
    min_width: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, structure: Structure, *, parallelism: int = 8, passes: Sequence[str] | None = None,
              freeze: Iterable[str] = (), resolutions: Sequence[int] = (),
              multipliers: Sequence[float] = MULTIPLIERS, factors: Sequence[float] = FACTORS,
              granularity: str = "group", min_width: int = 0) -> "Space":
        """Validate the user's restrictions against the registered passes and this model's sites."""
        from archpass.passes.base import registry

        known = registry()
        if passes is None:
            chosen = list(DEFAULT_PASSES) + (["resolution"] if resolutions else [])
        else:
            chosen = [p.strip() for p in passes if p.strip()]
            for p in chosen:
                if p not in known:
                    raise SpaceError(f"--passes names an unknown pass '{p}'", f"known passes: {', '.join(known)}")
                if p not in SEARCHABLE:
                    raise SpaceError(f"pass '{p}' has no search space", f"searchable passes: {', '.join(SEARCHABLE)}")
        if "resolution" in chosen and not resolutions:
            raise SpaceError("the resolution pass needs candidate sizes", "add --resolutions 160,192,224")
        if resolutions and any(int(r) < 1 for r in resolutions):
            raise SpaceError(f"resolutions must be positive integers, got {list(resolutions)}", "e.g. --resolutions 160,192,224")
        if "resolution" in chosen and resolutions and not pass_sites("resolution", structure):
            from archpass.passes.resolution import fixed_reason

            why = fixed_reason(structure) or "the resolution pass has no site in this model"
            raise SpaceError(f"--resolutions: the input size of this model cannot change ({why})",
                             "drop --resolutions")
        if parallelism < 1:
            raise SpaceError(f"parallelism must be at least 1, got {parallelism}", "fix the target's parallelism")
        freeze = [f.strip() for f in freeze if f and f.strip()]
        ids = _all_site_ids(structure)
        for f in freeze:
            if f not in ids:
                import difflib

                near = difflib.get_close_matches(f, sorted(x for x in ids if x), n=3, cutoff=0.5)
                raise SpaceError(f"--freeze names a site this model does not have: '{f}'",
                                 f"nearest: {', '.join(near)}" if near else
                                 "use block, group, layer or stage ids from `archpass inspect --json`, or a pass name")
        for p in ("width_multiplier", "resolution"):
            site = next((x for x in pass_sites(p, structure) if x.id is None), None) if p in chosen else None
            if site is None:
                continue
            key, values, flag = (("multiplier", list(multipliers) + list(factors), "multiplier") if p == "width_multiplier"
                                 else ("height", list(resolutions), "--resolutions"))
            bad = [v for v in values if not site.allows(key, v)]
            if bad:
                d = site.domains[key]
                raise SpaceError(f"{flag} {bad[0]} is outside what this model allows ({d.describe()})",
                                 f"use values within {d.describe().split(' in ')[-1]}")
        if granularity not in ("group", "stage"):
            raise SpaceError(f"unknown channel granularity '{granularity}'", "use group or stage")
        if granularity == "stage" and "channels" in chosen and (
                "width_multiplier" not in chosen
                or not any(x.id is not None for x in pass_sites("width_multiplier", structure))):
            # per-stage counts are width_multiplier stage sites: without that pass, or on a model
            # without stages (transformers: the width could only change everywhere at once, which
            # the retrain guard's width floor refuses on Swin-T), per group
            granularity = "group"
        ordered = tuple(p for p in SEARCHABLE if p in chosen)
        return cls(structure, int(parallelism), ordered, frozenset(freeze), tuple(float(m) for m in multipliers),
                   tuple(float(f) for f in factors), tuple(int(r) for r in resolutions), granularity, int(min_width))

    def is_frozen(self, site: SiteRef) -> bool:
        fr = self.frozen
        return site.pass_name in fr or (site.id is not None and site.id in fr) or site.key in fr

    def empty_reason(self) -> str | None:
        """Why this space has nothing to try on the model (None when it has something)."""
        for p in self.passes:
            if p == "resolution" and [r for r in self.resolutions if (r, r) != self.structure.input_hw]:
                if any(not self.is_frozen(s) for s in pass_sites(p, self.structure)):
                    return None
            elif p != "resolution" and any(not self.is_frozen(s) for s in pass_sites(p, self.structure)):
                return None
        what = ", ".join(self.passes) or "no pass"
        why = f"no site of {what} applies to this model" + (" outside the frozen sites" if self.frozen else "")
        from archpass.analysis import QUANTIZED_PREFIX

        quantized = [n for n in self.structure.notes if n.startswith(QUANTIZED_PREFIX)]
        return why + (f" ({quantized[0]})" if quantized else "")

    # ------------------------------------------------------------------ define by run
    def suggest(self, trial) -> tuple[Recipe, Structure]:
        """The recipe a trial picks (an Optuna Trial or FixedTrial) and the structure it
        gives; the structure is rewritten as the recipe grows, so later passes see the
        sites that exist then.  Raises RecipeError when a pick is invalid."""
        s = self.structure
        rewrites: list[Rewrite] = []
        widths = {l.id: l.cout for l in s.layers}  # a layer already narrower than the floor may stay so

        def add(*rws: Rewrite) -> None:  # rewrite the structure so far (raises RecipeError if invalid)
            nonlocal s
            if rws:
                rewrites.extend(rws)
                s = plan(s, Recipe(rws)).structure
                if self.min_width:
                    narrow = [l for l in s.layers if l.cout < min(self.min_width, widths.get(l.id, l.cout))]
                    if narrow:
                        from archpass.errors import RecipeError

                        raise RecipeError(f"layer {narrow[0].id} would have {narrow[0].cout} channels, fewer than "
                                          f"the floor of {self.min_width}", "keep it wider")

        for p in self.passes:
            sites = [x for x in pass_sites(p, s) if not self.is_frozen(x)]
            if p == "resolution":
                if sites and self.resolutions:
                    hw = s.input_hw
                    r = trial.suggest_categorical("resolution", list(self.resolutions))
                    if (r, r) != tuple(hw):
                        add(Rewrite("resolution", None, {"height": r, "width": r}))
            elif p == "width_multiplier":
                if any(x.id is None for x in sites):
                    m = trial.suggest_categorical("width_multiplier", list(self.multipliers))
                    if m != 1.0:
                        add(Rewrite("width_multiplier", None, {"multiplier": m, "parallelism": self.parallelism}))
                if self.granularity == "stage":
                    batch = []
                    for x in sites:
                        if x.id is None:
                            continue
                        f = trial.suggest_categorical(f"width_multiplier:{x.id}", list(self.factors))
                        if f != 1.0:
                            batch.append(Rewrite("width_multiplier", x.id, {"multiplier": f, "parallelism": self.parallelism}))
                    add(*batch)
            elif p in ("fuse_ibn", "dw_to_dense"):
                batch = [Rewrite(p, x.id) for x in sites if trial.suggest_categorical(f"{p}:{x.id}", [False, True])]
                add(*batch)
            elif p == "channels" and self.granularity == "group":
                batch = []
                for x in sites:
                    f = trial.suggest_categorical(f"channels:{x.id}", list(self.factors))
                    cur = s.group(x.id).channels
                    new = cur if f == 1.0 else snap(cur * f, self.parallelism)
                    if new != cur and x.allows("channels", new):
                        batch.append(Rewrite("channels", x.id, {"channels": new}))
                add(*batch)
        return Recipe(tuple(rewrites)), s

    def neutral_params(self) -> dict[str, Any]:
        """Parameters that pick the unchanged model (enqueued as a study's first trial)."""
        params: dict[str, Any] = {}
        s = self.structure
        for p in self.passes:
            for x in pass_sites(p, s):
                if self.is_frozen(x):
                    continue
                if p == "resolution" and s.input_hw and s.input_hw[0] in self.resolutions:
                    params["resolution"] = s.input_hw[0]
                elif p == "width_multiplier" and x.id is None:
                    params["width_multiplier"] = 1.0
                elif p == "width_multiplier" and self.granularity == "stage":
                    params[f"width_multiplier:{x.id}"] = 1.0
                elif p in ("fuse_ibn", "dw_to_dense"):
                    params[f"{p}:{x.id}"] = False
                elif p == "channels" and self.granularity == "group":
                    params[f"channels:{x.id}"] = 1.0
        return params

    def describe(self) -> dict:
        return {"passes": list(self.passes), "frozen": sorted(self.frozen), "parallelism": self.parallelism,
                "granularity": self.granularity, "min_width": self.min_width,
                "multipliers": list(self.multipliers), "factors": list(self.factors),
                "resolutions": list(self.resolutions)}


def width_floor(structure: Structure, outputs=()) -> int:
    """The original's narrowest layer (output channels), not counting layers that write a
    graph output (``outputs``: their width is the task's)."""
    widths = [l.cout for l in structure.layers if l.output not in set(outputs)]
    return min(widths) if widths else 0


def _all_site_ids(structure: Structure) -> set[str]:
    """Everything ``--freeze`` may name: pass names, block/group/layer/stage ids, PASS:ID."""
    from archpass.passes.base import registry

    ids: set[str] = set(registry())
    ids.update(b.id for b in structure.blocks)
    ids.update(g.id for g in structure.groups)
    ids.update(l.id for l in structure.layers)
    ids.update(st.id for st in structure.stages)
    for p in SEARCHABLE:
        for x in pass_sites(p, structure):
            ids.add(x.key)
    return ids


def recipe_key(recipe: Recipe | Mapping) -> str:
    """A canonical string for a recipe (cache key, trial attribute)."""
    import json

    doc = recipe.to_json() if isinstance(recipe, Recipe) else recipe
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
