"""The root command: --version, -h."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import archpass
from archpass.cli.main import COMMANDS, app

runner = CliRunner()


def test_version():
    for flag in ("--version", "-V"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and r.stdout.strip() == f"archpass {archpass.__version__}"


def test_short_help_on_root_and_every_command():
    r = runner.invoke(app, ["-h"])
    assert r.exit_code == 0 and "Usage" in r.stdout and all(c in r.stdout for c in COMMANDS)
    for c in COMMANDS:
        r = runner.invoke(app, [c, "-h"])
        assert r.exit_code == 0 and f"archpass {c}" in r.stdout, (c, r.output)


def test_version_subprocess():
    p = subprocess.run([sys.executable, "-m", "archpass", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"archpass {archpass.__version__}"
