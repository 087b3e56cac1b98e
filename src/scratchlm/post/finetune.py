"""What SFT and DPO share: their settings, the training config they hand to the training
loop, and the layout of their output directory.

    OUT_DIR/            the result: a model directory (or, with LoRA, an adapter directory)
      summary.json      figures before and after, budget used, a few replies
      loss.png          the training curves
      base/             the starting model with the chat tokens added (SFT of a base model only)
      data/             the rendered training data (token shards with a loss mask)
      train/            the training run: checkpoints, metrics, final/ (`--resume` continues it)

Post-training is the training loop (scratchlm.train) run on other data and, for DPO, with
another objective: the optimizer, schedule, checkpoints, resume, time budget and
distributed paths are the ones pretraining uses.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json, check_output_directory, remove_outputs
from scratchlm.train.config import TrainConfig

BASE, DATA, TRAIN, SUMMARY, LOSS_PLOT = "base", "data", "train", "summary.json", "loss.png"


@dataclass
class FinetuneSettings:
    """Budget and hyperparameters of one SFT or DPO run (the CLI's options)."""

    minutes: float | None = None  # wall-clock budget
    epochs: float | None = None  # passes over the training split (1 when no budget is given)
    steps: int | None = None  # optimizer steps
    lr: float | None = None  # peak learning rate; None: the method's default
    batch_size: int = 16  # sequences (DPO: pairs) per optimizer step
    micro_batch_size: int | None = None  # sequences (DPO: pairs) per forward pass; None: gcd(batch_size, 8)
    val_fraction: float = 0.05  # held-out share of the data
    seed: int = 1337
    lora_rank: int = 0  # 0: every weight trains
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    eval_every: int = 50
    checkpoint_every: int = 100
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def check(self) -> None:
        for name in ("minutes", "epochs", "steps", "lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ScratchLMError(f"--{name}: must be a positive number, got {value}")
        if self.micro_batch_size is None and self.batch_size >= 1:
            self.micro_batch_size = math.gcd(self.batch_size, 8)  # 8, or the largest power of two dividing the batch
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ScratchLMError(f"--batch-size {self.batch_size} must be a positive multiple of "
                                 f"--micro-batch-size {self.micro_batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ScratchLMError(f"--val-fraction: must be between 0 and 1, got {self.val_fraction}")


def prepare_output(out_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to mix a new run into an earlier one's directory unless asked to."""
    out_dir = check_output_directory(out_dir, overwrite=True, what="output")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise ScratchLMError(f"{out_dir} is not empty: pass --resume to continue the run in it, --overwrite to "
                             f"start over (its earlier run's files are replaced), or another -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


REFERENCE_WIDTH = 768  # d_model of GPT-2 small, for which the methods' default learning rates are set


def default_learning_rate(method_lr: float, d_model: int, lora: bool) -> float:
    """The peak learning rate when none is given: the method's rate for a GPT-2-small-sized
    model, scaled by REFERENCE_WIDTH / d_model, since the Adam step that suits a hidden matrix
    shrinks as the model widens (muP's 1/width rule, Yang et al. 2022); x10 with LoRA, whose
    adapters start from zero and hold few parameters."""
    return method_lr * REFERENCE_WIDTH / d_model * (10 if lora else 1)


def training_config(settings: FinetuneSettings, init_from: Path, data_dir: Path, context_length: int,
                    rows_per_epoch: int, rows_per_item: int, default_lr: float) -> TrainConfig:
    """The training loop's config for a fine-tuning run. A step takes `batch_size` items
    (conversations, or pairs of `rows_per_item` = 2 rows); each row is one item's sequence
    in a context-length row (document packing, attention within each document).
    `default_lr` applies when the settings give none (see `default_learning_rate`)."""
    config = TrainConfig()
    config.model.init_from = str(init_from)
    config.data.dir = str(data_dir)
    config.data.packing, config.data.document_mask = "document", True
    # Fine-tuning moves a trained model a little: no weight decay pulling it towards zero,
    # and a short warmup.
    config.optimizer.lr = settings.lr or default_lr
    config.optimizer.weight_decay = 0.0
    config.schedule.warmup_steps = 10
    rows_per_step = settings.batch_size * rows_per_item
    config.run.micro_batch_size = settings.micro_batch_size * rows_per_item
    config.run.global_batch_tokens = rows_per_step * context_length
    epochs = settings.epochs if settings.epochs is not None or settings.minutes or settings.steps else 1.0
    steps = [settings.steps] if settings.steps else []
    if epochs is not None:
        steps.append(max(1, math.ceil(epochs * rows_per_epoch / rows_per_step)))
    config.run.max_steps = min(steps) if steps else None
    config.run.max_minutes = settings.minutes
    config.run.seed = settings.seed
    config.run.device, config.run.threads, config.run.progress = settings.device, settings.threads, settings.progress
    config.run.eval_first, config.run.eval_every, config.run.eval_batches = True, settings.eval_every, 0
    config.run.sample_tokens = 0  # replies to held-out prompts are generated at the end instead
    config.run.checkpoint_every, config.run.log_every = settings.checkpoint_every, 5
    config.lora.rank, config.lora.alpha = settings.lora_rank, settings.lora_alpha
    config.lora.dropout, config.lora.targets = settings.lora_dropout, settings.lora_targets
    config.validate()
    return config


def remove_finetune_run(out_dir: Path) -> None:
    """Remove what an SFT or DPO run wrote into `out_dir` (the layout above), and nothing else."""
    from scratchlm.data.finalize import remove_data_directory
    from scratchlm.model.directory import model_files
    from scratchlm.post.preference import REFERENCE_FILE
    from scratchlm.train.loop import remove_training_run

    if not out_dir.is_dir():
        return
    remove_outputs(out_dir / BASE, model_files())
    remove_outputs(out_dir / DATA, [REFERENCE_FILE.format(split=split) for split in ("train", "val")])
    remove_data_directory(out_dir / DATA)
    if (out_dir / TRAIN).is_dir():
        remove_training_run(out_dir / TRAIN)
        remove_outputs(out_dir / TRAIN, ())
    remove_outputs(out_dir, [*model_files(), SUMMARY, LOSS_PLOT])


def publish(out_dir: Path, run_summary: dict[str, Any], summary: dict[str, Any]) -> None:
    """Make OUT_DIR the trained model (or adapter) directory: the run's final/ files copied
    beside the run, then summary.json and the loss plot."""
    final = Path(run_summary["final_dir"])
    names = sorted(p.name for p in final.iterdir() if p.is_file())
    with atomic_directory(out_dir, overwrite=True, what="model") as tmp:
        for name in names:
            shutil.copy2(final / name, tmp / name)
    plot = out_dir / TRAIN / LOSS_PLOT
    if plot.is_file():
        shutil.copy2(plot, out_dir / LOSS_PLOT)
    atomic_write_json(out_dir / SUMMARY, summary)


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[int]], stop_id: int, max_new_tokens: int = 256
                   ) -> list[tuple[list[int], bool]]:
    """(reply ids, whether the model ended its turn) for each rendered prompt, greedily.

    All prompts decode together, one forward pass per new token for the whole batch (a row
    leaves the batch when it ends), rather than one pass per token per prompt: tens of
    prompts cost about what one does. Each row attends only to its own keys, so a reply is
    the one `model.generate` gives alone, up to float rounding in a near-tie. A reply runs
    to `max_new_tokens` or the end of the context, whichever comes first."""
    if not prompts:
        return []
    window = model.config.context_length
    prompts = [prompt[-window:] for prompt in prompts]
    budgets = [max(1, min(max_new_tokens, window - len(prompt))) for prompt in prompts]
    replies: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(len(prompts), window)
        device = cache.keys.device
        last = [model(torch.tensor([prompt], device=device), kv_cache=cache.rows(i, i + 1))[0, -1]
                for i, prompt in enumerate(prompts)]  # prompts differ in length: each prefills its own row
        next_ids = torch.stack(last).argmax(-1)
        active = list(range(len(prompts)))  # prompt index of each row still in the cache
        while active:
            staying = []
            for row, (i, token) in enumerate(zip(active, next_ids.tolist())):
                if token == stop_id:
                    ended[i] = True
                    continue
                replies[i].append(token)
                if len(replies[i]) < budgets[i]:
                    staying.append(row)
            if not staying:
                break
            if len(staying) < len(active):
                cache, next_ids = cache.select(staying), next_ids[staying]
                active = [active[row] for row in staying]
            next_ids = model(next_ids[:, None], kv_cache=cache)[:, -1].argmax(-1)
    finally:
        model.train(was_training)
    return list(zip(replies, ended))
