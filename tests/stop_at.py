"""Run the scratchlm CLI so that it stops itself (SIGSTOP) at a training event, for tests
that kill it exactly there: deterministic interrupts, whatever the machine's speed.

    python -m tests.stop_at EVENT -- <scratchlm arguments>

EVENT, counted from the start of this process:
  after-checkpoint  right after the first checkpoint is complete
  mid-checkpoint    inside the first checkpoint: model files written, trainer state not yet
  mid-step          inside the first optimizer step after a checkpoint, parameters half updated

`wait_until_stopped(proc)` (for the test side) blocks until the process has stopped, and fails
if it exits instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

EVENTS = ("after-checkpoint", "mid-checkpoint", "mid-step")


def _stop() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _install(event: str) -> None:
    import torch

    from scratchlm.train import checkpoint, optim

    state = {"checkpoints": 0, "updates": 0}
    save_checkpoint = checkpoint.save_checkpoint

    def counting_save(*args, **kwargs):
        path = save_checkpoint(*args, **kwargs)
        state["checkpoints"] += 1
        if event == "after-checkpoint" and state["checkpoints"] == 1:
            _stop()
        return path

    checkpoint.save_checkpoint = counting_save
    if event == "mid-checkpoint":
        torch_save = torch.save

        def stopping_save(*args, **kwargs):
            _stop()  # the trainer state is the last part of a checkpoint to be written
            return torch_save(*args, **kwargs)

        checkpoint.torch.save = stopping_save
    if event == "mid-step":
        update = optim.adamw_update_

        def stopping_update(*args, **kwargs):
            if state["checkpoints"]:
                state["updates"] += 1
                if state["updates"] == 3:
                    _stop()
            return update(*args, **kwargs)

        optim.adamw_update_ = stopping_update


def wait_until_stopped(proc: subprocess.Popen, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            break
        if time.monotonic() > end:
            raise AssertionError(f"the process neither stopped nor ended within {deadline_s:g} s")
        time.sleep(0.05)
    if not os.WIFSTOPPED(status):
        raise AssertionError(f"the process ended (status {status}) before it reached its stop event")


def main() -> int:
    event, separator, *args = sys.argv[1:]
    if event not in EVENTS or separator != "--":
        raise SystemExit(f"usage: python -m tests.stop_at {{{','.join(EVENTS)}}} -- ARGS")
    _install(event)
    from scratchlm.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
