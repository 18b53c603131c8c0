"""Block rules: which runs of layers form the blocks passes rewrite, and the stages they make.

Each block kind is one rule, a small matcher over a :class:`BlockGraph` (the layers and the
ONNX nodes that connect them) returning a :class:`Match` or None.  ``LAYER_RULES`` are
tried in order on every layer no earlier block claimed (the layer is the block's first);
``ADD_RULES`` then on every Add node no block ends in.  A new block kind is one rule here,
added to one of the lists, and one test in ``tests/test_blocks.py``.

Block ids (``block<N>``) follow the position of each block's first layer in execution
order; stages are runs of consecutive blocks at one output resolution.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import onnx

from archpass.activations import UNARY
from archpass.structure import Block, Layer, Stage

# ops an SE branch may pass through between its pooling and its gate
_SE_GLUE = ("Clip", "Flatten", "Reshape", "Unsqueeze", "Squeeze", "Add", "Div", "Mul")


@dataclass(frozen=True)
class Match:
    kind: str
    ids: tuple[str, ...]  # member layers
    roles: tuple[tuple[str, str], ...]  # (role, layer id)
    add: str | None  # the residual Add node, if the block ends in one

    @property
    def residual(self) -> bool:
        return self.add is not None


class BlockGraph:
    """The layers, how tensors flow between them, and which layers a block already claimed."""

    def __init__(self, layers: Sequence[Layer], nodes: Sequence[onnx.NodeProto],
                 consumers: dict[str, list[onnx.NodeProto]] | None = None):
        self.layers = list(layers)
        self.nodes = list(nodes)
        self.by_id = {l.id: l for l in self.layers}
        self.by_act_out = {l.act_output: l for l in self.layers}
        self.order = {l.id: i for i, l in enumerate(self.layers)}
        if consumers is None:
            consumers = defaultdict(list)
            for n in self.nodes:
                for i in n.input:
                    if i:
                        consumers[i].append(n)
        self.consumers = consumers
        self.used: set[str] = set()

    def sole_layer_after(self, tensor: str) -> Layer | None:
        """The layer that is ``tensor``'s only consumer (reading it as its data input), if any."""
        cons = self.consumers.get(tensor, [])
        if len(cons) == 1 and cons[0].name in self.by_id and cons[0].input[0] == tensor:
            return self.by_id[cons[0].name]
        return None

    def se_after(self, tensor: str) -> tuple[list[str], str]:
        """Squeeze-and-excitation after ``tensor``: (its two layer ids, the gated tensor) or ([], tensor).

        SE = GlobalAveragePool (or ReduceMean) -> conv -> act -> conv -> gate -> Mul with ``tensor``.
        """
        cons = self.consumers.get(tensor, [])
        if len(cons) != 2:
            return [], tensor
        pool = [c for c in cons if c.op_type in ("GlobalAveragePool", "ReduceMean")]
        mul = [c for c in cons if c.op_type == "Mul"]
        if len(pool) != 1 or len(mul) != 1:
            return [], tensor
        se_layers: list[str] = []
        cur = pool[0].output[0]
        for _ in range(4):
            nxt = self.consumers.get(cur, [])
            if len(nxt) != 1:
                return [], tensor
            node = nxt[0]
            if node.name in self.by_id:
                se_layers.append(node.name)
                cur = self.by_id[node.name].act_output
            elif node.op_type in UNARY or node.op_type in _SE_GLUE:
                if node is mul[0]:
                    break
                cur = node.output[0]
            if cur in mul[0].input:
                break
        if cur in mul[0].input and len(se_layers) == 2:
            return se_layers, mul[0].output[0]
        return [], tensor

    def residual_add(self, block_in: str, out: str) -> str | None:
        """The Add that is ``out``'s only consumer and also reads ``block_in`` (a residual), if any."""
        cons = self.consumers.get(out, [])
        if len(cons) == 1 and cons[0].op_type == "Add" and block_in in cons[0].input and out in cons[0].input:
            return cons[0].name
        return None


def _se_roles(se: list[str]) -> list[tuple[str, str]]:
    return [("se_reduce", se[0]), ("se_expand", se[1])] if se else []


def match_ibn(l: Layer, g: BlockGraph) -> Match | None:
    """``ibn``: 1x1 expand -> act -> KxK depthwise -> act -> [SE] -> 1x1 project -> [residual Add]."""
    if not (l.pointwise and l.activation):
        return None
    d = g.sole_layer_after(l.act_output)
    if not (d and d.depthwise and d.activation and d.cin == l.cout):
        return None
    se, gated = g.se_after(d.act_output)
    p = g.sole_layer_after(gated)
    if not (p and p.pointwise and p.id not in g.used):
        return None
    roles = [("expand", l.id), ("depthwise", d.id), *_se_roles(se), ("project", p.id)]
    return Match("ibn", (l.id, d.id, *se, p.id), tuple(roles), g.residual_add(l.input, p.act_output))


