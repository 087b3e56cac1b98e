"""The training loop end to end on a real tiny model, tokenizer and data directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.config import config_from_dict
from scratchlm.train.loop import Trainer, accumulate_gradients, train
from tests.test_train_fixtures import single_thread, tiny_config, train_corpus  # noqa: F401


def _config(corpus, **sections):
    config = config_from_dict(tiny_config(corpus, **sections))
    config.validate()
    return config


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(train_corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reference_run")
    return out, train(_config(train_corpus), out)


def test_run_writes_its_directory_and_summary(reference_run):
    out, summary = reference_run
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 512
    assert summary["final_dir"] == str(out / "final")
    assert math.isfinite(summary["val_loss"]) and summary["val_bpb"] > 0
    assert summary["mfu"] is None  # CPU: no peak FLOP/s to compare with
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5  # it learns
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12]
    assert any(r["kind"] == "sample" and isinstance(r["text"], str) for r in records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max_steps: 12" in (out / "config.yaml").read_text()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        "step_0000006", "step_0000012"]
    from scratchlm.model.directory import load_model

    model, tokenizer = load_model(out / "final")
    assert model.config.vocab_size == tokenizer.vocab_size
    # bits/byte is the NLL re-expressed per byte: val_loss (nats/token) / ln 2 * tokens/bytes.
    assert 0 < summary["val_bpb"] < summary["val_loss"] / math.log(2)


def test_rerunning_a_finished_run_needs_resume_and_then_changes_nothing(reference_run,
                                                                         train_corpus):  # noqa: F811
    out, summary = reference_run
    with pytest.raises(ScratchLMError, match="pass --resume"):
        train(_config(train_corpus), out)
    before = _weights(out / "final")
    again = train(_config(train_corpus), out, resume=True)
    assert again["steps"] == summary["steps"] and again["val_loss"] == summary["val_loss"]
    after = _weights(out / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_interrupt_checkpoints_then_resume_is_bit_identical(reference_run, train_corpus,  # noqa: F811
                                                            tmp_path, monkeypatch):
    """Ctrl-C at step 4 -> checkpoint at the step boundary -> KeyboardInterrupt; --resume then
    ends with exactly the weights of the uninterrupted reference run."""
    original = Trainer.train_step

    def train_step(self):
        result = original(self)
        if self.step == 3:  # counted before the increment: this is the 4th step
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt):
        train(_config(train_corpus), tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000004"]
    monkeypatch.setattr(Trainer, "train_step", original)
    train(_config(train_corpus), tmp_path, resume=True)
    reference = _weights(reference_run[0] / "final")
    resumed = _weights(tmp_path / "final")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_gradient_accumulation_equals_one_big_batch(train_corpus):  # noqa: F811
    from scratchlm.data import TokenLoader
    from scratchlm.model import ModelConfig, Transformer

    x, y = TokenLoader(train_corpus["data"], "train", 8, 32).next_batch()
    cfg = ModelConfig.from_preset("tiny", vocab_size=320, context_length=32, d_model=64,
                                  n_layers=2, n_heads=4, n_kv_heads=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads, losses = [], []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])],
                    [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]):
        torch.manual_seed(0)
        model = Transformer(cfg)
        losses.append(accumulate_gradients(model, batches, contextlib.nullcontext, scaler,
                                           torch.device("cpu")))
        grads.append([p.grad.clone() for p in model.parameters()])
    for other, other_loss in zip(grads[1:], losses[1:]):
        torch.testing.assert_close(other_loss, losses[0], atol=1e-6, rtol=0)
        for g, h in zip(grads[0], other):
            torch.testing.assert_close(h, g, atol=1e-6, rtol=1e-5)


def test_non_finite_steps_are_skipped_then_the_run_stops(train_corpus, tmp_path, monkeypatch):  # noqa: F811
    from scratchlm.model import Transformer

    forward = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, kv_cache=None, segment_ids=None):
        out = forward(self, idx, targets, kv_cache, segment_ids)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            step = (calls["n"] - 1) // 2  # two micro-batches per step
            if step == 2 or step >= 7:  # one transient bad step, then a persistent failure
                return out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    config = _config(train_corpus, run={"checkpoint_every": 3, "eval_every": 0,
                                        "max_bad_steps": 3})
    with pytest.raises(ScratchLMError, match="3 consecutive non-finite steps .*step_0000006"):
        train(config, tmp_path)
    # Step 3 was skipped (so not checkpointed) and the run went on; steps 8-10 failed:
    # nothing saved after step 6, whose weights are finite.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000006"]
    weights = _weights(tmp_path / "checkpoints" / "step_0000006")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_vocabulary_or_tokenizer_mismatch_is_refused_before_training(train_corpus, tmp_path):  # noqa: F811
    from scratchlm.tokenizer import Tokenizer

    text = train_corpus["corpus"].read_text()
    smaller = tmp_path / "tok300"
    Tokenizer.train([str(train_corpus["corpus"])], vocab_size=300).save(smaller)
    config = _config(train_corpus, data={"tokenizer": str(smaller)})
    with pytest.raises(ScratchLMError, match="vocabulary mismatch: data .* vocab_size 320 but "
                                             "the tokenizer has 300"):
        train(config, tmp_path / "run")
    other_text = tmp_path / "other.txt"
    other_text.write_text(text[len(text) // 2:])
    other = tmp_path / "tok_other"
    Tokenizer.train([str(other_text)], vocab_size=320).save(other)
    with pytest.raises(ScratchLMError, match="tokenizer mismatch"):
        train(_config(train_corpus, data={"tokenizer": str(other)}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_config_lists_the_differences(train_corpus, tmp_path):  # noqa: F811
    train(_config(train_corpus, run={"max_steps": 2, "checkpoint_every": 2, "eval_every": 0,
                                     "sample_tokens": 0}), tmp_path)
    changed = _config(train_corpus, model={"n_layers": 3, "d_ff": 128})
    with pytest.raises(ScratchLMError, match=r"another model config \(d_ff: 384 -> 128; "
                                             r"n_layers: 2 -> 3\)"):
        train(changed, tmp_path, resume=True)


@pytest.mark.parametrize("change, expected", [
    ({"data": {"dir": "/nonexistent/data"}}, "data directory not found: /nonexistent/data"),
    ({"run": {"global_batch_tokens": 500}}, "global_batch_tokens: 500 is not a multiple of "
                                            "micro_batch_size x context_length"),
    ({"model": {"context_length": 65536}, "run": {"global_batch_tokens": 8 * 65536}},
     "train split of .* less than one context of 65536"),
])
def test_bad_setups_are_named(train_corpus, tmp_path, change, expected):  # noqa: F811
    with pytest.raises(ScratchLMError, match=expected):
        train(_config(train_corpus, **change), tmp_path)


class StepClock:
    """A clock that moves only when a training step runs, by `seconds_per_step`, so a time
    budget stops after an exact number of steps however fast or loaded the machine is."""

    def __init__(self, seconds_per_step: float):
        self.now, self.seconds_per_step = 0.0, seconds_per_step

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def step_clock(monkeypatch):
    clock = StepClock(seconds_per_step=1.0)
    original = Trainer.train_step

    def train_step(self):
        clock.now += clock.seconds_per_step
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return clock


def _train_lrs(out) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


TIME_BUDGET = {"max_steps": None, "max_minutes": 0.1, "log_every": 1, "eval_every": 0,
               "sample_tokens": 0, "checkpoint_every": 0}


def test_wall_clock_budget_stops_and_decays(train_corpus, tmp_path, step_clock):  # noqa: F811
    summary = train(_config(train_corpus, run=TIME_BUDGET), tmp_path, clock=step_clock)
    assert summary["steps"] == 6 and summary["elapsed_s"] == 6.0  # 6 s of budget, 1 s per step
    lrs = _train_lrs(tmp_path)
    assert lrs[2] == pytest.approx(3e-3)  # end of the 3-step warmup: the peak
    assert lrs[3] > lrs[4] > lrs[5] >= 3e-4  # decaying towards min_lr as the time runs out


def test_a_larger_budget_continues_with_a_replanned_schedule(train_corpus, tmp_path, step_clock):  # noqa: F811
    train(_config(train_corpus, run=TIME_BUDGET), tmp_path, clock=step_clock)
    first = _train_lrs(tmp_path)
    step_clock.now = 0.0  # a new process: its clock starts anew, the run's time is in the checkpoint
    summary = train(_config(train_corpus, run={**TIME_BUDGET, "max_minutes": 0.2}), tmp_path,
                    resume=True, clock=step_clock)
    assert summary["steps"] == 12 and summary["elapsed_s"] == 12.0
    lrs = _train_lrs(tmp_path)
    assert lrs[:6] == first
    # Half of the new budget is used. The new schedule is cosine over the new budget, its warmup
    # end rescaled from progress 0.5 of 6 s to 0.25 of 12 s; the rate climbs from where the
    # first run stopped (no jump) and meets the new schedule after the 3 warmup steps, then
    # decays towards min_lr at the new end.
    def new_schedule(step: int) -> float:
        t = (step / 12 - 0.25) / 0.75
        return 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    assert first[-1] < lrs[6] < lrs[7]
    assert lrs[6] == pytest.approx(first[-1] + (new_schedule(6) - first[-1]) / 3)
    assert lrs[8:] == pytest.approx([new_schedule(step) for step in range(8, 12)])
    assert lrs[8] > lrs[9] > lrs[10] > lrs[11] >= 3e-4


def test_validation_on_the_whole_split_equals_scratchlm_eval(train_corpus, tmp_path):  # noqa: F811
    """One bits-per-byte: the trainer's validation pass over the whole val split (packed rows,
    document masking) gives scratchlm.eval's per-document figure on the same documents."""
    from scratchlm.data import iter_documents
    from scratchlm.eval import evaluate_bits_per_byte
    from scratchlm.model import load_model

    summary = train(_config(train_corpus, run={"max_steps": 4, "eval_every": 0, "eval_batches": 0,
                                                "sample_tokens": 0}), tmp_path)
    model, tokenizer = load_model(tmp_path / "final")
    documents = list(iter_documents(train_corpus["data"], "val"))
    assert any(len(d) > 32 for d in documents)  # some documents span several windows
    reference = evaluate_bits_per_byte(model, tokenizer, documents, context_length=32, batch_size=5)
    assert summary["val_bpb"] == pytest.approx(reference.bits_per_byte, rel=1e-5)


