"""Real torchvision architectures for tests (committed skeletons) and benchmarks (torch exports).

Tests use :func:`model_path`: the architecture's weight-free skeleton committed under
``tests/skeletons/`` (see ``tests/skeleton.py``), filled with seeded random weights and
written once into ``$ARCHPASS_TEST_CACHE/skeletons``, keyed by the skeleton's hash.  No
torch needed.  ``python tests/make_skeletons.py`` regenerates the skeletons from fresh
torch exports where torch and torchvision are installed.

Benchmarks that want the real export use :func:`export_model`.  Exports are cached in ``$ARCHPASS_TEST_CACHE`` (default ``~/.cache/archpass-tests/onnx``),
keyed by model name, variant and the torch/torchvision versions, so a rerun is a file lookup.
Weights are random (``weights=None``) but seeded, so the same version always exports the
same model. Files are written atomically (temp file in the cache folder + ``os.replace``),
so an interrupted export never leaves a truncated model behind.

Usage from a test: the ``zoo_model`` fixture in ``tests/conftest.py`` (or
``zoo.model_path("resnet18")``).  ``zoo.export_model`` skips the calling test when
torch/torchvision are not importable.  ``python tests/zoo.py [NAME ...]`` exports and
times models from the shell.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

SEED = 0
INPUT_SHAPE = (1, 3, 224, 224)
OPSET = 17

# name -> extra torchvision constructor kwargs
MODELS: dict[str, dict] = {
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "mobilenet_v3_large": {},
    "efficientnet_b0": {},
    "mnasnet1_0": {},
    "resnet18": {},
    "resnet50": {},
    "regnet_y_400mf": {},
    "shufflenet_v2_x1_0": {},
    "squeezenet1_0": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "densenet121": {},
    "convnext_tiny": {},
    # MobileNetV2 siblings for --seed-recipe (issue 10): narrower, and at a smaller input
    "mobilenet_v2_w075": {"width_mult": 0.75},
    "mobilenet_v2_160": {},
    # a segmentation head (torchvision.models.segmentation, its "out" map): Resizes to the size of
    # other tensors, which the resolution pass must follow (archpass.sizelinks)
    "lraspp_mobilenet_v3_large": {"num_classes": 21, "weights_backbone": None},
}

# models built by torchvision.models.segmentation (their output: the "out" entry of the dict)
SEGMENTATION = ("lraspp_mobilenet_v3_large",)

# name -> (torchvision constructor, input H = W) for the models that are variants of another
VARIANTS: dict[str, tuple[str, int]] = {"mobilenet_v2_w075": ("mobilenet_v2", 224), "mobilenet_v2_160": ("mobilenet_v2", 160)}


def input_shape(name: str) -> tuple[int, int, int, int]:
    """The static input shape model ``name`` is exported at (``INPUT_SHAPE`` unless a variant says otherwise)."""
    hw = VARIANTS.get(name, (name, INPUT_SHAPE[-1]))[1]
    return (*INPUT_SHAPE[:2], hw, hw)

# Models also available with a dynamic batch dimension (input dim 0 named "N").
DYNAMIC_BATCH = ("mobilenet_v2", "lraspp_mobilenet_v3_large")


SKELETONS = Path(__file__).resolve().parent / "skeletons"


def _check_name(name: str, dynamic_batch: bool) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    if dynamic_batch and name not in DYNAMIC_BATCH:
        raise KeyError(f"no dynamic-batch variant for {name!r}; available: {', '.join(DYNAMIC_BATCH)}")


def skeleton_path(name: str, *, dynamic_batch: bool = False) -> Path:
    """The committed skeleton of zoo model ``name`` (``tests/skeletons/<name>[-dynbatch].onnx``)."""
    _check_name(name, dynamic_batch)
    return SKELETONS / f"{name}{'-dynbatch' if dynamic_batch else ''}.onnx"


def model_path(name: str, *, dynamic_batch: bool = False) -> Path:
    """Path to the full ONNX model of ``name``: its skeleton filled with seeded random weights.

    Materialized once into ``cache_dir()/skeletons`` (atomically), under a name that carries
    the skeleton's hash, so an edited skeleton never meets a stale file.
    """
    import onnx

    from skeleton import fill

    skel_file = skeleton_path(name, dynamic_batch=dynamic_batch)
    data = skel_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    out_dir = cache_dir() / "skeletons"
    path = out_dir / f"{skel_file.stem}-{digest}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    full = fill(onnx.load_from_string(data))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(full.SerializeToString())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cache_dir() -> Path:
    env = os.environ.get("ARCHPASS_TEST_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "archpass-tests" / "onnx"
    return root.expanduser()


def _require_torch():
    """Import torch and torchvision, or skip the calling test."""
    try:
        import torch
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        import pytest

        pytest.skip(f"torch/torchvision not importable ({exc}); install with: pip install -e '.[bench]'")
    return torch, torchvision


def _file_name(name: str, dynamic_batch: bool, torch, torchvision) -> str:
    variant = "dynbatch" if dynamic_batch else "static"
    tv = torchvision.__version__.replace("+", "_")
    tv_torch = torch.__version__.replace("+", "_")
    return f"{name}-{variant}-opset{OPSET}-torch{tv_torch}-tv{tv}.onnx"


def cached_path(name: str, *, dynamic_batch: bool = False) -> Path | None:
    """Path of the cached export if it already exists (None otherwise); never exports."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    path = cache_dir() / _file_name(name, dynamic_batch, torch, torchvision)
    return path if path.exists() else None


