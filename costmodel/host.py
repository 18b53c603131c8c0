"""The host an onnxruntime-based target was measured on, and the note an estimate gets
when it runs on another one.

A runtime target is only right on the kind of machine it was calibrated on: the same
kernel takes tens of % more or less on another CPU, another core count or another
onnxruntime release.  Every onnxruntime target records the fingerprint of its host in
``source.host``; :func:`host_notes` compares it with this machine.  A target without a
fingerprint (the built-in ``cpu`` target was calibrated before fingerprints were
recorded) counts as measured on another host.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

#: the parts of a fingerprint that describe the machine (threads and provider are the
#: target's own settings, recorded next to them)
MACHINE_KEYS = ("cpu_model", "cores", "onnxruntime_version")
#: seconds of measurement ``calibrate --adapt`` takes by default (its --budget-s)
ADAPT_BUDGET_S = 60


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or None


def _cpu_signature(path: str = "/proc/cpuinfo") -> str | None:
    """The processor's identity below its marketing name: vendor, family, model and
    stepping on x86 (``/proc/cpuinfo``), implementer, part and variant on ARM.  Virtual
    machines often show one generic name ("AMD EPYC") for CPUs of different generations:
    two 2-core machines here, both named "AMD EPYC", ran MobileNetV2 on one thread in 9-13 ms
    and in 19.5 ms."""
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping",
            "cpu implementer": "implementer", "cpu part": "part", "cpu variant": "variant"}
    found: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if found:
                        break  # the first processor's block is enough
                    continue
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in keys and keys[k] not in found and v.strip():
                    found[keys[k]] = v.strip()
    except OSError:
        return None
    order = ("vendor", "family", "model", "stepping", "implementer", "part", "variant")
    return " ".join(f"{k} {found[k]}" for k in order if k in found) or None


def package_version(dist: str) -> str | None:
    """An installed distribution's version (None when it is not installed)."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _machine() -> tuple:
    return _cpu_model(), os.cpu_count(), package_version("onnxruntime")


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str | None:
    """This machine's processor identity (:func:`_cpu_signature`), None where the system
    does not tell it."""
    return _cpu_signature()


def machine() -> dict:
    """This machine: CPU model, logical core count, onnxruntime version."""
    return dict(zip(MACHINE_KEYS, _machine()))


