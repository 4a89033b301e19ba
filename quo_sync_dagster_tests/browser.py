"""Pages as a person sees them: the real Dagster webserver rendered by a real headless Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it


def rendered_page(url: str, tmp_path: Path) -> str:
    """The DOM of a page after a real headless Chromium has run its JavaScript."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000", "--dump-dom"]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, url], capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stdout
