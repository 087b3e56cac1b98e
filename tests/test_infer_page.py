"""The chat page of `scratchlm serve`, in headless Chromium against the real server: the API
key's error shown from the server's error JSON, a message answered by a streamed reply, and
a conversation that outgrows the context losing its oldest exchange.

A screenshot of the page is saved in the test's temporary directory, and in
$SCRATCHLM_ARTIFACTS when that is set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.chromium import require_chromium, screenshot
from tests.conftest import REPO_ROOT
from tests.tiny_chat import save_tiny_model

KEY = "test-key-123"

pytest.importorskip("fastapi", reason="the server needs scratchlm[serve] (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs scratchlm[serve] (fastapi, uvicorn)")
require_chromium()

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`scratchlm serve` on a free port with a tiny chat model and an API key; its URL."""
    where = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(where / "tiny-chat", chat=True, context_length=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = where / "server.log"  # a file, not a pipe: the server never blocks on a full one
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", str(model_dir), "--port", "0",
                                 "--api-key", KEY, "--device", "cpu"], stdout=out, stderr=out, env=env)
    try:
        # "scratchlm: serving tiny-chat at http://127.0.0.1:PORT (...)" once it listens.
        deadline = time.monotonic() + 120
        while not (found := re.search(r"serving \S+ at (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start: {log.read_text()}")
            time.sleep(0.1)
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _wait_for_reply(browser, wait, count: int):
    """The `count`th reply, once finished: its streaming cursor gone and Stop disabled again."""
    stop = browser.find_element(By.ID, "stop")
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant:not(.streaming)")) == count)
    wait.until(lambda _: not stop.is_enabled())
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[count - 1]


def _set(browser, field: str, value: str) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def test_the_page_streams_replies(server, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(server)
    # Without the key, listing the models is refused: the server's own message is shown.
    error = browser.find_element(By.ID, "error")
    wait.until(lambda _: error.is_displayed())
    assert "missing or incorrect API key" in error.text

    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # lists the models again, with it
    model = browser.find_element(By.ID, "model")
    wait.until(lambda _: model.text.startswith("tiny-chat"))
    assert "context 128 tokens" in model.text and not error.is_displayed()

    # Seeded, so the random model's replies are the same every run (and not empty).
    _set(browser, "seed", "1")
    _set(browser, "max-tokens", "100")
    started = time.monotonic()
    browser.find_element(By.ID, "input").send_keys("hello there", Keys.ENTER)
    reply = _wait_for_reply(browser, wait, 1)
    print(f"reply in {time.monotonic() - started:.2f} s: {reply.text[:60]!r}")
    assert reply.text.strip(), "the reply is empty"
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "hello there"
    assert browser.find_element(By.ID, "stop").is_displayed() and browser.find_element(By.ID, "send").is_enabled()
    assert not error.is_displayed()

    # The first exchange and a second message cannot leave 100 of the 128 tokens for the
    # reply: the server refuses, and the page drops the oldest exchange and asks again.
    browser.find_element(By.ID, "input").send_keys("and then?", Keys.ENTER)
    second = _wait_for_reply(browser, wait, 2)
    assert "the oldest exchange was dropped to fit the model's context" in second.text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.dropped")) == 2 and not error.is_displayed()
    screenshot(browser, tmp_path / "chat-page.png")

    # Nothing went wrong in the page's own code (the refused requests aside).
    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and not re.search(r" (400|401) ", entry["message"])]
    assert problems == []
