"""Headless Debian Chromium for tests and scripts that look at the HTML report.

``.ci/run`` installs Debian's ``chromium`` when it is missing.  Every call runs with a
new temporary profile and without network services (no background networking,
component updates, sync or QUIC), so a page that needs the network shows as broken.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="archpass-chromium-") as profile:
        return subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1600) -> Path:
    """Render ``page`` (a local HTML file) and save a ``width`` x ``height`` PNG of its top."""
    proc = run(f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={png}", Path(page).resolve().as_uri())
    if not Path(png).is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {proc.stderr[-2000:]}")
    return Path(png)


def dump_dom(page: Path, budget_ms: int = 5000) -> str:
    """The DOM after load (scripts run for up to ``budget_ms`` of virtual time)."""
    return run(f"--virtual-time-budget={budget_ms}", "--dump-dom", Path(page).resolve().as_uri()).stdout
