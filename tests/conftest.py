"""Shared test fixtures.

The shared corpora live beside the checkout in ../shared/data; tests that need them skip with
a clear reason when that folder is absent (a bare clone elsewhere).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
_CACHE = tempfile.mkdtemp(prefix="scratchlm-test-cache-")


def pytest_configure(config) -> None:
    # Tests neither read nor fill the user's download cache (benchmark sets, corpora).
    os.environ["SCRATCHLM_CACHE"] = _CACHE


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (needs ../shared/data beside the repo)")
    return SHARED_DATA


def shared_file(relative: str) -> Path:
    """Path of a shared data file, skipping the calling test when it is missing."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data file missing: {path}")
    return path


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium (see tests/chromium.py), one per test module."""
    from selenium import webdriver

    from tests.chromium import CHROMEDRIVER, CHROMIUM

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,750"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()
