"""Worker processes (scratchlm.workers): spawned, so a lock another thread holds at the time
cannot hang them, and a worker that dies is an error rather than a wait without end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.workers import process_pool, progress_queue, result_of

HELD = threading.Lock()  # held by a thread of the test process while workers start


def _can_take_the_lock() -> bool:
    # A forked worker would inherit HELD locked, with no thread left to release it.
    taken = HELD.acquire(timeout=5)
    if taken:
        HELD.release()
    return taken


def _die() -> None:
    os._exit(3)  # as the out-of-memory killer would end it: no exception, no reply


_REPORTS = None


def _keep(queue) -> None:
    global _REPORTS
    _REPORTS = queue


def _report(n: int) -> int:
    _REPORTS.put(n)
    return n * n


def test_a_lock_held_by_another_thread_does_not_reach_the_workers():
    release = threading.Event()
    holder = threading.Thread(target=lambda: (HELD.acquire(), release.wait(), HELD.release()))
    holder.start()
    try:
        with process_pool(2) as pool:
            assert [result_of(pool.submit(_can_take_the_lock), "testing") for _ in range(2)] == [True, True]
    finally:
        release.set()
        holder.join()


def test_a_worker_that_dies_is_a_one_line_error_not_a_hang():
    with process_pool(1) as pool:
        with pytest.raises(ScratchLMError, match="a worker process died while checking: .*fewer workers"):
            result_of(pool.submit(_die), "checking")


def test_workers_report_through_the_queue_they_were_given():
    queue = progress_queue()
    with process_pool(2, _keep, (queue,)) as pool:
        assert sorted(result_of(pool.submit(_report, n), "testing") for n in range(4)) == [0, 1, 4, 9]
    assert sorted(queue.get() for _ in range(4)) == [0, 1, 2, 3]


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path):
    """Spawned workers import the caller's script first: top-level work runs again there,
    and the error says how to fix the script."""
    corpus = tmp_path / "corpus.jsonl"  # more than two batches of pre-token counting: a pool
    corpus.write_text("".join(json.dumps({"text": f"story {i}: the cat sat on mat number {i}."}) + "\n"
                              for i in range(30_000)))
    script = tmp_path / "train_tokenizer.py"
    script.write_text("from scratchlm.tokenizer import Tokenizer\n"
                      f"Tokenizer.train([{str(corpus)!r}], 300, workers=2)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    # The script's traceback ends with our error (multiprocessing may print its own notes after).
    error = next(line for line in result.stderr.splitlines() if line.startswith("scratchlm.errors.ScratchLMError"))
    assert "a worker process died while counting pre-tokens: if train_tokenizer.py does its work" in error
    assert 'if __name__ == "__main__":' in error
