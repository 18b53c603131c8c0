"""Memory: parameter bytes and peak activation memory from tensor liveness.

An activation tensor is live from the step that produces it (graph inputs from the
start) until the last step that reads it (graph outputs until the end).  While a node
runs, its inputs and outputs are all live.  The peak along ``Structure.nodes`` is what a
runtime executing in that (exported) order needs; :func:`best_order_peak` also searches
other topological orders (greedy list scheduling under several priorities) and reports
the lowest peak found, which is what a memory-aware scheduler could reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from archpass.structure import Structure


@dataclass(frozen=True)
class Memory:
    params_bytes: int
    peak_activation_bytes: int
    best_order_peak_bytes: int | None
    peak_step: str | None

    def to_json(self) -> dict:
        return {
            "params_bytes": self.params_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "best_order_peak_activation_bytes": self.best_order_peak_bytes,
            "peak_at_node": self.peak_step,
        }


def params_bytes(structure: Structure, bytes_per_element: int) -> int:
    """Weights of every conv/gemm layer (+ bias) and the other constants nodes read."""
    total = sum(l.params for l in structure.layers)
    layer_consts = set()
    for l in structure.layers:
        if l.weight:
            layer_consts.add(l.weight)
    layer_nodes = {n.name for n in structure.nodes if n.layer is not None}
    seen = set()
    for n in structure.nodes:
        if n.name in layer_nodes:
            continue  # counted through Layer.params (which follows shape-only rewrites)
        for i in n.inputs:
            t = structure.tensors.get(i)
            if t is not None and t.const and i not in seen and i not in layer_consts and t.numel > 1:
                seen.add(i)
                total += t.numel
    return int(total * bytes_per_element)


def _graph(structure: Structure, bytes_per_element: int):
    sizes: dict[str, int] = {}
    for name, t in structure.tensors.items():
        if not t.const:
            sizes[name] = t.numel * bytes_per_element
    for name, shape in structure.inputs:
        if name not in sizes:
            n = 1
            for d in shape:
                n *= d
            sizes[name] = n * bytes_per_element
    nodes = [(n.name, [i for i in n.inputs if i in sizes], [o for o in n.outputs if o in sizes]) for n in structure.nodes]
    return sizes, nodes


def peak_for_order(sizes: dict[str, int], nodes, order: list[int], inputs: list[str], outputs: set[str]) -> tuple[int, int]:
    """(peak bytes, index into ``order`` of the peak step) for one execution order."""
    remaining: dict[str, int] = {}
    for idx in order:
        for i in set(nodes[idx][1]):
            remaining[i] = remaining.get(i, 0) + 1
    live = {t for t in inputs if t in sizes}
    cur = sum(sizes[t] for t in live)
    peak, peak_i = cur, -1
    for pos, idx in enumerate(order):
        _, ins, outs = nodes[idx]
        for o in outs:
            if o not in live:
                live.add(o)
                cur += sizes[o]
        if cur > peak:
            peak, peak_i = cur, pos
        for i in set(ins):
            remaining[i] -= 1
            if remaining[i] == 0 and i not in outputs and i in live:
                live.discard(i)
                cur -= sizes[i]
        for o in outs:  # produced but never read and not an output: freed at once
            if remaining.get(o, 0) == 0 and o not in outputs and o in live:
                live.discard(o)
                cur -= sizes[o]
    return peak, peak_i


def _single_order(preds, succs) -> bool:
    """Whether the graph has exactly one topological order."""
    indeg = [len(p) for p in preds]
    ready = [i for i, d in enumerate(indeg) if d == 0]
    while ready:
        if len(ready) > 1:
            return False
        n = ready.pop()
        for s in succs[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    return True


def _greedy_orders(sizes, nodes):
    """Topological orders from list scheduling with a few memory-aware priorities."""
    producers = {}
    for idx, (_, _, outs) in enumerate(nodes):
        for o in outs:
            producers[o] = idx
    preds = [set() for _ in nodes]
    succs = [set() for _ in nodes]
    for idx, (_, ins, _) in enumerate(nodes):
        for i in ins:
            p = producers.get(i)
            if p is not None and p != idx:
                preds[idx].add(p)
                succs[p].add(idx)
    readers: dict[str, int] = {}
    for _, ins, _ in nodes:
        for i in set(ins):
            readers[i] = readers.get(i, 0) + 1
    if _single_order(preds, succs):
        return  # a chain (no two nodes ever ready together) has no other order

    def schedule(priority):
        indeg = [len(p) for p in preds]
        left = dict(readers)
        ready = [i for i, d in enumerate(indeg) if d == 0]
        order = []
        while ready:
            best = min(ready, key=lambda i: priority(i, left))
            ready.remove(best)
            order.append(best)
            for i in set(nodes[best][1]):
                left[i] -= 1
            for s in succs[best]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
        return order

    def delta(i, left):  # bytes allocated minus bytes freed by running node i now
        _, ins, outs = nodes[i]
        freed = sum(sizes[t] for t in set(ins) if left.get(t, 0) == 1)
        return sum(sizes[o] for o in outs) - freed

    yield schedule(lambda i, left: (delta(i, left), i))
    yield schedule(lambda i, left: (delta(i, left) > 0, -i))  # depth first among non-growing nodes
    yield schedule(lambda i, left: (-sum(sizes[t] for t in set(nodes[i][1]) if left.get(t, 0) == 1), i))


def memory(structure: Structure, bytes_per_element: int, best_order: bool = True) -> Memory:
    sizes, nodes = _graph(structure, bytes_per_element)
    inputs = [n for n, _ in structure.inputs]
    outputs = {n for n, _ in structure.outputs}
    order = list(range(len(nodes)))
    peak, at = peak_for_order(sizes, nodes, order, inputs, outputs)
    best = peak
    for o in _greedy_orders(sizes, nodes) if best_order else ():
        if len(o) == len(nodes):
            best = min(best, peak_for_order(sizes, nodes, o, inputs, outputs)[0])
    return Memory(
        params_bytes=params_bytes(structure, bytes_per_element),
        peak_activation_bytes=int(peak),
        best_order_peak_bytes=int(best) if best_order else None,
        peak_step=nodes[at][0] if at >= 0 and nodes else None,
    )
