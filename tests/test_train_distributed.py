"""DDP and FSDP2 through torchrun on CPU (gloo, 2 processes) against one process with the
same global batch; and an FSDP (torch.distributed.checkpoint) resume.

Tolerance: 1e-5 on every logged loss. With the same global batch the two setups compute the
same mean loss and gradients; only the order of floating-point sums differs (gradients are
averaged by all-reduce instead of accumulated), which moves the fp32 loss by ~1e-7 here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scratchlm.train.config import config_from_dict
from scratchlm.train.loop import train
from tests.conftest import REPO_ROOT
from tests.test_train_fixtures import tiny_config, train_corpus, write_config  # noqa: F401

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


def _torchrun(config_path, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scratchlm", "train", "--config", str(config_path), "--out", str(out), *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"] if r["kind"] == "train" else r["val_loss"])
            for r in records if r["kind"] in ("train", "eval")]


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def single_run(train_corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("distributed")
    # 256 tokens/step = 2 micro-batches of 4x32 in one process, or 1 per process with two.
    config = tiny_config(train_corpus, run={
        "max_steps": 8, "global_batch_tokens": 256, "micro_batch_size": 4, "log_every": 1,
        "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "sample_tokens": 4})
    single = root / "single"
    train(config_from_dict(config), single)
    return root, write_config(root / "config.yaml", config), _losses(single)


# FSDP runs with activation checkpointing too: its recomputation must see unsharded weights.
FSDP_FLAGS = ("--run.distributed=fsdp", "--run.activation_checkpointing=true")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single_run, mode):
    root, config_path, single_losses = single_run
    out = root / mode
    _torchrun(config_path, out, *(FSDP_FLAGS if mode == "fsdp" else ("--run.distributed=ddp",)))
    losses = _losses(out)
    assert [(k, s) for k, s, _ in losses] == [(k, s) for k, s, _ in single_losses]
    for (kind, step, got), (_, _, expected) in zip(losses, single_losses):
        assert abs(got - expected) < TOLERANCE, (mode, kind, step, got, expected)
    assert (out / "final" / "model.safetensors").is_file()  # gathered from the shards
    if mode == "fsdp":
        assert (out / "checkpoints" / "step_0000004" / "sharded" / ".metadata").is_file()


def test_fsdp_checkpoint_resumes_exactly(single_run):
    """Resume the FSDP run from its step-4 sharded checkpoint: same final weights, bit for bit."""
    root, config_path, _ = single_run
    full = root / "fsdp"
    if not (full / "final").is_dir():
        _torchrun(config_path, full, *FSDP_FLAGS)
    resumed = root / "fsdp_resumed"
    shutil.copytree(full / "checkpoints" / "step_0000004",
                    resumed / "checkpoints" / "step_0000004")
    _torchrun(config_path, resumed, *FSDP_FLAGS, "--resume")
    expected, got = _final_weights(full), _final_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
