"""ZigZag measurement backend: single-layer ONNX models through
``zigzag.api.get_hardware_performance_zigzag`` on a hardware and a mapping YAML.

ZigZag's ONNX parser evaluates Conv, Gemm and MatMul nodes; every other op is a dummy
node with no cost, and a whole model's latency is the sum of its layers' latencies.  A
layer takes about a second with ``lpf_limit=4``.  Cycles become milliseconds through the
target clock.  ZigZag raises on some layers; :func:`measure_layer` returns the error
instead, and calibrations record such points as failed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from archpass.costmodel.kernels import Kernel
from archpass.errors import TargetError

DEFAULT_LPF_LIMIT = 4


def _import_zigzag():
    try:
        import six  # noqa: F401  (zigzag-dse imports it without declaring it)
        from zigzag.api import get_hardware_performance_zigzag
    except ImportError as exc:
        raise TargetError(f"the zigzag backend needs zigzag-dse and six ({exc})",
                          "install them with: pip install 'archpass[zigzag]'") from None
    return get_hardware_performance_zigzag


def _pads(in_size: int, out_size: int, k: int, s: int) -> tuple[int, int]:
    total = max((out_size - 1) * s + k - in_size, 0)
    return total // 2, total - total // 2


def layer_model(k: Kernel) -> onnx.ModelProto:
    """A one-node ONNX model with the kernel's geometry (weights are zeros: ZigZag reads shapes)."""
    if k.kind == "gemm":
        w = numpy_helper.from_array(np.zeros((k.cout, k.cin), np.int8).astype(np.float32), "W")
        node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="layer")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k.cin])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k.cout])
    else:
        g = max(k.groups, 1)
        w = numpy_helper.from_array(np.zeros((k.cout, k.cin // g, *k.kernel), np.float32), "W")
        pt, pb = _pads(k.in_hw[0], k.out_hw[0], k.kernel[0], k.stride[0])
        pl, pr = _pads(k.in_hw[1], k.out_hw[1], k.kernel[1], k.stride[1])
        node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=list(k.kernel), strides=list(k.stride),
                                pads=[pt, pl, pb, pr], group=g, name="layer")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k.cin, *k.in_hw])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k.cout, *k.out_hw])
    graph = helper.make_graph([node], "layer", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


@contextlib.contextmanager
def _quiet():
    # ZigZag's API calls logging.basicConfig(level=INFO): undo that afterwards too
    previous = logging.root.manager.disable
    handlers, level = list(logging.root.handlers), logging.root.level
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def evaluate_cycles(model: onnx.ModelProto | str, hardware: str | Path, mapping: str | Path,
                    lpf_limit: int = DEFAULT_LPF_LIMIT) -> float:
    """ZigZag's latency (cycles) for a model (one layer or a whole network)."""
    run = _import_zigzag()
    if isinstance(model, onnx.ModelProto):
        model = onnx.shape_inference.infer_shapes(model)  # ZigZag reads every tensor's shape from value_info
    dump = tempfile.mkdtemp(prefix="archpass-zigzag-")
    try:
        with _quiet():
            _, latency, _ = run(model, str(hardware), str(mapping), opt="latency", dump_folder=dump,
                                lpf_limit=lpf_limit, loma_show_progress_bar=False)
        return float(latency)
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def measure_layer(spec: dict, hardware: str, mapping: str, clock_hz: float, lpf_limit: int = DEFAULT_LPF_LIMIT) -> dict:
    """Measure one layer kernel; returns ``{"ms": ..., "cycles": ...}`` or ``{"error": ...}``."""
    try:
        k = Kernel.from_spec(spec)
        cycles = evaluate_cycles(layer_model(k), hardware, mapping, lpf_limit)
        return {"ms": cycles / clock_hz * 1e3, "cycles": cycles}
    except TargetError:
        raise
    except Exception as exc:  # ZigZag raises ZeroDivisionError, ValueError, AssertionError on some layers
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


def check_inputs(hardware: str | Path, mapping: str | Path) -> None:
    """Validate the YAMLs once (a tiny layer) so a bad hardware file fails with one clear line."""
    for what, p in (("hardware", hardware), ("mapping", mapping)):
        if not Path(p).is_file():
            raise TargetError(f"{what} file not found: {p}", f"pass an existing ZigZag {what} YAML")
        if not str(p).endswith(".yaml"):
            raise TargetError(f"{what} file {p} must end in .yaml (ZigZag requires it)", "rename the file")
    probe = Kernel(id="probe", kind="conv", op="Conv", nodes=(), cin=8, cout=8, kernel=(3, 3), in_hw=(8, 8), out_hw=(8, 8))
    try:
        evaluate_cycles(layer_model(probe), hardware, mapping, 2)
    except TargetError:
        raise
    except BaseException as exc:  # ZigZag validators call sys.exit or raise on a bad YAML
        if isinstance(exc, KeyboardInterrupt):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TargetError(f"ZigZag rejects hardware {hardware} / mapping {mapping}: {type(exc).__name__}: {msg}"[:400],
                          "fix the YAML (see zigzag/inputs/hardware for examples)") from None


def hardware_facts(hardware: str | Path, mapping: str | Path) -> dict:
    """Parallelism, spatial unrolling and off-chip bandwidth read from the YAMLs."""
    import yaml

    try:
        hw = yaml.safe_load(Path(hardware).read_text())
        mp = yaml.safe_load(Path(mapping).read_text())
    except Exception as exc:
        raise TargetError(f"cannot read ZigZag YAML ({type(exc).__name__}: {exc})", "check the hardware/mapping files") from None
    unroll: dict[str, int] = {}
    default = None
    for entry in mp if isinstance(mp, list) else []:
        if isinstance(entry, dict) and entry.get("name") == "default":
            default = entry
    if default is None:
        raise TargetError(f"mapping {mapping} has no 'default' entry", "add one (see zigzag/inputs/mapping)")
    for dims in (default.get("spatial_mapping") or {}).values():
        for item in dims:
            dim, size = str(item).split(",")
            unroll[dim.strip()] = unroll.get(dim.strip(), 1) * int(size)
    dram_bw = 64.0
    try:
        mems = hw["memories"]
        top = max(mems.values(), key=lambda m: m.get("size", 0))
        dram_bw = float(max(p.get("bandwidth_max", 0) for p in top["ports"]))
    except Exception:
        pass
    parallelism = max(unroll.get("K", 1), unroll.get("C", 1))
    return {"unroll": unroll, "mem_bits_per_step": dram_bw, "parallelism": parallelism, "name": hw.get("name")}


def available() -> bool:
    try:
        _import_zigzag()
        return True
    except TargetError:
        return False

