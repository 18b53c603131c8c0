"""archpass: a hardware-aware model optimizer working as a compiler pass over ONNX."""

__version__ = "0.1.0"

from archpass.errors import ArchpassError, CheckFailed, ModelLoadError, RecipeError, TargetError  # noqa: E402

__all__ = ["ArchpassError", "CheckFailed", "ModelLoadError", "RecipeError", "TargetError", "__version__"]
