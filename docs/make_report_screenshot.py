"""The report of the README's main job, rendered by headless Chromium into ``docs/report.png``.

    python docs/make_report_screenshot.py [--keep DIR]

Runs the README's main command (the ``archpass optimize examples/mobilenet_v2.onnx ...``
line of its "Set up" section, read from README.md so the two cannot drift apart) in a
temporary folder with ``--report`` added, then renders the report's self-contained
``report.html`` with Debian's ``chromium`` (``tests/chromium.py``: headless, a fresh
profile, no network) and writes the screenshot to ``docs/report.png``.  ``--keep DIR``
also copies the report's files there.  Re-run it whenever the main job's result changes.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import chromium  # noqa: E402

SCREENSHOT = ROOT / "docs" / "report.png"
WIDTH, HEIGHT = 1100, 2300  # the headline cards, table, recipe and the three plots


def readme_command() -> list[str]:
    """The README's main job: its first ``archpass optimize examples/...`` command."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"(archpass optimize examples/mobilenet_v2\.onnx[^\n`]*)", text)
    if m is None:
        raise SystemExit("README.md has no `archpass optimize examples/mobilenet_v2.onnx ...` command")
    return shlex.split(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="also copy the report's files into this folder")
    ap.add_argument("--out", type=Path, default=SCREENSHOT)
    args = ap.parse_args(argv)
    if chromium.binary() is None:
        raise SystemExit("no chromium: apt-get install chromium (.ci/run installs it)")
    cmd = readme_command()
    with tempfile.TemporaryDirectory(prefix="archpass-readme-report-") as tmp:
        i = cmd.index("-o")
        cmd[i + 1] = str(Path(tmp) / Path(cmd[i + 1]).name)  # the output goes to the temporary folder
        report = Path(tmp) / "report"
        run = [sys.executable, "-m", "archpass", *cmd[1:], "--report", str(report)]
        print("$", " ".join(shlex.quote(c) for c in ["archpass", *cmd[1:], "--report", "REPORT"]), file=sys.stderr)
        subprocess.run(run, cwd=ROOT, check=True)
        chromium.screenshot(report / "report.html", args.out, width=WIDTH, height=HEIGHT)
        if args.keep is not None:
            shutil.copytree(report, args.keep, dirs_exist_ok=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
