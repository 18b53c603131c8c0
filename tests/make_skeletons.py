"""Regenerate the committed architecture skeletons (``tests/skeletons/``) from torch exports.

Needs torch and torchvision (``pip install -e '.[bench]'``)::

    python tests/make_skeletons.py            # every model in zoo.MODELS (+ dynamic-batch variants)
    python tests/make_skeletons.py resnet18   # just these

Each model is exported with the zoo's settings (``zoo.export_model``), stripped of its
weights (``skeleton.strip``) and written to ``tests/skeletons/<name>[-dynbatch].onnx``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from skeleton import strip  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(zoo.MODELS)
    zoo.SKELETONS.mkdir(exist_ok=True)
    total = 0
    for name in names:
        for dyn in (False, True) if name in zoo.DYNAMIC_BATCH else (False,):
            full = onnx.load(zoo.export_model(name, dynamic_batch=dyn))
            skel, stubs = strip(full)
            out = zoo.skeleton_path(name, dynamic_batch=dyn)
            out.write_bytes(skel.SerializeToString())
            size = out.stat().st_size
            total += size
            print(f"{out.name:34s} {stubs:4d} stubs of {len(full.graph.initializer):4d} initializers  {size / 1e3:8.1f} kB")
    print(f"{'total':34s} {total / 1e3:8.1f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