def export_model(name: str, *, dynamic_batch: bool = False) -> Path:
    """Export torchvision model ``name`` (random seeded weights, eval mode) and return its path.

    The input is ``input`` of shape ``input_shape(name)`` (1x3x224x224 but for variants; dim 0 is ``"N"`` when ``dynamic_batch``),
    the output ``output``; opset 17, TorchScript exporter (``dynamo=False``).
    """
    _check_name(name, dynamic_batch)
    torch, torchvision = _require_torch()

    out_dir = cache_dir()
    path = out_dir / _file_name(name, dynamic_batch, torch, torchvision)
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    arch = VARIANTS.get(name, (name,))[0]
    if name in SEGMENTATION:
        seg = getattr(torchvision.models.segmentation, arch)(weights=None, **MODELS[name])

        class Out(torch.nn.Module):  # the dict's "out" map, as deployed
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(x)["out"]

        model = Out(seg)
    else:
        model = getattr(torchvision.models, arch)(weights=None, **MODELS[name])
    return export_onnx(model, path, dynamic_batch=dynamic_batch, input_shape=input_shape(name))


def export_onnx(model, path: Path, *, dynamic_batch: bool = False, input_shape: tuple[int, ...] = INPUT_SHAPE) -> Path:
    """Export torch ``model`` (put in eval mode) to ``path`` atomically; the zoo's export settings.

    Input ``input`` of ``input_shape`` (dim 0 ``"N"`` when ``dynamic_batch``), output ``output``,
    opset 17, TorchScript exporter. The dummy input is drawn from torch's global RNG after
    the model is built; it does not affect the exported graph.
    """
    torch, _ = _require_torch()
    path = Path(path)
    dynamic_axes = {"input": {0: "N"}, "output": {0: "N"}} if dynamic_batch else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter (dynamo=False) is deprecated but is what the brief asks for
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model.eval(),
                (torch.randn(*input_shape),),
                tmp,
                opset_version=OPSET,
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=dynamic_axes,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def main(argv: list[str] | None = None) -> int:
    """Export (or find cached) models and print the time each took."""
    import sys

    names = (argv if argv is not None else sys.argv[1:]) or list(MODELS)
    total = 0.0
    for name in names:
        for dyn in (False, True) if name in DYNAMIC_BATCH else (False,):
            was_cached = cached_path(name, dynamic_batch=dyn) is not None
            t0 = time.perf_counter()
            path = export_model(name, dynamic_batch=dyn)
            dt = time.perf_counter() - t0
            total += dt
            label = name + (" (dynamic batch)" if dyn else "")
            state = "cached" if was_cached else "exported"
            print(f"{label:34s} {state:8s} {dt:7.2f} s  {path.stat().st_size / 1e6:7.1f} MB  {path}")
    print(f"{'total':34s} {'':8s} {total:7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
