"""Run the scratchlm CLI so that the first reply it generates stalls after a few tokens until
its stream is cancelled: a Ctrl-C typed in the test's terminal then surely arrives in the
middle of the reply, with the main thread waiting for the next token, whatever the
machine's speed.

    python -m tests.stall_reply -- <scratchlm arguments>
"""

from __future__ import annotations

import sys
import threading

TOKENS_BEFORE_STALL = 4
GIVE_UP_S = 120  # never hang a test run for good if the cancel never comes


def _install() -> None:
    from scratchlm.infer.engine import Stream
    from scratchlm.model.transformer import Transformer

    cancelled = threading.Event()
    cancel = Stream.cancel
    features = Transformer.features
    calls = 0

    def cancelling(self, *args, **kwargs):
        cancelled.set()
        return cancel(self, *args, **kwargs)

    def stalling(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1 + TOKENS_BEFORE_STALL:  # the prompt's prefill, then one pass per token
            cancelled.wait(GIVE_UP_S)
        return features(self, *args, **kwargs)

    Stream.cancel = cancelling
    Transformer.features = stalling


def main() -> int:
    separator, *args = sys.argv[1:] or [""]
    if separator != "--":
        raise SystemExit("usage: python -m tests.stall_reply -- ARGS")
    _install()
    from scratchlm.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
