"""Corpus test: every ONNX file installed packages ship (onnx's backend test data is always
there with onnx; onnxruntime, zigzag... add theirs), plus corrupted files generated from
them, must inspect or be refused cleanly: an ArchpassError and exit code 2, never a
traceback.  Files are discovered at test time.

Six of onnx's "light" models generate hundreds of MB of weights with ConstantOfShape,
which canonicalization folds (5-30 s each, about 70 s together): they run only with
``ARCHPASS_CORPUS_FULL=1``.
"""

from __future__ import annotations

import os
import random
import site
import sysconfig
import time
import traceback
from pathlib import Path

import onnx
from typer.testing import CliRunner

from archpass import api
from archpass.cli.main import app
from archpass.errors import ArchpassError

MAX_BYTES = 20 << 20
HEAVY = {"light_bvlc_alexnet", "light_densenet121", "light_inception_v2", "light_resnet50", "light_vgg19",
         "light_zfnet512"}
FULL = os.environ.get("ARCHPASS_CORPUS_FULL") == "1"
REPO = Path(__file__).resolve().parents[1]


def _ours(p: Path) -> bool:
    """A file of this repository (our own skeletons, caches), but not one of an installed
    package in a virtual environment that happens to live inside the clone (``.venv/``)."""
    return REPO in p.parents and "site-packages" not in p.relative_to(REPO).parts


def installed_models() -> list[Path]:
    """Every ``*.onnx`` under 20 MB in the site-packages folders (the repository excluded)."""
    roots = {Path(p) for p in site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]}
    roots.add(Path(onnx.__file__).parent)  # always holds backend/test/data
    found: set[Path] = set()
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if f.endswith(".onnx") and not _ours(p.resolve()) and p.stat().st_size <= MAX_BYTES:
                    found.add(p.resolve())
    return sorted(p for p in found if FULL or p.stem not in HEAVY)


def _pins(path: Path) -> list[str]:
    """--input-shape flags pinning every dynamic input dim to 1 (so such models reach the analysis)."""
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    inits = {i.name for i in m.graph.initializer}
    out = []
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.name in inits or not dims or all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            continue
        out.append(f"{vi.name}:" + ",".join(str(d.dim_value) if d.dim_value > 0 else "1" for d in dims))
    return out


def corrupted(src: Path, out_dir: Path, flips: int, seed: int) -> list[Path]:
    """Empty, random, wrong-magic, text, truncated and bit-flipped variants of ``src``."""
    data = src.read_bytes()
    rng = random.Random(seed)
    cases = {"empty": b"", "random": rng.randbytes(4096), "magic": b"PK\x03\x04" + data[4:], "text": b"hello\n"}
    for f in (0.1, 0.5, 0.9, 0.999):
        cases[f"trunc{f}"] = data[: int(len(data) * f)]
    for i in range(flips):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 4, 16))):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        cases[f"flip{i}"] = bytes(b)
    paths = []
    for name, blob in cases.items():
        p = out_dir / f"{src.stem}-{name}.onnx"
        p.write_bytes(blob)
        paths.append(p)
    return paths


def _inspect_all(paths: list[Path]) -> tuple[dict[str, int], list[str]]:
    counts = {"inspected": 0, "refused": 0}
    bugs = []
    for p in paths:
        try:
            api.inspect(p, _pins(p) or None)
            counts["inspected"] += 1
        except ArchpassError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - what this test hunts
            bugs.append(f"{p}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")
    return counts, bugs


def test_installed_models_inspect_or_are_refused_cleanly(capsys):
    paths = installed_models()
    assert len(paths) >= 100, "onnx ships its backend test models: discovery is broken"
    t0 = time.perf_counter()
    counts, bugs = _inspect_all(paths)
    with capsys.disabled():
        print(f"\ncorpus: {len(paths)} installed models, {counts} in {time.perf_counter() - t0:.1f} s")
    assert not bugs, "\n".join(bugs[:5])
    assert counts["inspected"] >= 100


def test_corrupted_models_are_refused_cleanly(tmp_path, capsys):
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    sources = [REPO / "examples" / "mobilenet_v2.onnx", data / "pytorch-converted" / "test_Conv2d" / "model.onnx",
               data / "light" / "light_squeezenet.onnx"]
    paths = [p for i, s in enumerate(sources) for p in corrupted(s, tmp_path, 40, i)]
    t0 = time.perf_counter()
    counts, bugs = _inspect_all(paths)
    with capsys.disabled():
        print(f"\ncorpus: {len(paths)} corrupted files, {counts} in {time.perf_counter() - t0:.1f} s")
    assert not bugs, "\n".join(bugs[:5])
    assert counts["refused"] >= 3 * 8  # the empty, random, wrong-magic, text and truncated ones at least


def test_cli_refuses_a_corrupted_file_with_one_line(tmp_path):
    p = corrupted(REPO / "examples" / "mobilenet_v2.onnx", tmp_path, 0, 0)[5]  # truncated at half
    r = CliRunner().invoke(app, ["inspect", str(p)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
