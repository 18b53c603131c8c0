"""Every ``from archpass... import name`` in the repository resolves, the ones inside
functions too: benchmarks and lazily imported code paths run rarely (a benchmark's report
phase, an optional backend), so a name moved or renamed would otherwise only fail there."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("archpass", "passes", "costmodel", "search", "cli", "benchmarks", "tests")


def unresolved_imports(paths) -> list[str]:
    """``file:line module.name`` of every ``from archpass.X import name`` (at any depth)
    whose module does not import or has no such attribute or submodule."""
    bad = []
    for path in paths:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] == "archpass"):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                bad.append(f"{path}:{node.lineno} {node.module} ({e})")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    bad.append(f"{path}:{node.lineno} {node.module}.{alias.name}")
    return bad


def test_a_moved_name_is_caught(tmp_path):
    src = tmp_path / "uses.py"
    src.write_text("def f():\n    from archpass.costmodel.adapt import refit, no_such_name\n"
                   "    from archpass.costmodel import adapt_fit\n    from archpass.no_such_module import x\n")
    bad = unresolved_imports([src])
    assert [b.split(" ", 1)[1].split(" (")[0] for b in bad] == ["archpass.costmodel.adapt.no_such_name",
                                                                  "archpass.no_such_module"]
    assert all(b.startswith(f"{src}:") for b in bad)


def test_every_archpass_import_in_the_repository_resolves():
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100
    assert unresolved_imports(files) == []
