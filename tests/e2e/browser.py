"""Debian's headless chromium for the browser tests, driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
# No component, sync or QUIC traffic of its own, so every request a test sees comes from the page.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000


def require_chromium() -> Path:
    """The browser's path; a missing browser fails the test: these tests never skip."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium); "
            ".ci/run installs it"
        )
    return CHROMIUM


async def launch(playwright: Playwright) -> Browser:
    """Debian's chromium, headless."""
    return await playwright.chromium.launch(executable_path=str(require_chromium()), args=CHROMIUM_ARGS)
