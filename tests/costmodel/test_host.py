"""Host fingerprints of onnxruntime targets and the note an estimate gets on another host."""

from __future__ import annotations

from dataclasses import replace

from archpass.costmodel import load_target
from archpass.costmodel.host import fingerprint, host_notes, machine, same_machine


def test_fingerprint_describes_this_machine():
    fp = fingerprint("CPUExecutionProvider", 2, "basic")
    assert fp["cores"] and fp["cpu_model"] and fp["onnxruntime_version"]
    assert fp["threads"] == 2 and fp["graph_optimization"] == "basic" and same_machine(fp)


def test_notes_on_another_or_unknown_host_only():
    cpu = load_target("cpu")
    assert cpu.source["host"]["known"] is False  # calibrated before fingerprints: honest unknown
    here = replace(cpu, source={**cpu.source, "host": fingerprint("CPUExecutionProvider", 1)})
    assert host_notes(here) == []
    other = replace(cpu, source={**cpu.source, "host": {**machine(), "cpu_model": "Some Other CPU 9000"}})
    (note,) = host_notes(other)
    assert "Some Other CPU 9000" in note and "archpass calibrate --adapt cpu --backend onnxruntime" in note
    assert "s of measurement" in note
    (note,) = host_notes(cpu)
    assert "unrecorded host" in note
    assert host_notes(load_target("edgetpu")) == []  # ZigZag targets do not depend on the host


def test_nchwc_block_is_read_from_onnxruntime_on_this_host():
    """The NCHWc block a target's layout flags use is onnxruntime's on this machine: MLAS
    uses 16 channels with AVX-512F and 8 on other x86-64 CPUs."""
    import platform

    from archpass.costmodel.host import nchwc_block

    block = nchwc_block("CPUExecutionProvider")
    if platform.machine() in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        assert block == (16 if "avx512f" in flags else 8)
    assert nchwc_block("CUDAExecutionProvider") == 0  # no blocked layout outside the CPU provider
    assert fingerprint("CPUExecutionProvider", 1)["nchwc_block"] == block
    # one CPU model name with another block (a VM masking AVX-512) is another host
    cpu = load_target("cpu")
    fp = {**fingerprint("CPUExecutionProvider", 1), "nchwc_block": 4 if block != 4 else 8}
    assert not same_machine(fp)
    (note,) = host_notes(replace(cpu, source={**cpu.source, "host": fp}))
    assert f"NCHWc block {fp['nchwc_block']}" in note and f"NCHWc block {block})" in note
    assert "nchwc_block" not in fingerprint("CUDAExecutionProvider", 1)
