"""Worker processes for the stages that fan CPU work out on one machine (tokenizer training's
pre-token counts, data preparation's tasks).

Two decisions, both about never hanging:
- Workers are *spawned* (a fresh interpreter), not forked. Forking copies a process with all
  its locks but only the thread that forked: if another thread (a progress bar's monitor, a
  prefetcher, a server, a library's pool) held a lock at that moment, the child waits on it
  forever. A caller embedding scratchlm cannot promise it runs no threads, so we never fork.
  Spawning costs a fresh `import` per worker (a fraction of a second, paid once per pool).
- `concurrent.futures`, not `multiprocessing.Pool`: when a worker dies (the out-of-memory
  killer, a segfault in a C extension) Pool quietly starts another and the task it held is
  never answered; an executor fails every pending task with `BrokenProcessPool`, which
  `result_of` turns into a one-line error.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

from scratchlm.errors import ScratchLMError

T = TypeVar("T")
_SPAWN = multiprocessing.get_context("spawn")


def process_pool(workers: int, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """`workers` spawned processes (see the module docstring); `initializer(*initargs)` runs
    once in each, e.g. to receive a queue for progress reports."""
    return ProcessPoolExecutor(workers, mp_context=_SPAWN, initializer=initializer, initargs=initargs)


def progress_queue() -> Any:
    """A queue workers of `process_pool` can report progress through (pass it in `initargs`)."""
    return _SPAWN.SimpleQueue()


def result_of(future: Future[T], what: str) -> T:
    """The future's result; a worker that died instead is a ScratchLMError naming `what`."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise ScratchLMError(f"a worker process died while {what}: {_likely_cause()}") from None


def _likely_cause() -> str:
    # A spawned worker imports the caller's script as its main module before it runs anything
    # (Python's rule for spawned processes, the default on macOS and Windows): top-level work
    # in that script runs again in every worker, and starting processes there fails.
    script = getattr(sys.modules["__main__"], "__file__", None)
    if script and getattr(sys.modules["__main__"], "__spec__", None) is None:
        return (f"if {os.path.basename(script)} does its work at the top level, put it under "
                f"`if __name__ == \"__main__\":` (worker processes import the script); otherwise "
                f"it was killed or ran out of memory: try fewer workers")
    return "killed, or out of memory? Try fewer workers"
