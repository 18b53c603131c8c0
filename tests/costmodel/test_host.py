"""Host fingerprints of onnxruntime targets and the note an estimate gets on another host."""

from __future__ import annotations

from dataclasses import replace

import pytest

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


@pytest.mark.parametrize("level", ["disabled", "basic", "extended"])
def test_below_the_all_level_models_decompose_into_the_kernels_onnxruntime_runs(tmp_path, level):
    """``host_fusion``: below every graph optimization onnxruntime's CPU provider leaves
    activations (extended: those ``FusedConv`` cannot take) and the residual Add as nodes of
    their own; a model decomposed with the rules for that level has one standalone kernel
    per such node of onnxruntime's optimized graph (hardswish, HardSigmoid and Mul there, is
    one kernel), and the rules of the NCHWc layout stay with the all level."""
    import collections

    import onnx
    import onnxruntime as ort
    from builders import NetBuilder

    from archpass.analysis import analyze
    from archpass.costmodel.backends.onnxruntime import session_options
    from archpass.costmodel.host import host_fusion, nchwc_block
    from archpass.costmodel.kernels import decompose
    from archpass.model import load_model

    net = (NetBuilder((1, 3, 32, 32)).conv(16, 3, stride=2, act="relu").ibn(16, expand=4).conv(24, 1, act="silu")
           .se("sigmoid").conv(24, 1, act="hardswish").conv(24, 3, act="hardsigmoid").conv(24, 3, act="sigmoid"))
    path = tmp_path / "m.onnx"
    onnx.save(net.head(10).build(), path)
    so = session_options(1, graph_opt=level)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ran = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    cpu = load_target("cpu")
    rules = host_fusion(cpu.fusion, "CPUExecutionProvider", level)
    got = collections.Counter(k.op for k in decompose(analyze(load_model(path)), rules))
    assert got["Add"] == ran["Add"] == 1  # the IBN's residual
    assert got["Conv"] == ran["Conv"] + ran["FusedConv"] == 10
    if level == "extended":
        # FusedConv takes Relu, Clip, Sigmoid and HardSigmoid (the hardswish's stays); the
        # swish runs as one QuickGelu (two kernels here)
        assert got["Relu"] == got["Clip"] == got["HardSigmoid"] == ran["Relu"] == ran["Clip"] == 0
        assert got["HardSwish"] == ran["HardSigmoid"] == 1
        assert ran["QuickGelu"] == 1 and got["Sigmoid"] == 1 and got["Mul"] == ran["Mul"] == 2
    else:
        for op in ("Relu", "Clip", "Sigmoid"):
            assert got[op] == ran[op] > 0, op
        assert got["HardSwish"] == got["HardSigmoid"] == 1 and ran["HardSigmoid"] == 2
        assert got["Mul"] + 1 == ran["Mul"] == 3
    assert rules.nchwc_block == cpu.fusion.nchwc_block  # not read below the all level
    assert host_fusion(cpu.fusion, "CPUExecutionProvider", "all") == replace(cpu.fusion, nchwc_block=nchwc_block())


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
"""


def test_cpu_signature_tells_apart_processors_with_one_generic_name(tmp_path, monkeypatch):
    """Virtual machines name processors of different generations alike ("AMD EPYC"): the
    fingerprint also records vendor, family, model and stepping (ARM: implementer, part,
    variant), and a target recorded with another signature gets the other-host note."""
    from archpass.costmodel import host

    x86, arm, empty = tmp_path / "x86", tmp_path / "arm", tmp_path / "empty"
    x86.write_text(X86_CPUINFO)
    arm.write_text(ARM_CPUINFO)
    empty.write_text("")
    # the first processor's block only
    assert host._cpu_signature(str(x86)) == "vendor AuthenticAMD family 23 model 1 stepping 2"
    assert host._cpu_signature(str(arm)) == "implementer 0x41 part 0xd0c variant 0x3"
    assert host._cpu_signature(str(empty)) is None
    assert host._cpu_signature(str(tmp_path / "missing")) is None

    monkeypatch.setattr(host, "cpu_signature", lambda: "vendor AuthenticAMD family 23 model 1 stepping 2")
    fp = fingerprint("CPUExecutionProvider", 1)
    assert fp["cpu_signature"] == "vendor AuthenticAMD family 23 model 1 stepping 2" and same_machine(fp)
    other = {**fp, "cpu_signature": "vendor AuthenticAMD family 25 model 17 stepping 1"}
    assert not same_machine(other)
    assert same_machine({k: v for k, v in fp.items() if k != "cpu_signature"})  # recorded before signatures
    cpu = load_target("cpu")
    (note,) = host_notes(replace(cpu, source={**cpu.source, "host": other}))
    assert "family 25 model 17" in note and "family 23 model 1 stepping 2)" in note
    # per-user defaults stay keyed as before: the signature is not part of the id
    before = host.host_id()
    monkeypatch.setattr(host, "cpu_signature", lambda: "vendor AuthenticAMD family 25 model 17 stepping 1")
    assert host.host_id() == before and not same_machine(fp)
