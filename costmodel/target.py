"""Targets: what a piece of hardware computes in parallel, what it fuses, how it was
measured, and the latency predictors fitted to those measurements.

A target is a directory users can write and share::

    mytarget/
      target.json          # everything below except the LightGBM models
      predictors/<kind>.txt  # one LightGBM text model per kernel kind
      dataset.jsonl        # the measured points the predictors were fitted on (optional)
      *.yaml               # ZigZag hardware and mapping descriptions (zigzag targets)

``target.json``::

    {"format": 1, "name": "edgetpu", "description": "...", "parallelism": 8,
     "dtype": "int8", "bytes_per_element": 1, "clock_hz": 5e8,
     "unroll": {"K": 8, "C": 8, "OX": 4, "OY": 4}, "mem_bits_per_step": 64,
     "fusion": {"activations": [...], "residual_add": false, "layers_only": true},
     "source": {"backend": "zigzag", "hardware": "hw.yaml", "mapping": "map.yaml", "lpf_limit": 4},
     "predictors": {"conv": {...}, ...}, "accuracy": {...}}

Nothing in a target is executable: JSON and LightGBM text only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from archpass.costmodel.kernels import FusionRules
from archpass.costmodel.predictor import Predictor
from archpass.errors import TargetError

FORMAT = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "targets"
REQUIRED = ("name", "parallelism", "bytes_per_element", "source", "predictors")


@dataclass
class Target:
    name: str
    description: str = ""
    parallelism: int = 1
    dtype: str = "float32"
    bytes_per_element: int = 4
    clock_hz: float | None = None
    unroll: dict = field(default_factory=dict)
    mem_bits_per_step: float = 64.0
    fusion: FusionRules = field(default_factory=FusionRules)
    source: dict = field(default_factory=dict)
    predictors: dict[str, Predictor] = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    path: Path | None = None
    builtin: bool = False

    @property
    def elem_bits(self) -> int:
        return 8 * self.bytes_per_element

    @property
    def backend(self) -> str:
        return str(self.source.get("backend", "?"))

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "parallelism": self.parallelism,
            "source": self.backend,
            "source_detail": {k: v for k, v in self.source.items() if k != "backend"},
            "clock_hz": self.clock_hz,
            "dtype": self.dtype,
            "bytes_per_element": self.bytes_per_element,
            "builtin": self.builtin,
            "path": str(self.path) if self.path else None,
            "kernel_kinds": sorted(self.predictors),
            "accuracy": self.accuracy,
        }

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "parallelism": self.parallelism,
            "dtype": self.dtype,
            "bytes_per_element": self.bytes_per_element,
            "clock_hz": self.clock_hz,
            "unroll": self.unroll,
            "mem_bits_per_step": self.mem_bits_per_step,
            "fusion": self.fusion.to_json(),
            "source": self.source,
            "predictors": {k: p.to_json() for k, p in sorted(self.predictors.items())},
            "accuracy": self.accuracy,
        }

    def source_file(self, key: str) -> Path:
        """A file the source names (a ZigZag YAML), resolved against the target directory."""
        value = self.source.get(key)
        if not value:
            raise TargetError(f"target '{self.name}' names no {key} file in its source", "add it to target.json")
        p = Path(value)
        if not p.is_absolute() and self.path is not None:
            p = self.path / p
        return p


# ---------------------------------------------------------------------- writing
def _atomic_write(path: Path, text: str) -> None:
    from archpass.io import atomic_write_text

    atomic_write_text(path, text)


def save_target(target: Target, directory: str | Path) -> Path:
    """Write ``target`` to ``directory`` (created if needed); every file atomically."""
    from archpass.io import check_output_dir

    d = check_output_dir(directory)
    (d / "predictors").mkdir(parents=True, exist_ok=True)
    for kind, p in target.predictors.items():
        text = p.model_text()
        p.model_file = f"predictors/{kind}.txt" if text is not None else None
        if text is not None:
            _atomic_write(d / p.model_file, text)
    _atomic_write(d / "target.json", json.dumps(target.to_json(), indent=1) + "\n")
    return d


# ---------------------------------------------------------------------- reading
def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "target.json").is_file())


def _resolve(name_or_path: str | Path) -> tuple[Path, bool]:
    s = str(name_or_path)
    if s in builtin_names():
        return BUILTIN_DIR / s, True
    p = Path(s).expanduser()
    if p.is_dir() and (p / "target.json").is_file():
        return p, False
    if p.is_file() and p.name.endswith(".json"):
        return p.parent, False
    if p.is_dir():
        raise TargetError(f"{p} has no target.json", "point --target at a directory written by 'archpass calibrate'")
    known = ", ".join(builtin_names()) or "none"
    raise TargetError(f"unknown target '{s}' (known targets: {known})", "use one of them or the path of a target directory")


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by name, or a target directory (or its target.json) by path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    d, builtin = _resolve(name_or_path)
    tj = d / "target.json" if (d / "target.json").exists() else Path(name_or_path)
    try:
        doc = json.loads(tj.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise TargetError(f"target file {tj} is not readable JSON ({type(exc).__name__}: {exc})",
                          "re-run 'archpass calibrate' or fix the file") from None
    if not isinstance(doc, dict):
        raise TargetError(f"target file {tj} does not hold a JSON object", "re-run 'archpass calibrate'")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise TargetError(f"target file {tj} misses {', '.join(missing)}", "re-run 'archpass calibrate' or add the keys")
    if doc.get("format", FORMAT) != FORMAT:
        raise TargetError(f"target file {tj} has format {doc.get('format')}, this archpass reads format {FORMAT}",
                          "re-run 'archpass calibrate' with this version")
    try:
        preds = {}
        for kind, pd in dict(doc["predictors"]).items():
            text = None
            if pd.get("model_file"):
                mf = (d / pd["model_file"]).resolve()
                if d.resolve() not in mf.parents:
                    raise ValueError(f"predictor file {pd['model_file']} lies outside the target directory")
                text = mf.read_text()
            preds[kind] = Predictor.from_json(pd, text)
        target = Target(
            name=str(doc["name"]),
            description=str(doc.get("description", "")),
            parallelism=int(doc["parallelism"]),
            dtype=str(doc.get("dtype", "float32")),
            bytes_per_element=int(doc["bytes_per_element"]),
            clock_hz=float(doc["clock_hz"]) if doc.get("clock_hz") else None,
            unroll={str(k): int(v) for k, v in dict(doc.get("unroll", {})).items()},
            mem_bits_per_step=float(doc.get("mem_bits_per_step", 64.0)),
            fusion=FusionRules.from_json(dict(doc.get("fusion", {}))),
            source=dict(doc["source"]),
            predictors=preds,
            accuracy=dict(doc.get("accuracy", {})),
            path=d,
            builtin=builtin,
        )
    except TargetError:
        raise
    except Exception as exc:  # malformed values, broken LightGBM text, missing predictor files
        raise TargetError(f"target {d} is broken: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "re-run 'archpass calibrate' to regenerate it") from None
    if target.parallelism < 1 or target.bytes_per_element < 1:
        raise TargetError(f"target file {tj} has parallelism/bytes_per_element below 1", "fix the values")
    if not target.predictors:
        raise TargetError(f"target {d} has no predictors", "run 'archpass calibrate' to fit them")
    return target


def list_targets() -> list[Target]:
    return [load_target(n) for n in builtin_names()]


__all__ = ["Target", "load_target", "save_target", "list_targets", "builtin_names", "replace"]
