"""Seed recipes across models of one family: resolve a recipe's sites by position.

A recipe found on one model names its sites by that model's ids (``block7``,
``group12``, a layer's node name).  Another model of the same family (another width,
another resolution, a sibling exported by another tool) has the same architecture at
other ids, or the same ids at other places.  :func:`resolve_recipe` moves each rewrite to
the other model by *where* its site is:

* a block by stage and position in the stage (block k of stage s);
* a layer by its role in its block (``expand``, ``depthwise``, ``project``...), or, outside
  blocks (stem, head), by its position among those layers;
* a channel group by the layer that produces it (its first producer, addressed as above);
* a stage by its index; a whole-model rewrite stays whole-model.

Channel counts and input sizes in choices are scaled by the ratio between the two
models (``channels`` 48 of a 96-channel group becomes 36 of a 72-channel one, rounded to
the multiple of 8 or 4 the source value was on), so the seed means the same on a
narrower or smaller model; ``scale_choices=False`` keeps them as written.

Rewrites resolve one after another against both models *as rewritten so far*, so a
site an earlier rewrite created (the group ``dw_to_dense`` adds) or removed (the expand
layer of a fused block) resolves too.  Each rewrite is checked by applying it on the
target's shape-only path; one that does not resolve or does not apply is left out, with
its reason.  The result lists what resolved and what did not; the search enqueues the
resolved recipe as a first trial (``--seed-recipe``) and the report shows the list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from archpass.errors import ArchpassError
from archpass.passes.engine import apply_recipe_shapes
from archpass.recipe import Recipe, Rewrite
from archpass.structure import Structure

CHANNEL_KEYS = ("channels",)
SIZE_KEYS = ("height", "width")


@dataclass(frozen=True)
class Address:
    """Where a site sits, independent of ids.  ``kind`` is ``block``, ``layer``, ``group``,
    ``stage`` or ``model``; ``stage``/``position`` place a block (its position in the
    stage); ``role`` a layer in its block; ``free`` a layer outside blocks (its index
    among them, in execution order)."""

    kind: str
    stage: int | None = None
    position: int | None = None
    role: str | None = None
    free: int | None = None

    def describe(self) -> str:
        if self.kind == "model":
            return "whole model"
        if self.kind == "stage":
            return f"stage {self.stage}"
        if self.position is not None:
            where = f"stage {self.stage} block {self.position}"
        elif self.free is not None and self.free >= 0:
            where = f"stem layer {self.free}"
        else:
            where = f"head layer {self.free}"
        if self.role:
            where += f" {self.role}"
        if self.kind == "block":
            return where
        layer = f"{where} layer" if self.role else where
        return layer if self.kind == "layer" else f"output channels of {layer}"


@dataclass(frozen=True)
class SeedEntry:
    """One rewrite of the seed: what it was, what it became (None: left out) and why."""

    index: int
    source: Rewrite
    resolved: Rewrite | None
    address: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.resolved is not None

    def to_json(self) -> dict:
        return {"index": self.index, "source": self.source.to_json(),
                "resolved": self.resolved.to_json() if self.resolved else None,
                "address": self.address, "ok": self.ok, "note": self.note}


@dataclass(frozen=True)
class SeedResolution:
    recipe: Recipe
    entries: tuple[SeedEntry, ...]

    @property
    def resolved(self) -> tuple[SeedEntry, ...]:
        return tuple(e for e in self.entries if e.ok)

    @property
    def unresolved(self) -> tuple[SeedEntry, ...]:
        return tuple(e for e in self.entries if not e.ok)

    def to_json(self) -> dict:
        return {"recipe": self.recipe.to_json(), "resolved": len(self.resolved),
                "unresolved": len(self.unresolved), "entries": [e.to_json() for e in self.entries]}


class _Unresolved(Exception):
    pass


# ---------------------------------------------------------------------------- addresses
def _block_of_layer(s: Structure) -> dict[str, tuple[str, str]]:
    out = {}
    for b in s.blocks:
        for role, lid in b.roles:
            out.setdefault(lid, (b.id, role))
    return out


def _free_layers(s: Structure) -> tuple[list[str], list[str]]:
    """Layers outside blocks: those before the first block (stem, counted from the start)
    and the others (head, counted from the end)."""
    inside = {lid for b in s.blocks for lid in b.layers}
    order = [l.id for l in s.layers]
    first = min((order.index(l) for l in inside), default=len(order))
    free = [l for l in order if l not in inside]
    return [l for l in free if order.index(l) < first], [l for l in free if order.index(l) > first]


def _block_place(s: Structure, block_id: str) -> tuple[int, int]:
    b = s.block(block_id)
    stage = next(st for st in s.stages if st.index == b.stage)
    return stage.index, stage.blocks.index(block_id)


def layer_address(s: Structure, layer_id: str) -> Address:
    owner = _block_of_layer(s).get(layer_id)
    if owner is not None:
        stage, pos = _block_place(s, owner[0])
        return Address("layer", stage, pos, role=owner[1])
    stem, rest = _free_layers(s)
    if layer_id in stem:
        return Address("layer", free=stem.index(layer_id))
    if layer_id in rest:
        return Address("layer", free=rest.index(layer_id) - len(rest))
    raise _Unresolved(f"layer {layer_id} is inside a block without a role")


def block_address(s: Structure, block_id: str) -> Address:
    stage, pos = _block_place(s, block_id)
    return Address("block", stage, pos)


def _find_block(s: Structure, a: Address) -> str:
    stage = next((st for st in s.stages if st.index == a.stage), None)
    if stage is None:
        raise _Unresolved(f"the target has no stage {a.stage} (it has {len(s.stages)})")
    if a.position >= len(stage.blocks):
        raise _Unresolved(f"stage {a.stage} of the target has {len(stage.blocks)} block(s), no block {a.position}")
    return stage.blocks[a.position]


def _find_layer(s: Structure, a: Address) -> str:
    if a.position is None:
        stem, rest = _free_layers(s)
        part, k = (stem, a.free) if a.free >= 0 else (rest, len(rest) + a.free)
        if not 0 <= k < len(part):
            where = "before its first block" if a.free >= 0 else "after its first block"
            raise _Unresolved(f"the target has {len(part)} layer(s) outside blocks {where}, no {a.describe()}")
        return part[k]
    block = s.block(_find_block(s, a))
    lid = block.role(a.role)
    if lid is None:
        roles = ", ".join(r for r, _ in block.roles)
        raise _Unresolved(f"block {block.id} ({block.kind}) of the target has no {a.role} layer (roles: {roles})")
    return lid


class SiteMap:
    """Ids of ``source`` mapped to ids of ``target`` by address, computed once on the
    models as given (blocks intact).  Layer and block ids survive rewrites, so the map
    keeps working while a recipe rewrites both models; groups are mapped through the
    layer that produces them in the structures *as rewritten so far*."""

    def __init__(self, source: Structure, target: Structure):
        self.source, self.target = source, target
        self.layers: dict[str, str | _Unresolved] = {}
        self.blocks: dict[str, str | _Unresolved] = {}
        for l in source.layers:
            self.layers[l.id] = self._try(lambda: _find_layer(target, layer_address(source, l.id)))
        for b in source.blocks:
            self.blocks[b.id] = self._try(lambda: _find_block(target, block_address(source, b.id)))

    @staticmethod
    def _try(fn):
        try:
            return fn()
        except _Unresolved as exc:
            return exc

    def _get(self, table: dict, key: str) -> str:
        got = table[key]
        if isinstance(got, _Unresolved):
            raise got
        return got

    def address(self, src_now: Structure, site: str | None) -> Address:
        if site is None:
            return Address("model")
        if site in self.blocks:
            return block_address(self.source, site)
        if site in self.layers:
            return layer_address(self.source, site)
        if src_now.has_group(site):
            producer = self._producer(src_now, site)
            a = layer_address(self.source, producer) if producer in self.layers else None
            if a is None:
                raise _Unresolved(f"{site} is produced by layer {producer}, which the source model did not have")
            return replace(a, kind="group")
        for st in src_now.stages:
            if st.id == site:
                return Address("stage", st.index)
        raise _Unresolved(f"{site} is not a block, layer, group or stage of the source model")

    @staticmethod
    def _producer(s: Structure, group: str) -> str:
        producers = [m.node for m in s.group(group).producers if s.has_layer(m.node)]
        if not producers:
            raise _Unresolved(f"{group} is produced by no conv/gemm layer (a graph input?)")
        order = {l.id: i for i, l in enumerate(s.layers)}
        return min(producers, key=order.__getitem__)

    def site(self, src_now: Structure, dst_now: Structure, site: str | None) -> str | None:
        """The target's id for the source's ``site`` (raises _Unresolved with the reason)."""
        if site is None:
            return None
        if site in self.blocks:
            return self._get(self.blocks, site)
        if site in self.layers:
            return self._get(self.layers, site)
        if src_now.has_group(site):
            producer = self._get(self.layers, self._producer(src_now, site))
            if not dst_now.has_layer(producer):
                raise _Unresolved(f"layer {producer} of the target was removed by an earlier rewrite")
            group = dst_now.layer(producer).out_group
            if not group:
                raise _Unresolved(f"layer {producer} of the target has no output channel group")
            return group
        a = self.address(src_now, site)
        st = next((st for st in dst_now.stages if st.index == a.stage), None)
        if st is None:
            raise _Unresolved(f"the target has no stage {a.stage} (it has {len(dst_now.stages)})")
        return st.id


# ---------------------------------------------------------------------------- choices
def _round_like(value: float, original: int) -> int:
    step = 8 if original % 8 == 0 else 4 if original % 4 == 0 else 1
    return max(step, int(round(value / step)) * step)


def _scale_choice(choice: Mapping[str, Any], src: Structure, dst: Structure, src_site: str | None,
                  dst_site: str | None) -> tuple[dict, list[str]]:
    out, notes = dict(choice), []
    if src_site is not None and src.has_group(src_site) and dst.has_group(dst_site):
        a, b = src.group(src_site).channels, dst.group(dst_site).channels
        for k in CHANNEL_KEYS:
            if isinstance(out.get(k), int) and a != b:
                new = _round_like(out[k] * b / a, out[k])
                if new != out[k]:
                    notes.append(f"{k} {out[k]} -> {new} (group has {b} channels, not {a})")
                out[k] = new
    hw_src, hw_dst = src.input_hw, dst.input_hw
    if hw_src and hw_dst and hw_src != hw_dst:
        for k, i in zip(SIZE_KEYS, (0, 1)):
            if isinstance(out.get(k), int):
                new = _round_like(out[k] * hw_dst[i] / hw_src[i], out[k])
                if new != out[k]:
                    notes.append(f"{k} {out[k]} -> {new} (input is {hw_dst[i]}, not {hw_src[i]})")
                out[k] = new
    return out, notes


# ---------------------------------------------------------------------------- resolve
def _apply_one(s: Structure, rw: Rewrite) -> Structure:
    return apply_recipe_shapes(s, Recipe((rw,)))


def resolve_recipe(recipe: Recipe, source: Structure, target: Structure, *, scale_choices: bool = True) -> SeedResolution:
    """Move ``recipe`` (found on ``source``) onto ``target`` site by site; see the module doc."""
    ids = SiteMap(source, target)
    src, dst = source, target
    kept: list[Rewrite] = []
    entries: list[SeedEntry] = []
    for i, rw in enumerate(recipe):
        try:
            where = ids.address(src, rw.site).describe()
        except _Unresolved as exc:
            entries.append(SeedEntry(i, rw, None, "?", str(exc)))
            continue
        try:
            src_next = _apply_one(src, rw)
        except ArchpassError as exc:
            entries.append(SeedEntry(i, rw, None, where, f"does not apply to the source model: {exc.problem}"))
            continue
        try:
            site = ids.site(src, dst, rw.site)
            choice, notes = _scale_choice(rw.choice, src, dst, rw.site, site) if scale_choices else (dict(rw.choice), [])
            moved = Rewrite(rw.pass_name, site, choice)
            dst_next = _apply_one(dst, moved)
        except _Unresolved as exc:
            entries.append(SeedEntry(i, rw, None, where, str(exc)))
        except ArchpassError as exc:
            entries.append(SeedEntry(i, rw, None, where, f"does not apply to the target: {exc.problem}"))
        else:
            same = "whole model" if site is None else "same id" if site == rw.site else f"{rw.site} -> {site}"
            entries.append(SeedEntry(i, rw, moved, where, "; ".join([same, *notes])))
            kept.append(moved)
            dst = dst_next
        src = src_next
    return SeedResolution(Recipe(tuple(kept)), tuple(entries))


def load_seeds(paths, structure: Structure, source: Structure | None = None) -> list[SeedResolution]:
    """``--seed-recipe`` files resolved against ``structure``: from ``source`` (the model
    the recipes were found on, ``--seed-model``) by position, or, without one, checked on
    ``structure`` itself (same ids).  Raises RecipeError for an unreadable recipe file."""
    return [resolve_recipe(Recipe.load(p), source if source is not None else structure, structure) for p in paths]


SEED_ATTR = "seed"  # trial user attribute of a seeded trial: its index among --seed-recipe files


def add_seed_trial(study, values, user_attrs: Mapping[str, Any], index: int):
    """Add a seed recipe, already scored, to ``study`` as a finished trial (so it is a
    candidate like any other, and the sampler learns from it); returns its number."""
    import optuna

    v = list(values)
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, **({"value": v[0]} if len(v) == 1 else {"values": v}),
                                      user_attrs={**dict(user_attrs), SEED_ATTR: index})
    study.add_trial(trial)
    return len(study.get_trials(deepcopy=False)) - 1
