"""archpass: a hardware-aware model optimizer working as a compiler pass over ONNX."""

__version__ = "0.1.0"

from archpass.errors import ArchpassError, CheckFailed, ModelLoadError, RecipeError, TargetError  # noqa: E402

__all__ = ["ArchpassError", "CheckFailed", "ModelLoadError", "RecipeError", "TargetError", "__version__"]


def __getattr__(name: str):
    """``archpass.optimize`` from the API facade, imported on first use (keeps ``import archpass`` light)."""
    if name == "optimize":
        from archpass.api import optimize

        return optimize
    raise AttributeError(f"module 'archpass' has no attribute {name!r}")
