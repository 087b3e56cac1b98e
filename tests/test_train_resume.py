"""Exact resume: a `scratchlm train` process SIGKILLed at three kinds of moment (inside a
checkpoint being written, inside an optimizer step, right after a checkpoint), resumed each
time, ends with weights bit-identical to an uninterrupted run (CPU, 1 thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from scratchlm.train import checkpoint as ckpt
from tests.conftest import REPO_ROOT
from tests.stop_at import EVENTS, wait_until_stopped
from tests.test_train_fixtures import tiny_config, train_corpus, write_config  # noqa: F401

pytestmark = pytest.mark.slow


def _train_args(config_path, out):
    return ["train", "--config", str(config_path), "--out", str(out), "--resume"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT}")


def _killed_at(event: str, config_path, out) -> None:
    """Start (or resume) training, wait until it stops itself at `event`, SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.stop_at", event, "--", *_train_args(config_path, out)],
                            env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_stopped(proc)
    finally:
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
    subprocess.run([sys.executable, "-m", "scratchlm", *_train_args(config_path, reference)], env=_env(),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    interrupted = tmp_path / "interrupted"
    for event in EVENTS:
        _killed_at(event, config_path, interrupted)
    # The checkpoint killed mid-write (step 8, second run) never became one; the third run
    # resumed from step 4 and wrote step 8 whole.
    assert [p.name for p in ckpt.list_checkpoints(interrupted / "checkpoints")] == ["step_0000004", "step_0000008"]
    subprocess.run([sys.executable, "-m", "scratchlm", *_train_args(config_path, interrupted)], env=_env(),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

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
    # No temporary directory of a killed checkpoint is left behind.
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_0000036", "step_0000040"]