def host_id() -> str:
    """A short stable id of this machine's fingerprint (keys the per-user defaults; the
    CPU signature is left out so that defaults installed before it was recorded are still
    found: a default whose target records another signature gets the other-host note)."""
    return hashlib.sha1(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def nchwc_block(provider: str = "CPUExecutionProvider") -> int:
    """onnxruntime's NCHWc channel block on this machine, 0 when ``provider`` does not run
    the blocked layout.  MLAS picks it from the CPU (16 with AVX-512F, 8 on other x86-64
    CPUs; on ARM64 only builds with its NEON NCHWc kernels have one), so it is read from
    onnxruntime itself: a 3x3 conv with 4 input channels and 1 output channel, optimized
    with every graph optimization, gets its filter reordered and padded to one block of
    output channels (the first dimension of the reordered filter)."""
    if provider != "CPUExecutionProvider":
        return 0
    try:
        return _probe_nchwc_block()
    except Exception:  # onnxruntime could not optimize or save the probe: the block the rules were measured with
        from archpass.costmodel.kernels import NCHWC_BLOCK

        return NCHWC_BLOCK


def _probe_nchwc_block() -> int:
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((1, 4, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "nchwc_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # old runtimes read it
    with tempfile.TemporaryDirectory(prefix="archpass-nchwc-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3  # the warning that an NCHWc model is hardware specific
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    dims = {i.name: list(i.dims) for i in optimized.graph.initializer}
    for n in optimized.graph.node:
        if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc" and len(n.input) > 1 and dims.get(n.input[1]):
            return int(dims[n.input[1]][0])
    return 0


#: activations onnxruntime's CPU provider fuses into a Conv at the extended graph
#: optimization level (``FusedConv``; the blocked layout of the all level fuses more)
EXTENDED_ACTIVATIONS = ("relu", "relu6", "clip", "sigmoid", "hardsigmoid")


def host_fusion(fusion, provider: str, graph_optimization: str):
    """``fusion`` (:class:`~archpass.costmodel.kernels.FusionRules`) as onnxruntime's CPU
    provider runs a model at ``graph_optimization``: a calibration or adaptation plans,
    records and later decomposes models with the kernels the runtime executes.

    * ``all``: this host's NCHWc block (the blocked layout: activations and the residual
      Add fused into the conv).
    * ``extended``: ``FusedConv`` fuses only :data:`EXTENDED_ACTIVATIONS`; a residual Add or
      a hardswish stays a kernel of its own, a swish two (its Sigmoid and Mul; onnxruntime
      runs them as one ``QuickGelu``).
    * ``basic`` and ``disabled``: no activation and no Add is fused (ResNet-18 runs 17 Relu
      and 8 Add nodes besides its 20 Convs; with the ``all`` level's rules an adaptation to
      basic put their time on the convs, and its held-out errors followed the architecture:
      ResNet-18 +16 and +27%, EfficientNet-B0 -16 and -14% in two adaptations).

    Other providers keep the rules as they are (keys included)."""
    from dataclasses import replace

    if provider != "CPUExecutionProvider":
        return fusion
    if graph_optimization == "all":
        return replace(fusion, nchwc_block=nchwc_block(provider))
    if graph_optimization == "extended":
        return replace(fusion, activations=tuple(a for a in fusion.activations if a in EXTENDED_ACTIVATIONS),
                       residual_add=False)
    return replace(fusion, activations=(), residual_add=False)


def fingerprint(provider: str, threads: int, graph_optimization: str = "all") -> dict:
    """What an onnxruntime target records about the host it is measured on (with the
    CPU provider also onnxruntime's NCHWc channel block here, :func:`nchwc_block`)."""
    fp = {**machine(), "provider": provider, "threads": int(threads), "graph_optimization": graph_optimization}
    if cpu_signature():
        fp["cpu_signature"] = cpu_signature()
    if provider == "CPUExecutionProvider":
        fp["nchwc_block"] = nchwc_block(provider)
    return fp


def same_machine(recorded: dict | None) -> bool:
    """Whether a recorded fingerprint is this machine's: CPU model, cores, onnxruntime
    version and, where recorded, the CPU signature (virtual machines can show one generic
    model name for processors of different generations) and onnxruntime's NCHWc block
    (one CPU model name with and without AVX-512)."""
    if not recorded or recorded.get("known") is False:
        return False
    here = machine()
    if not all(recorded.get(k) == here[k] for k in MACHINE_KEYS):
        return False
    if recorded.get("cpu_signature") and cpu_signature() and recorded["cpu_signature"] != cpu_signature():
        return False
    return "nchwc_block" not in recorded or recorded["nchwc_block"] == nchwc_block(
        recorded.get("provider", "CPUExecutionProvider"))


def _describe(fp: dict | None) -> str:
    if not fp or fp.get("known") is False or not fp.get("cpu_model"):
        return "an unrecorded host"
    block = f", NCHWc block {fp['nchwc_block']}" if fp.get("nchwc_block") is not None else ""
    sig = f" ({fp['cpu_signature']})" if fp.get("cpu_signature") else ""
    return f"{fp.get('cpu_model')}{sig}, {fp.get('cores')} cores, onnxruntime {fp.get('onnxruntime_version')}{block}"


def adapt_command(target, base: str | None = None, name: str | None = None) -> str:
    """The command that adapts ``target`` (or ``base``, in ``target``'s setting) to this
    host, as ``name`` (default ``<target>-here``)."""
    src = target.source
    base = base or (target.name if target.origin in ("builtin", "user") else str(target.path or target.name))
    parts = ["archpass calibrate --adapt", base, "--backend onnxruntime"]
    if src.get("provider", "CPUExecutionProvider") != "CPUExecutionProvider":
        parts += ["--provider", str(src["provider"])]
    parts += ["--threads", str(src.get("threads", 1))]
    if src.get("graph_optimization", "all") != "all":
        parts += ["--graph-opt", str(src["graph_optimization"])]
    parts += ["--name", name or f"{target.name}-here", "--install"]
    return " ".join(parts)


def host_notes(target) -> list[str]:
    """Notes for an estimate on ``target`` made on this machine: empty unless the target
    was measured with onnxruntime on another (or an unrecorded) host.  Every command that
    estimates (inspect, apply, optimize with --target) gets them through
    :attr:`Estimate.notes <archpass.costmodel.estimate.Estimate.notes>`."""
    if target.backend != "onnxruntime":
        return []
    recorded = target.source.get("host")
    if same_machine(recorded):
        return []
    here = machine()
    if recorded and recorded.get("cpu_signature") and cpu_signature():  # described side by side
        here["cpu_signature"] = cpu_signature()
    if recorded and "nchwc_block" in recorded:
        here["nchwc_block"] = nchwc_block(recorded.get("provider", "CPUExecutionProvider"))
    return [f"the estimate is for another host: target {target.name} was measured on {_describe(recorded)}, "
            f"not on this host ({_describe(here)}), and its latencies may be tens of % off here; adapt it to this host with about {ADAPT_BUDGET_S} s of "
            f"measurement (about 4 minutes in all, the timing spread over them): {adapt_command(target)}"]


__all__ = ["machine", "host_id", "fingerprint", "nchwc_block", "host_fusion", "same_machine", "host_notes", "adapt_command", "MACHINE_KEYS"]