def test_document_packing_with_document_masks_trains(train_corpus, tmp_path):  # noqa: F811
    summary = train(_config(train_corpus, data={"packing": "document", "document_mask": True},
                            run={"eval_batches": 0}), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5 and math.isfinite(summary["val_bpb"])


def test_a_directory_holding_other_files_needs_overwrite(train_corpus, tmp_path):  # noqa: F811
    (tmp_path / "notes.txt").write_text("mine")
    config = _config(train_corpus, run={"max_steps": 2, "eval_every": 0, "sample_tokens": 0})
    with pytest.raises(ScratchLMError, match="not a training run.*--overwrite"):
        train(config, tmp_path)
    train(config, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # --overwrite without --resume starts over: the earlier run's checkpoints are replaced.
    summary = train(_config(train_corpus, run={"max_steps": 1, "eval_every": 0, "sample_tokens": 0}),
                    tmp_path, overwrite=True)
    assert summary["steps"] == 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000001"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rng_states_round_trip():
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    for step, val in [(10, 3.0), (20, 2.0), (30, None), (40, 2.5), (50, None)]:
        path = tmp_path / ckpt.checkpoint_name(step)
        path.mkdir()
        (path / ckpt.TRAINER_STATE).write_bytes(b"")
        (path / ckpt.META).write_text(json.dumps({"step": step, "val_loss": val}))
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step_0000020", "step_0000040", "step_0000050"]


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from scratchlm.model import ModelConfig, Transformer
    from scratchlm.train.distributed import DistContext, parallelize

    cfg = ModelConfig.from_preset("tiny", vocab_size=64, context_length=16, d_model=32,
                                  n_layers=2, n_heads=4, n_kv_heads=2)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if checkpointed:
            names = list(model.state_dict())
            single = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
            assert parallelize(model, single, activation_checkpointing=True) is model
            assert all(isinstance(block, CheckpointWrapper) for block in model.blocks)
            assert list(model.state_dict()) == names  # checkpoints and model dirs are unchanged
        model(x[:, :-1], x[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
        # Generation (KV cache, no grad) still works through the wrapped blocks.
        assert len(list(model.generate(x[:1, :4], 3, temperature=0.0))) == 3
    for g, h in zip(*grads):
        torch.testing.assert_close(h, g, atol=1e-6, rtol=1e-6)