def match_fused_ibn(l: Layer, g: BlockGraph) -> Match | None:
    """``fused_ibn``: KxK dense conv that expands -> act -> [SE] -> linear 1x1 project -> [residual Add]."""
    if not (l.op == "Conv" and l.groups == 1 and l.kernel != (1, 1) and l.activation and l.cout > l.cin):
        return None
    se, gated = g.se_after(l.act_output)
    p = g.sole_layer_after(gated)
    if not (p and p.pointwise and p.activation is None and p.id not in g.used):  # a linear bottleneck
        return None
    roles = [("fused", l.id), *_se_roles(se), ("project", p.id)]
    return Match("fused_ibn", (l.id, *se, p.id), tuple(roles), g.residual_add(l.input, p.act_output))


def match_depthwise(l: Layer, g: BlockGraph) -> Match | None:
    """``depthwise``: KxK depthwise -> [act -> SE] -> [1x1 pointwise], with no expansion before it."""
    if not l.depthwise:
        return None
    se, gated = g.se_after(l.act_output) if l.activation else ([], l.act_output)
    roles = [("depthwise", l.id), *_se_roles(se)]
    ids = [l.id, *se]
    p = g.sole_layer_after(gated)
    if p and p.pointwise and p.id not in g.used:
        roles.append(("project", p.id))
        ids.append(p.id)
    return Match("depthwise", tuple(ids), tuple(roles), g.residual_add(l.input, g.by_id[ids[-1]].act_output))


def match_residual(node: onnx.NodeProto, g: BlockGraph) -> Match | None:
    """``residual``: a residual Add fed by a chain of up to four layers from the block input,
    with an identity or a one-layer projection shortcut (ResNet basic and bottleneck blocks)."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for skip, main in (node.input, node.input[::-1]):
        chain: list[Layer] = []
        cur = main
        found = None
        while cur in g.by_act_out and len(chain) < 4:
            lay = g.by_act_out[cur]
            if lay.id in g.used or len(g.consumers.get(lay.act_output, [])) != 1:
                break
            chain.insert(0, lay)
            start = lay.input
            if skip == start:
                found = (chain[:], None)
                break
            sc = g.by_act_out.get(skip)
            if sc is not None and sc.input == start and sc.id not in g.used and sc not in chain:
                found = (chain[:], sc)
                break
            cur = start
        if found and len(found[0]) >= 2 - (found[1] is not None):
            main_layers, shortcut = found
            roles = [(f"conv{i}", x.id) for i, x in enumerate(main_layers)]
            ids = [x.id for x in main_layers]
            if shortcut is not None:
                roles.append(("shortcut", shortcut.id))
                ids.append(shortcut.id)
            return Match("residual", tuple(ids), tuple(roles), node.name)
    return None


#: Rules anchored on a block's first layer, tried in this order on each unclaimed layer.
LAYER_RULES: tuple[Callable[[Layer, BlockGraph], Match | None], ...] = (match_ibn, match_fused_ibn, match_depthwise)
#: Rules anchored on the Add a block ends in, tried on each Add no earlier block ends in.
ADD_RULES: tuple[Callable[[onnx.NodeProto, BlockGraph], Match | None], ...] = (match_residual,)


def _claim_first(anchor, rules, g: BlockGraph) -> Match | None:
    """The first rule's match on ``anchor``; its layers are claimed."""
    for rule in rules:
        m = rule(anchor, g)
        if m is not None:
            g.used.update(m.ids)
            return m
    return None


def find_matches(g: BlockGraph) -> list[Match]:
    """Every block, in execution order of its first layer."""
    found = [m for l in g.layers if l.id not in g.used and (m := _claim_first(l, LAYER_RULES, g))]
    taken_adds = {m.add for m in found if m.add}
    found += [m for n in g.nodes if n.name not in taken_adds and (m := _claim_first(n, ADD_RULES, g))]
    return sorted(found, key=lambda m: min(g.order[i] for i in m.ids))


def find_blocks(layers: Sequence[Layer], nodes: Sequence[onnx.NodeProto],
                consumers: dict[str, list[onnx.NodeProto]] | None = None) -> tuple[list[Block], list[Stage]]:
    """The blocks of ``layers`` (ids ``block<N>``) and the stages they form (ids ``stage<N>``)."""
    g = BlockGraph(layers, nodes, consumers)
    blocks: list[Block] = []
    stages: list[Stage] = []
    cur_hw = None
    stage_blocks: list[str] = []
    for i, m in enumerate(find_matches(g)):
        bid = f"block{i}"
        # the block's resolution is its main path's output (not an SE or shortcut layer)
        hw = g.by_id[[lid for r, lid in m.roles if r not in ("shortcut", "se_reduce", "se_expand")][-1]].out_hw
        if hw != cur_hw:
            if stage_blocks:
                stages.append(Stage(f"stage{len(stages)}", len(stages), tuple(stage_blocks), cur_hw))
            stage_blocks, cur_hw = [], hw
        stage_blocks.append(bid)
        blocks.append(Block(bid, m.kind, m.ids, m.residual, len(stages), m.roles, m.add))
    if stage_blocks:
        stages.append(Stage(f"stage{len(stages)}", len(stages), tuple(stage_blocks), cur_hw))
    return blocks, stages
