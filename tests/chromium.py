"""Headless Chromium for the tests that check pages in a real browser (the chat page of
`scratchlm serve`, the report card of `scratchlm run`): Debian's chromium + chromium-driver
(matching versions, installed by scripts/setup.sh), driven through selenium.

A test module calls `require_chromium()` (which skips it, saying why, when something is
missing), then uses the `browser` fixture of tests/conftest.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def require_chromium() -> None:
    pytest.importorskip("selenium.webdriver", reason="the page tests need selenium (the dev extra)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("the page tests need Chromium and its driver on PATH (chromium, chromedriver: apt-get install "
                    "chromium chromium-driver)", allow_module_level=True)


def screenshot(driver, path: Path) -> None:
    """Save a screenshot at `path`, and a copy in $SCRATCHLM_ARTIFACTS when that is set."""
    assert driver.save_screenshot(str(path))
    artifacts = os.environ.get("SCRATCHLM_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)
