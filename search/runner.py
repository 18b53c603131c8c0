"""Running ONNX models on many samples with onnxruntime, and on parts of a graph.

:class:`Runner` makes the batch dimension of a copy of the model symbolic, so a
calibration set runs in a few chunks instead of one session call per sample, and can
expose any intermediate tensor as an output.  A model whose graph spells its batch size
(a Reshape to ``[1, -1]``, ...) is detected on the first run and falls back to its own
batch size.  :func:`segment` cuts the part of a graph that computes some tensors from
others already known, which lets weight recovery run only the nodes after the layer it
just refitted.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from archpass.spatial import model_batch

CHUNK_BYTES = 256 * 2**20  # activation bytes per chunk (the largest tensor of one sample times the chunk)
MAX_CHUNK = 512


def elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """The ONNX element type of every tensor with a declared type (inputs, outputs,
    inferred value_info, initializers)."""
    g = proto.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _batch_free(proto: onnx.ModelProto, outputs: Sequence[str], types: Mapping[str, int]) -> onnx.ModelProto:
    """A copy whose inputs have a symbolic dim 0 and whose outputs are ``outputs`` (no
    shapes, so onnxruntime infers them for any batch)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    for vi in g.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "N"
    del g.value_info[:]
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in outputs)
    return out


def _session(proto: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # fatal only: a failed batch probe (a graph that spells its batch size) raises and is
    # handled; onnxruntime's own ERROR line for it would only alarm the user
    opts.log_severity_level = 4
    # no busy-waiting between the many short runs of recovery (it only burns a shared CPU)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Runner:
    """One onnxruntime session for ``proto`` exposing ``outputs`` (default: the graph outputs)."""

    def __init__(self, proto: onnx.ModelProto, outputs: Sequence[str] | None = None, *, chunk: int | None = None,
                 dynamic: bool | None = None):
        self.proto = proto
        self.outputs = list(outputs) if outputs is not None else [o.name for o in proto.graph.output]
        self.inputs = [i.name for i in proto.graph.input]
        # rows of each input in one run of the static model: its batch for a model input, but
        # for a segment's input any leading dim (a Linear over flattened positions reads
        # [N*H*W, C]); a value is the concatenation of such runs along axis 0
        self.rows = {k: max(1, shape[0]) if shape else 1 for k, shape in _input_shapes(proto)}
        self.chunk = chunk or run_chunk(proto)
        self._types = elem_types(proto)
        self._dynamic = dynamic  # None: decided on the first run
        self._sess = _session(_batch_free(proto, self.outputs, self._types)) if dynamic is not False else self._static()

    @property
    def dynamic(self) -> bool | None:
        """Whether the batch-free copy is used (None until the first run decides)."""
        return self._dynamic

    def _static(self):
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        have = {o.name for o in out.graph.output}
        out.graph.output.extend(helper.make_tensor_value_info(n, self._types.get(n, onnx.TensorProto.FLOAT), None)
                                for n in self.outputs if n not in have)
        return _session(out)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Outputs for every sample of ``feeds`` (arrays stacked along axis 0, each input
        the concatenation of whole runs of the static model)."""
        names = list(outputs) if outputs is not None else self.outputs
        runs = self._runs(feeds)
        if self._dynamic is None:
            self._dynamic = self._probe(feeds, runs)
            if not self._dynamic:
                self._sess = self._static()
        step = self.chunk if self._dynamic else 1
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, runs, step):
            res = self._sess.run(names, self._slice(feeds, i, min(runs, i + step)))
            for p, r in zip(parts, res):
                p.append(r)
        # a scalar output (a size the network computes for a post-processing set aside) is
        # one value per run: stacked, as a batch of them
        return [(np.stack(p) if p[0].ndim == 0 else np.concatenate(p, axis=0)) if len(p) > 1 else p[0] for p in parts]

    def _runs(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many runs of the static model ``feeds`` hold (the same for every input)."""
        counts = {k: len(v) // self.rows.get(k, 1) for k, v in feeds.items()}
        bad = [k for k, v in feeds.items() if len(v) % self.rows.get(k, 1)]
        if bad or len(set(counts.values())) > 1:
            raise ValueError("inputs hold different numbers of the model's runs: "
                             + ", ".join(f"{k}: {len(v)} rows of {self.rows.get(k, 1)}" for k, v in feeds.items()))
        return next(iter(counts.values()), 0)

    def _slice(self, feeds: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        """Runs ``start`` to ``stop`` of every input."""
        return {k: np.ascontiguousarray(v[start * self.rows.get(k, 1):stop * self.rows.get(k, 1)]) for k, v in feeds.items()}

    def _probe(self, feeds: Mapping[str, np.ndarray], runs: int) -> bool:
        """Whether the batch-free copy runs two runs' inputs at once as the static model
        runs them one by one."""
        if runs < 2:
            return runs == 1  # a single run: the dynamic copy is only used at the model's own size
        two = self._slice(feeds, 0, 2)
        try:
            got = self._sess.run(self.outputs, two)
        except Exception:  # noqa: BLE001 - onnxruntime raises its own error types
            return False
        ref_sess = self._static()
        refs = [ref_sess.run(self.outputs, self._slice(feeds, part, part + 1)) for part in range(2)]
        for j, g in enumerate(got):
            r0, r1 = refs[0][j], refs[1][j]
            if r0.ndim == 0 or g.shape[0] != len(r0) + len(r1):
                return False
            if not (np.allclose(g[:len(r0)], r0, rtol=1e-4, atol=1e-5) and np.allclose(g[len(r0):], r1, rtol=1e-4, atol=1e-5)):
                return False
        return True


def chunk_size(proto: onnx.ModelProto) -> int:
    """Samples per onnxruntime call, so that the largest activation stays near CHUNK_BYTES."""
    largest = 1
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(dims) > 1 and all(d > 0 for d in dims[1:]):
            largest = max(largest, int(np.prod(dims[1:])))
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * largest))))


