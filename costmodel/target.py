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

An adapted target (``archpass calibrate --adapt``) keeps the target it was adapted from
in ``prior/`` (a target directory of its own) and stores ``"prior": "prior"`` and
``"corrections"`` (:class:`~archpass.costmodel.predictor.Correction` per kernel kind) in
place of its own predictors: a prediction is the prior's, corrected.

onnxruntime targets record the host they were measured on in ``source.host``
(:mod:`archpass.costmodel.host`).

Nothing in a target is executable: JSON and LightGBM text only.  A :class:`Target` is
immutable: builders return new targets (``dataclasses.replace``), and
:func:`save_target` writes files without touching the target it is given.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from archpass.costmodel.kernels import FusionRules
from archpass.costmodel.predictor import Correction, Predictor
from archpass.errors import TargetError

FORMAT = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "targets"
REQUIRED = ("name", "parallelism", "bytes_per_element", "source", "predictors")


def corrections_json(corrections: dict[str, Correction]) -> dict:
    """The ``prior``/``corrections`` keys of an adapted target's ``target.json``; residual
    trees several kinds share are stored once, under ``correction_trees`` (``trees_ref``)."""
    import hashlib

    trees: dict[str, str] = {}
    out = {}
    for k, c in sorted(corrections.items()):
        d = c.to_json()
        if d.get("trees"):
            ref = hashlib.sha256(d["trees"].encode()).hexdigest()[:16]
            trees[ref] = d.pop("trees")
            d["trees_ref"] = ref
        out[k] = d
    return {"prior": PRIOR_DIR, "corrections": out, **({"correction_trees": trees} if trees else {})}


def corrections_from_json(doc: dict) -> dict[str, Correction]:
    trees = dict(doc.get("correction_trees") or {})
    out = {}
    for k, v in dict(doc.get("corrections") or {}).items():
        if v.get("trees_ref"):
            v = {**v, "trees": trees[v["trees_ref"]]}
        out[str(k)] = Correction.from_json(v)
    return out


@dataclass(frozen=True)
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
    #: the target this one was adapted from, and the corrections applied to its predictions
    prior: "Target | None" = None
    corrections: dict[str, Correction] = field(default_factory=dict)
    #: where the target was found: "builtin", "user" (the per-user folder) or "path"
    origin: str = "path"

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
            "kernel_kinds": sorted(self.predictors or (self.prior.predictors if self.prior else {})),
            "accuracy": self.accuracy,
            "origin": self.origin,
            "adapted_from": self.prior.name if self.prior is not None else None,
            "corrections": {k: c.method for k, c in sorted(self.corrections.items())},
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
            "predictors": {k: p.to_json(model_file(k, p)) for k, p in sorted(self.predictors.items())},
            "accuracy": self.accuracy,
            **(corrections_json(self.corrections) if self.prior is not None else {}),
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


PRIOR_DIR = "prior"


def model_file(kind: str, p: Predictor) -> str | None:
    """Where a predictor's LightGBM text lives inside a target directory (None: no trees)."""
    return f"predictors/{kind}.txt" if p.booster is not None else None


# ---------------------------------------------------------------------- writing
def _atomic_write(path: Path, text: str) -> None:
    from archpass.io import atomic_write_text

    atomic_write_text(path, text)


def save_target(target: Target, directory: str | Path) -> Path:
    """Write ``target`` to ``directory`` (created if needed); every file atomically.  The
    target is not changed: ``load_target(save_target(t, d))`` is ``t`` with its path set.
    An adapted target's prior is written to ``directory/prior``; the ZigZag YAMLs a
    source names are copied along when they are not there yet."""
    from archpass.io import check_output_dir

    d = check_output_dir(directory)
    (d / "predictors").mkdir(parents=True, exist_ok=True)
    for kind, p in target.predictors.items():
        text = p.model_text()
        if text is not None:
            _atomic_write(d / model_file(kind, p), text)
    if target.prior is not None:
        save_target(target.prior, d / PRIOR_DIR)
    for key in ("hardware", "mapping"):
        name = target.source.get(key)
        if name and target.path is not None and not Path(name).is_absolute():
            src, dst = Path(target.path) / name, d / name
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)
    _atomic_write(d / "target.json", json.dumps(target.to_json(), indent=1) + "\n")
    return d


# ---------------------------------------------------------------------- reading
def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "target.json").is_file())


# ---------------------------------------------------------------------- the per-user folder
DEFAULTS_FILE = "defaults.json"


def user_dir() -> Path:
    """The per-user target folder: ``$ARCHPASS_TARGETS``, else
    ``$XDG_CONFIG_HOME/archpass/targets`` (``~/.config/archpass/targets``)."""
    env = os.environ.get("ARCHPASS_TARGETS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "archpass" / "targets"


def user_names() -> list[str]:
    d = user_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "target.json").is_file())


