"""Headless Chromium for the HTML report tests (skipped where it is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page: Path, *args: str, timeout: float = 90) -> str:
    """Run headless Chromium on a file:// page with no network use; returns stdout."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def images_loaded(page: Path) -> tuple[int, int, str]:
    """(loaded, total, dom) as the page itself counts them after its load event."""
    dom = chromium(page, "--virtual-time-budget=10000", "--dump-dom")
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, "the page did not run its load check; DOM starts: " + dom[:300]
    return int(m.group(1)), int(m.group(2)), dom