def _input_shapes(proto: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    """(name, dims) of the graph inputs; 0 for a dim without a value."""
    return [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in proto.graph.input]


def run_chunk(proto: onnx.ModelProto) -> int:
    """Runs of the static model per onnxruntime call: :func:`chunk_size` samples, in runs of
    the model's own batch size."""
    return max(1, chunk_size(proto) // model_batch(_input_shapes(proto)))


def needed_nodes(proto: onnx.ModelProto, outputs: Iterable[str], known: Iterable[str]) -> list[int]:
    """Indices (in graph order) of the nodes that compute ``outputs`` from ``known`` tensors,
    the graph inputs and the initializers."""
    g = proto.graph
    known = set(known)
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    need: set[int] = set()
    stack, seen = list(outputs), set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in known or t not in producer:
            continue
        i = producer[t]
        if i not in need:
            need.add(i)
            stack.extend(g.node[i].input)
    return sorted(need)


def build_segment(proto: onnx.ModelProto, nodes: Sequence[int], outputs: Sequence[str]) -> onnx.ModelProto:
    """A model of the given nodes of ``proto``: its inputs are the tensors they read that
    no node among them produces (besides initializers), its outputs ``outputs``."""
    g = proto.graph
    sel = [g.node[i] for i in nodes]
    produced = {o for n in sel for o in n.output}
    inits = {t.name: t for t in g.initializer}
    reads = []
    for n in sel:
        for t in n.input:
            if t and t not in produced and t not in inits and t not in reads:
                reads.append(t)
    types = elem_types(proto)
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    ins = []
    for t in reads:
        if t in infos:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(infos[t])
        else:
            vi = helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None)
        ins.append(vi)
    used = {t for n in sel for t in n.input}
    graph = helper.make_graph(sel, "segment", ins,
                              [helper.make_tensor_value_info(o, types.get(o, onnx.TensorProto.FLOAT), None) for o in outputs],
                              initializer=[inits[t] for t in sorted(used) if t in inits])
    m = helper.make_model(graph, opset_imports=list(proto.opset_import))
    m.ir_version = proto.ir_version
    return m


class Stepper:
    """Computes tensors of one model on fixed inputs, running each node once: values
    already computed (and still needed by a node not yet run) are the inputs of the next
    segment.  :meth:`invalidate` forgets what depends on a node whose weights changed."""

    def __init__(self, proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, dynamic: bool | None = None):
        self.proto = proto
        self.feeds = dict(feeds)
        self.values: dict[str, np.ndarray] = {}
        self.dynamic = dynamic
        self.chunk = run_chunk(proto)
        nodes = proto.graph.node
        self._consumers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for t in n.input:
                self._consumers.setdefault(t, []).append(i)
        self._producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        self._done: set[int] = set()
        self.runs = 0

    def get(self, names: Sequence[str]) -> list[np.ndarray]:
        missing = [n for n in names if n not in self.values and n not in self.feeds]
        if missing:
            known = set(self.values) | set(self.feeds)
            nodes = needed_nodes(self.proto, missing, known)
            in_seg = set(nodes)
            outs = list(missing)
            for i in nodes:  # the frontier: produced here, read by a node that has not run yet
                for o in self.proto.graph.node[i].output:
                    if o and o not in outs and any(c not in in_seg and c not in self._done for c in self._consumers.get(o, ())):
                        outs.append(o)
            seg = build_segment(self.proto, nodes, outs)
            feeds = {vi.name: self.values[vi.name] if vi.name in self.values else self.feeds[vi.name] for vi in seg.graph.input}
            runner = Runner(seg, outs, chunk=self.chunk, dynamic=self.dynamic)
            for o, v in zip(outs, runner.run(feeds)):
                self.values[o] = v
            if runner.dynamic is False:
                # a segment that spells its batch size: run every later segment at the model's
                # own batch too.  A segment that runs batch-free says nothing of the next one
                # (a Reshape to [1, -1] may lie ahead), so that one probes for itself.
                self.dynamic = False
            self._done |= in_seg
            self.runs += 1
            wanted = set(names)
            for t in list(self.values):
                if t not in wanted and all(c in self._done for c in self._consumers.get(t, ())):
                    del self.values[t]
        return [self.values[n] if n in self.values else self.feeds[n] for n in names]

    def invalidate(self, node_name: str) -> None:
        """Forget every value computed by or after the node named ``node_name``."""
        nodes = self.proto.graph.node
        start = next(i for i, n in enumerate(nodes) if n.name == node_name)
        stack, down = [start], set()
        while stack:
            i = stack.pop()
            if i in down:
                continue
            down.add(i)
            for o in nodes[i].output:
                stack.extend(self._consumers.get(o, ()))
        self._done -= down
        for i in down:
            for o in nodes[i].output:
                self.values.pop(o, None)