def _read_defaults() -> dict:
    p = user_dir() / DEFAULTS_FILE
    if not p.is_file():
        return {"format": 1, "hosts": {}}
    try:
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("hosts", {}), dict):
            raise ValueError("not a JSON object with 'hosts'")
    except (OSError, UnicodeError, ValueError) as exc:
        raise TargetError(f"{p} is broken ({type(exc).__name__}: {exc})",
                          "fix or delete it (it only holds which user target is the default for a name)") from None
    doc.setdefault("hosts", {})
    return doc


def defaults_here() -> dict[str, str]:
    """Target name -> user target that replaces it on this host (``archpass targets --set-default``)."""
    from archpass.costmodel.host import host_id

    return dict(_read_defaults()["hosts"].get(host_id(), {}).get("defaults", {}))


def set_default(name: str, user_target: str | None) -> Path:
    """Make the user target ``user_target`` the one ``name`` resolves to on this host
    (None removes the default).  Returns the defaults file."""
    from archpass.costmodel.host import host_id, machine

    if user_target is not None and user_target not in user_names():
        known = ", ".join(user_names()) or "none"
        raise TargetError(f"no user target '{user_target}' in {user_dir()} (user targets: {known})",
                          "install one with 'archpass calibrate --adapt ... --install' or copy a target directory there")
    doc = _read_defaults()
    entry = doc["hosts"].setdefault(host_id(), {"machine": machine(), "defaults": {}})
    if user_target is None:
        entry["defaults"].pop(name, None)
    else:
        entry["defaults"][name] = user_target
    path = user_dir() / DEFAULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return path


def install_target(target: Target, name: str | None = None) -> Path:
    """Copy ``target`` into the per-user folder as ``name`` (default: its own name)."""
    dest = user_dir() / (name or target.name)
    if dest.exists() and not (dest / "target.json").is_file():
        raise TargetError(f"{dest} exists and is not a target directory", "remove it or install under another --name")
    return save_target(target, dest)


def _resolve(name_or_path: str | Path) -> tuple[Path, str]:
    s = str(name_or_path)
    default = defaults_here().get(s)
    if default is not None and (user_dir() / default / "target.json").is_file():
        return user_dir() / default, "user"
    if s in builtin_names():
        return BUILTIN_DIR / s, "builtin"
    if s in user_names() and os.sep not in s:
        return user_dir() / s, "user"
    p = Path(s).expanduser()
    if p.is_dir() and (p / "target.json").is_file():
        return p, "path"
    if p.is_file() and p.name.endswith(".json"):
        return p.parent, "path"
    if p.is_dir():
        raise TargetError(f"{p} has no target.json", "point --target at a directory written by 'archpass calibrate'")
    known = ", ".join(sorted(set(builtin_names()) | set(user_names()))) or "none"
    raise TargetError(f"unknown target '{s}' (known targets: {known})", "use one of them or the path of a target directory")


def load_target(name_or_path: str | Path) -> Target:
    """A target by name (a default set for this host, a built-in, a user target), or a
    target directory (or its target.json) by path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    d, origin = _resolve(name_or_path)
    return _load_dir(d, origin, Path(name_or_path))


def _load_dir(d: Path, origin: str, given: Path | None = None, depth: int = 0) -> Target:
    tj = d / "target.json" if (d / "target.json").exists() or given is None else given
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
    prior = None
    if doc.get("prior") is not None:
        pd = (d / str(doc["prior"])).resolve()
        if d.resolve() not in pd.parents or depth > 8:
            raise TargetError(f"target {d} names a prior outside its directory", "re-run 'archpass calibrate --adapt'")
        prior = _load_dir(pd, origin, None, depth + 1)
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
            builtin=origin == "builtin",
            prior=prior,
            corrections=corrections_from_json(doc),
            origin=origin,
        )
    except TargetError:
        raise
    except Exception as exc:  # malformed values, broken LightGBM text, missing predictor files
        raise TargetError(f"target {d} is broken: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "re-run 'archpass calibrate' to regenerate it") from None
    if target.parallelism < 1 or target.bytes_per_element < 1:
        raise TargetError(f"target file {tj} has parallelism/bytes_per_element below 1", "fix the values")
    if not target.predictors and target.prior is None:
        raise TargetError(f"target {d} has no predictors", "run 'archpass calibrate' to fit them")
    return target


def list_targets(broken: list[str] | None = None) -> list[Target]:
    """The built-in targets, then the per-user folder's.  A user target that does not load
    is left out, and its one-line error appended to ``broken`` when given."""
    out = [_load_dir(BUILTIN_DIR / n, "builtin") for n in builtin_names()]
    for n in user_names():
        try:
            out.append(_load_dir(user_dir() / n, "user"))
        except TargetError as exc:
            if broken is not None:
                broken.append(f"user target {n}: {exc.line()}")
    return out


__all__ = ["Target", "load_target", "save_target", "list_targets", "builtin_names", "user_names", "user_dir",
           "set_default", "defaults_here", "install_target", "replace"]
