"""Time `archpass inspect` on MobileNetV2 (target: under 1 s wall).

Measures, side by side in one run: the Python API (load + canonicalize + analyze +
document), and the command as a user runs it (a fresh `archpass inspect --json`
process, interpreter start-up and imports included).  Writes
benchmarks/results/inspect_mobilenet_v2.json.
"""

from __future__ import annotations

import subprocess
import sys

from _common import summary, timed, write_results, zoo_path

TARGET_S = 1.0


def main() -> int:
    path = zoo_path("mobilenet_v2")
    from archpass import api

    api_runs = timed(lambda: api.inspect(path), repeats=7)
    cli = [sys.executable, "-m", "archpass", "inspect", str(path), "--json"]
    cli_runs = timed(lambda: subprocess.run(cli, check=True, capture_output=True), repeats=5)
    figures = {
        "model": "torchvision mobilenet_v2 (opset 17, 224x224)",
        "target_s": TARGET_S,
        "api_inspect": summary(api_runs),
        "cli_process": summary(cli_runs),
    }
    out = write_results("inspect_mobilenet_v2", figures)
    a, c = figures["api_inspect"]["median_s"], figures["cli_process"]["median_s"]
    print(f"inspect mobilenet_v2: API median {a:.3f} s, CLI process median {c:.3f} s (target {TARGET_S} s)")
    print(f"results: {out}")
    return 0 if c < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
