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
