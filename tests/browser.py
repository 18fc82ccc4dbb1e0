"""Debian's headless Chromium for the browser tests, through Playwright; never a download.

Importing this module skips the importing test module when there is no Chromium (Playwright
is a dev dependency). The `browser` fixture, imported as `chromium_browser`, gives each test its
own Chromium (about half a second to launch), so no state passes from one test to the next.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ViewportSize, async_playwright

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium); these tests never download one",
        allow_module_level=True,
    )

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots, git-ignored
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
WIDE: ViewportSize = {"width": 1280, "height": 860}
NARROW: ViewportSize = {"width": 390, "height": 844}


@pytest.fixture(name="browser")
async def chromium_browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()
