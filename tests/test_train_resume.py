"""Exact resume: a `scratchlm train` process SIGKILLed at random moments, several times, and
resumed each time, ends with weights bit-identical to an uninterrupted run (CPU, 1 thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from scratchlm.train import checkpoint as ckpt
from tests.conftest import REPO_ROOT
from tests.test_train_fixtures import tiny_config, train_corpus, write_config  # noqa: F401

pytestmark = pytest.mark.slow


def _command(config_path, out):
    return [sys.executable, "-m", "scratchlm", "train", "--config", str(config_path),
            "--out", str(out), "--resume"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "src"))


def _run_killed_after_new_checkpoint(config_path, out, rng) -> bool:
    """Start (or resume) training; once a checkpoint newer than the existing ones appears,
    wait a random moment (landing anywhere inside a later step) and SIGKILL. Returns whether
    the process was killed (False: it finished first)."""
    root = out / "checkpoints"
    seen = {p.name for p in ckpt.list_checkpoints(root)}
    proc = subprocess.Popen(_command(config_path, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if {p.name for p in ckpt.list_checkpoints(root)} - seen:
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return proc.returncode == -signal.SIGKILL
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_and_resume_is_bit_identical(train_corpus, tmp_path):  # noqa: F811
    config = tiny_config(train_corpus,
                         model={"dropout": 0.1},  # dropout draws from the RNG: it must resume too
                         run={"max_steps": 40, "checkpoint_every": 4, "eval_every": 0,
                              "sample_tokens": 0, "global_batch_tokens": 2048,
                              "keep_checkpoints": 2, "log_every": 1})
    config_path = write_config(tmp_path / "config.yaml", config)

    reference = tmp_path / "reference"
    subprocess.run(_command(config_path, reference), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    interrupted = tmp_path / "interrupted"
    rng = random.Random(1234)
    kills = sum(_run_killed_after_new_checkpoint(config_path, interrupted, rng) for _ in range(3))
    assert kills >= 2, "the run finished before it could be interrupted: make it longer"
    subprocess.run(_command(config_path, interrupted), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    from safetensors.torch import load_file

    expected = load_file(str(reference / "final" / "model.safetensors"))
    got = load_file(str(interrupted / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Steps redone after a kill replaced their earlier records instead of repeating them.
    steps = [json.loads(line)["step"] for line in
             (interrupted / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 41))
