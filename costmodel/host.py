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


def machine() -> dict:
    """This machine: CPU model, logical core count, onnxruntime version."""
    return dict(zip(MACHINE_KEYS, _machine()))


def host_id() -> str:
    """A short stable id of this machine's fingerprint (keys the per-user defaults)."""
    return hashlib.sha1(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]


def fingerprint(provider: str, threads: int, graph_optimization: str = "all") -> dict:
    """What an onnxruntime target records about the host it is measured on."""
    return {**machine(), "provider": provider, "threads": int(threads), "graph_optimization": graph_optimization}


def same_machine(recorded: dict | None) -> bool:
    if not recorded or recorded.get("known") is False:
        return False
    here = machine()
    return all(recorded.get(k) == here[k] for k in MACHINE_KEYS)


def _describe(fp: dict | None) -> str:
    if not fp or fp.get("known") is False or not fp.get("cpu_model"):
        return "an unrecorded host"
    return f"{fp.get('cpu_model')}, {fp.get('cores')} cores, onnxruntime {fp.get('onnxruntime_version')}"


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
    return [f"the estimate is for another host: target {target.name} was measured on {_describe(recorded)}, "
            f"not on this host ({_describe(machine())}), and its latencies may be tens of % off here; adapt it to this host with about {ADAPT_BUDGET_S} s of "
            f"measurement (about 4 minutes in all, the timing spread over them): {adapt_command(target)}"]


__all__ = ["machine", "host_id", "fingerprint", "same_machine", "host_notes", "adapt_command", "MACHINE_KEYS"]
