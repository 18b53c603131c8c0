"""Regenerate examples/mobilenet_v2.onnx, the bundled example model.

A torchvision MobileNetV2 (width_mult=0.5, 100 classes) with random weights (weights=None,
torch.manual_seed(0)), exported in eval mode with the test zoo's settings (tests/zoo.py):
TorchScript exporter, opset 17, static 1x3x224x224 input named "input", written atomically.
It keeps the standard structure: a stem conv, 17 inverted-residual blocks (the first without
expansion), a 1x1 conv to 1280 channels and the classifier. Needs torch and torchvision
(`pip install -e ".[test]"`):

    python examples/make_example.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import zoo  # noqa: E402

OUT = HERE / "mobilenet_v2.onnx"


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5, num_classes=100)
    zoo.export_onnx(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, torch {torch.__version__}, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
