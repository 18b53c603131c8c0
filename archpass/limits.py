"""What a rewrite may materialize: the output's size predicted from shapes, checked before
any weight is allocated.

The shape-only plan (:func:`archpass.passes.engine.plan`) gives every layer of the
output with its parameter count, so the size of the model a recipe would write is known
before onnx-graphsurgeon allocates a single array.  :func:`check_output_size` refuses,
with one line naming the limit and the flag that lifts it,

* a parameter count more than :data:`GROWTH_LIMIT` times the input's (each pass bounds
  its own choices, e.g. channels at most 4x; several rewrites together can still grow a
  model out of proportion, and this is the backstop for every path that materializes);
* an output above the 2 GB protobuf limit (written with external data when allowed);
* an activation tensor above 2^31 elements (runtimes index tensors with 32 bits, and it
  would need 8 GB of float32);
* an output that would not fit in this machine's available memory (no flag lifts that:
  materializing it would only get the process killed).

``allow_growth`` (``--allow-growth``) lifts the first two.  Every path that materializes a
recipe goes through :func:`archpass.passes.engine.apply_recipe`, which calls this.
"""

from __future__ import annotations

from dataclasses import dataclass

from archpass.errors import RecipeError
from archpass.structure import Structure

#: Largest parameter growth (output / input) applied without --allow-growth.
GROWTH_LIMIT = 16
#: Largest activation tensor (elements) written without --allow-growth: 32-bit indexing.
MAX_ELEMENTS = 2**31 - 1
FLAG = "--allow-growth (allow_growth=True in Python)"


@dataclass(frozen=True)
class OutputSize:
    params_before: int
    params_after: int
    bytes_before: int  # tensor data of the input model
    bytes_after: int  # predicted tensor data of the output
    largest_before: int = 0  # elements of the largest activation tensor
    largest_after: int = 0
    largest_name: str = ""

    @property
    def growth(self) -> float:
        return self.params_after / max(self.params_before, 1)


def _layer_bytes(s: Structure) -> int:
    total = 0
    for l in s.layers:
        t = s.tensors.get(l.weight)
        total += l.params * (t.elem_bytes if t is not None else 4)
    return total


def predict_output_size(weight_bytes: int, before: Structure, after: Structure) -> OutputSize:
    """The output's size: the input's tensor data plus what the layers gain or lose.
    (Per-channel constants such as norm parameters follow the channels too; they are a
    few bytes per channel, negligible next to the weights.)"""
    grown = weight_bytes + _layer_bytes(after) - _layer_bytes(before)
    big = max((t for t in after.tensors.values() if not t.const), key=lambda t: t.numel, default=None)
    return OutputSize(before.params, after.params, weight_bytes, max(grown, 0),
                      max((t.numel for t in before.tensors.values() if not t.const), default=0),
                      big.numel if big else 0, big.name if big else "")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: float) -> str:
    for unit, v in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= v:
            return f"{n / v:.1f} {unit}"
    return str(int(n))


def check_output_size(size: OutputSize, *, allow_growth: bool = False) -> None:
    """Raise RecipeError when the predicted output is out of proportion (see the module)."""
    from archpass.model import TWO_GB

    limit = TWO_GB
    what = (f"the recipe grows the model from {_count(size.params_before)} to {_count(size.params_after)} "
            f"parameters (about {_gb(size.bytes_after)})")
    if not allow_growth:
        if size.growth > GROWTH_LIMIT:
            raise RecipeError(f"{what}: {size.growth:,.0f}x the input's, above the {GROWTH_LIMIT}x limit",
                              f"check the recipe's values, or pass {FLAG} to write it anyway")
        if size.bytes_after > limit >= size.bytes_before:
            raise RecipeError(f"{what}, above the 2 GB protobuf limit of a single ONNX file",
                              f"pass {FLAG} to write it with its weights in external data (<output>.data beside it)")
        if size.largest_after > MAX_ELEMENTS >= size.largest_before:
            raise RecipeError(f"the recipe makes tensor '{size.largest_name}' {_count(size.largest_after)} elements, "
                              f"above the {_count(MAX_ELEMENTS)} a runtime indexes with 32 bits",
                              f"check the recipe's values, or pass {FLAG} to write it anyway")
    avail = available_memory()
    if avail is not None and size.bytes_after > avail:
        raise RecipeError(f"{what}, more than the {_gb(avail)} of memory available to build it",
                          "check the recipe's values (no flag lifts this limit)")
