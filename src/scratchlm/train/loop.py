"""The training loop: one `train()` for a laptop CPU, one GPU, or many GPUs under torchrun.

Reading order: `train` sets up the process group and runs a `Trainer`; `Trainer.__init__`
builds everything (tokenizer, data, model, optimizer) and checks they agree before any step;
`Trainer.run` is the loop; `accumulate_gradients` is the one forward/backward of a step.

One optimizer step = `grad_accum` micro-batches per process x `world_size` processes =
`run.global_batch_tokens` tokens. The loop stops when the budget (steps, tokens or minutes)
is used up, checkpoints every N steps / M minutes / on Ctrl-C, and writes `final/`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_json, atomic_write_text, check_output_directory, remove_outputs
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.config import TrainConfig, dump_config_yaml
from scratchlm.train.bpb import bits_per_byte, loss_per_token, score_sums
from scratchlm.train.distributed import (DistContext, all_reduce_max, all_reduce_mean_, all_reduce_sum,
                                         check_same_on_all_ranks, eager, gradient_sync,
                                         init_distributed, materialize, parallelize, shutdown_distributed)
from scratchlm.train.metrics import (LOSS_PLOT, METRICS_FILE, MetricsLog, matched_gpu,
                                     model_flops_utilization, peak_flops, plot_loss)
from scratchlm.train.optim import build_optimizer, clip_grad_norm_, set_lr, step_unless_non_finite
from scratchlm.train.prefetch import Prefetcher
from scratchlm.train.schedule import lr_factor

CHECKPOINTS = "checkpoints"
FINAL = "final"


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, *, overwrite: bool = False,
          clock: Callable[[], float] = time.monotonic, trainer: type[Trainer] | None = None) -> dict[str, Any]:
    """Train per `config` into `out_dir`; returns the run summary.

    resume=True continues from the latest checkpoint there (a fresh start when there is none);
    if the budget changed since, the learning-rate schedule is re-planned for the new budget
    (see `Trainer._restore`). A directory holding anything but a training run needs
    overwrite=True (only the run's own files are written there); with overwrite and without
    resume, an earlier run's checkpoints, metrics and final model in it are replaced.
    `clock` (seconds, monotonic) measures the time budget: tests drive it by hand.
    `trainer`: a Trainer subclass with another objective and data (post-training's DPO).
    """
    config.validate()
    out_dir = check_run_directory(Path(out_dir), resume, overwrite)
    if Path(config.source).absolute() == out_dir / CONFIG_COPY:
        raise ScratchLMError(f"{config.source} is where the run writes its effective config: keep your config "
                             f"outside --out")
    owns_group = not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    ctx = init_distributed(config.run.device)
    try:
        return (trainer or Trainer)(config, out_dir, ctx, clock).run(resume)
    finally:
        torch.set_num_threads(threads)  # run.threads is for this run, not the caller
        if owns_group:
            shutdown_distributed()


# A training run directory is marked as one (written first), so that its files, and only
# they, are the run's to resume, replace or remove; the rest of what it writes:
RUN_MARKER = ".scratchlm-training-run"
CONFIG_COPY, SUMMARY = "config.yaml", "summary.json"


def check_run_directory(out_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Refuse a non-empty directory that is not a training run unless `overwrite` (the run's
    files are then written beside the others); with `overwrite` and no `resume`, an earlier
    run there is removed (its files only) to start over."""
    out_dir = check_output_directory(out_dir, overwrite=True, what="training run")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return out_dir
    # Marked, or holding checkpoints (copied from another run to resume, say).
    is_run = (out_dir / RUN_MARKER).is_file() or ckpt.latest_checkpoint(out_dir / CHECKPOINTS) is not None
    if not is_run and not overwrite:
        entries = sorted(p.name for p in out_dir.iterdir())
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ScratchLMError(f"{out_dir} holds files that are not a training run ({shown}); use --overwrite "
                             f"to train into it anyway (files of the run are replaced, all others kept), or "
                             f"another --out")
    if is_run and overwrite and not resume:
        remove_training_run(out_dir)
    return out_dir


def remove_training_run(out_dir: Path) -> None:
    """Remove what a training run wrote into `out_dir`, and nothing else."""
    from scratchlm.model.directory import model_files

    checkpoints = out_dir / CHECKPOINTS
    if checkpoints.is_dir():
        remove_outputs(checkpoints, [p.name for p in checkpoints.iterdir() if ckpt.is_checkpoint_name(p.name)])
    remove_outputs(out_dir / FINAL, model_files())
    tensorboard = out_dir / "tensorboard"
    if tensorboard.is_dir():
        remove_outputs(tensorboard, [p.name for p in tensorboard.iterdir() if p.name.startswith("events.out.")])
    remove_outputs(out_dir, [CONFIG_COPY, METRICS_FILE, LOSS_PLOT, SUMMARY, RUN_MARKER])


# --------------------------------------------------------------------------- one step
class LanguageModeling:
    """The objective of pretraining and SFT: mean next-token cross-entropy over the targets
    that are not -1 (padding, and in fine-tuning data the prompt's tokens).

    An objective says what one micro-batch's loss is and how much that micro-batch weighs in
    the step's mean; post-training objectives (DPO) plug into the same loop this way."""

    def weight(self, batch: tuple[torch.Tensor, ...]) -> int:
        """How many of the step's averaged items are in `batch` (here: targets)."""
        return int((batch[1] >= 0).sum())

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean loss over the batch's items; a batch is (x, y) or (x, y, segment_ids)."""
        x, y, *segments = batch
        return model(x, y, segment_ids=segments[0] if segments else None)


def accumulate_gradients(model: nn.Module, batches: list[tuple[torch.Tensor, ...]],
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         scaler: torch.amp.GradScaler, device: torch.device,
                         objective: LanguageModeling = LanguageModeling(),
                         counts: list[int] | None = None) -> torch.Tensor:
    """Forward and backward over the micro-batches of one step; return their mean loss.

    Each micro-batch's mean loss is weighted by its share of the step's items (targets, for
    language modeling), so the summed gradients equal those of the mean loss over all the
    step's items (padding spreads unevenly over micro-batches). Gradient all-reduce happens
    on the last micro-batch only. `counts`: each micro-batch's weight, when `batches` are
    already on the GPU (taken from their host copies: reading the device ones would wait).
    """
    if counts is None:
        counts = [objective.weight(batch) for batch in batches]  # on the CPU: no device sync
    total_items = max(sum(counts), 1)
    total = torch.zeros((), device=device)
    for i, (batch, count) in enumerate(zip(batches, counts)):
        batch = tuple(t.to(device) for t in batch)  # a no-op for the loop's prefetched batches
        with gradient_sync(model, sync=i == len(batches) - 1):
            with autocast():
                loss = objective.loss(model, batch)
            if count:
                weighted = loss * (count / total_items)
                scaler.scale(weighted).backward()
                total += weighted.detach()
            else:  # an all-padding micro-batch: no gradient, but DDP/FSDP still sync
                scaler.scale(loss.nan_to_num() * 0.0).backward()
    return total


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Everything of one training run. Subclasses change what is learnt, not how: they
    override `objective`, `_loader` and `evaluate` (scratchlm.post.preference does)."""

    objective = LanguageModeling()

    def __init__(self, config: TrainConfig, out_dir: Path, ctx: DistContext,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.out_dir, self.ctx, self.clock = config, out_dir, ctx, clock
        run = config.run
        if run.threads:
            torch.set_num_threads(run.threads)  # fixed so CPU results (and resumes) repeat
        check_same_on_all_ranks(dump_config_yaml(config), "the training config", ctx)
        self.device = ctx.device
        self.sharded = ctx.enabled and run.distributed == "fsdp"
        if self.sharded and config.optimizer.name == "muon":
            raise ScratchLMError("config: optimizer.name muon is not supported with "
                                 "run.distributed fsdp (Newton-Schulz needs whole matrices); "
                                 "use ddp")
        if self.sharded and config.lora.rank:
            raise ScratchLMError("config: LoRA (lora.rank) is not supported with run.distributed fsdp; use ddp "
                                 "(the frozen base is small enough to replicate when adapters are what trains)")

        self.tokenizer = self._load_tokenizer()
        self.manifest = self._check_data()
        self.model_config = self._model_config()
        self.context_length = self.model_config.context_length
        self.grad_accum = self._grad_accum()

        # Same seed on every rank for the initial weights (FSDP shards each rank's copy, so
        # they must agree), then a per-rank seed for dropout. A model without pretrained
        # weights is built on the meta device and filled by `materialize`: under FSDP after
        # sharding, so each rank allocates and fills only its shards; otherwise before DDP,
        # which broadcasts the weights when it wraps the model.
        _seed_everything(run.seed)
        self.raw_model = self._build_model()
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.autocast_dtype == torch.float16)
        if not self.sharded:
            self._materialize()
        self.model = parallelize(self.raw_model, ctx, activation_checkpointing=run.activation_checkpointing,
                                 compile=run.compile, distributed=run.distributed,
                                 param_dtype=torch.bfloat16 if self.autocast_dtype == torch.bfloat16 else None)
        if self.sharded:
            self._materialize()
        _seed_everything(run.seed + ctx.rank)
        # FSDP shards the parameters of raw_model in place, so it is the one to optimize,
        # checkpoint and sample from in every mode (self.model may be a DDP wrapper).
        self.optimizer = build_optimizer(self.raw_model, config.optimizer, self.device.type)

        self.train_loader = self._loader("train", config.data.packing)
        self.prefetcher = Prefetcher(lambda: [self._batch() for _ in range(self.grad_accum)],
                                     self.train_loader.state_dict, self.device)
        if self.train_loader.tokens_per_epoch < self.context_length:
            raise ScratchLMError(
                f"the train split of {config.data.dir} has {self.train_loader.tokens_per_epoch} "
                f"tokens, less than one context of {self.context_length}: use a shorter context")
        # Validation scores each document on its own, as `scratchlm eval` does (document
        # packing and masking), so val_bpb is the same figure; an empty split fails now.
        self.val_loader = self._loader("val", "document")
        self.token_bytes = torch.as_tensor(np.asarray(self.tokenizer.token_byte_lengths(),
                                                      dtype=np.int64), device=self.device)
        self.tokens_per_step = run.global_batch_tokens  # slots, padding included
        self.total_steps = self._total_steps()
        self.metrics = MetricsLog(out_dir, ctx.is_main, run.tensorboard)
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = self.model_config.flops_per_token(self.context_length)

        # Loop state: everything here goes into checkpoints.
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run
        self.warmup_end: float | None = 0.0 if config.schedule.warmup_steps == 0 else None
        self.lr_factor = 0.0  # of the last step taken
        self.rewarm: tuple[int, float] | None = None  # (step, factor) a budget change re-warms from
        self.best_val_loss: float | None = None
        self.initial_eval: dict[str, float] | None = None  # run.eval_first: before the first step
        self.last_checkpoint: Path | None = None

    # ----------------------------------------------------------------------- setup checks
    def _say(self, message: str) -> None:
        if self.ctx.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _load_tokenizer(self):
        from scratchlm.tokenizer import Tokenizer

        source = self.config.data.tokenizer or self.config.model.init_from
        if not source:
            raise ScratchLMError("config field data.tokenizer: required (a tokenizer "
                                 "directory) unless model.init_from names a model directory")
        if not Path(source).is_dir():
            raise ScratchLMError(f"tokenizer directory not found: {source}")
        return Tokenizer.load(source)

    def _check_data(self) -> dict:
        from scratchlm.data import read_manifest

        data_dir = Path(self.config.data.dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise ScratchLMError(f"config field data.dir: {data_dir} is a file, not a data directory")
        if not data_dir.is_dir():
            raise ScratchLMError(f"config field data.dir: data directory not found: {data_dir}")
        manifest = read_manifest(data_dir)
        tok = self.tokenizer
        if manifest["vocab_size"] != tok.vocab_size:
            raise ScratchLMError(
                f"vocabulary mismatch: data {data_dir} was tokenized with vocab_size "
                f"{manifest['vocab_size']} but the tokenizer has {tok.vocab_size}")
        if manifest.get("tokenizer_hash") not in (None, tok.fingerprint()):
            raise ScratchLMError(
                f"tokenizer mismatch: data {data_dir} was tokenized with tokenizer "
                f"{manifest['tokenizer_hash'][:12]}, the configured tokenizer is "
                f"{tok.fingerprint()[:12]}")
        return manifest

    def _model_config(self):
        from scratchlm.model import ModelConfig

        section = self.config.model
        if section.init_from:
            from scratchlm.model.directory import load_config

            if section.overrides():
                raise ScratchLMError(f"config: model.init_from is set, so the model fields "
                                     f"{', '.join(section.overrides())} cannot be overridden")
            model_config, _ = load_config(section.init_from)
        else:
            model_config = ModelConfig.from_preset(section.preset, **section.overrides(),
                                                   vocab_size=self.tokenizer.vocab_size)
        if model_config.vocab_size != self.tokenizer.vocab_size:
            raise ScratchLMError(
                f"vocabulary mismatch: model {section.init_from} has vocab_size "
                f"{model_config.vocab_size} but the tokenizer has {self.tokenizer.vocab_size}")
        return model_config

    def _build_model(self) -> nn.Module:
        """The model to train: on the meta device (no memory, no weights yet) unless it
        starts from pretrained weights or gets LoRA adapters."""
        from scratchlm.model import Transformer

        if not self.config.model.init_from and self.lora is None:
            with torch.device("meta"):
                return Transformer(self.model_config)
        model = Transformer(self.model_config)
        if self.config.model.init_from:
            from scratchlm.model.directory import load_model

            pretrained, _ = load_model(self.config.model.init_from)
            model.load_state_dict(pretrained.state_dict())
        if self.lora is not None:
            from scratchlm.model.lora import apply_lora

            apply_lora(model, self.lora)  # freezes the base: the optimizer then sees the adapters only
        return model

    def _materialize(self) -> None:
        """Real weights on the training device: `materialize`'s initialisation from run.seed
        for a meta-device model (so they are the same with and without FSDP), else a move."""
        if self.raw_model.tok_emb.weight.is_meta:
            materialize(self.raw_model, self.device, self.config.run.seed)
        else:
            self.raw_model.to(self.device)

    @property
    def lora(self):
        """The run's LoraConfig, or None when every weight trains."""
        from scratchlm.model.lora import LoraConfig

        section = self.config.lora
        if not section.rank:
            return None
        targets = tuple(t.strip() for t in section.targets.split(",") if t.strip())
        return LoraConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout, targets=targets)

    def _loader(self, split: str, packing: str):
        from scratchlm.data import TokenLoader

        run = self.config.run
        return TokenLoader(self.config.data.dir, split, run.micro_batch_size, self.context_length,
                           rank=self.ctx.rank, world_size=self.ctx.world_size, seed=run.seed,
                           packing=packing)

    def _grad_accum(self) -> int:
        run = self.config.run
        per_micro_step = run.micro_batch_size * self.context_length * self.ctx.world_size
        if run.global_batch_tokens % per_micro_step:
            raise ScratchLMError(
                f"config field run.global_batch_tokens: {run.global_batch_tokens} is not a "
                f"multiple of micro_batch_size x context_length x processes = "
                f"{run.micro_batch_size} x {self.context_length} x {self.ctx.world_size} = "
                f"{per_micro_step}")
        return run.global_batch_tokens // per_micro_step

    def _autocast_dtype(self) -> torch.dtype | None:
        wanted = self.config.run.dtype
        if wanted == "auto":
            # CPU bf16 autocast is slower than fp32 on most CPUs (no bf16 matmul units), so
            # auto means bf16 only on GPUs that support it.
            if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return None
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[wanted]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _total_steps(self) -> int | None:
        run = self.config.run
        limits = []
        if run.max_steps is not None:
            limits.append(run.max_steps)
        if run.max_tokens is not None:
            limits.append(math.ceil(run.max_tokens / self.tokens_per_step))
        return min(limits) if limits else None

    # ----------------------------------------------------------------------- budget
    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the budget used: the largest of the step and time fractions."""
        fractions = []
        if self.total_steps is not None:
            fractions.append(step / self.total_steps)
        if self.config.run.max_minutes is not None:
            fractions.append(elapsed / (60.0 * self.config.run.max_minutes))
        return max(fractions)

    # ----------------------------------------------------------------------- resume
    def _restore(self, resume: bool) -> None:
        root = self.out_dir / CHECKPOINTS
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            return
        if not resume:
            raise ScratchLMError(f"{self.out_dir} already holds checkpoints (latest {latest}); "
                                 f"pass --resume to continue it or choose another --out")
        state = ckpt.load_trainer_state(latest)
        differences = ckpt.diff_model_configs(state["model_config"], self.model_config.to_dict())
        if differences:
            raise ScratchLMError(f"cannot resume {latest}: it was trained with another model "
                                 f"config ({'; '.join(differences)})")
        if state["world_size"] != self.ctx.world_size:
            raise ScratchLMError(f"cannot resume {latest}: it was written by "
                                 f"{state['world_size']} process(es), this run has "
                                 f"{self.ctx.world_size}")
        if (state["optimizer"] is None) != self.sharded:
            raise ScratchLMError(f"cannot resume {latest}: it holds "
                                 f"{'sharded (FSDP)' if state['optimizer'] is None else 'unsharded'}"
                                 f" optimizer state; set run.distributed to match")
        ckpt.load_checkpoint_weights(latest, self.raw_model, self.optimizer, state, self.sharded)
        opt_cfg = self.config.optimizer
        for group in self.optimizer.param_groups:  # the config's learning rates win
            group["base_lr"] = opt_cfg.lr
        self.scaler.load_state_dict(state["scaler"])
        mine = state["rank_states"][self.ctx.rank]
        self.train_loader.load_state_dict(mine["loader"])
        self.prefetcher.reset()
        ckpt.restore_rng_state(mine["rng"])
        self.step = state["step"]
        self.elapsed_before = state["elapsed_s"]
        self.warmup_end = state["warmup_end"]
        self.best_val_loss = state["best_val_loss"]
        self.initial_eval = state.get("initial_eval")
        self.lr_factor = state["lr_factor"]
        self.rewarm = state["rewarm"]
        self.last_checkpoint = latest
        self._say(f"resumed from {latest} (step {self.step})")
        if state["budget"] != self._budget():
            self._replan(state)

    def _budget(self) -> dict[str, float | None]:
        run = self.config.run
        return {"max_steps": run.max_steps, "max_tokens": run.max_tokens, "max_minutes": run.max_minutes}

    def _replan(self, state: dict[str, Any]) -> None:
        """Continue a run whose budget changed (e.g. `scratchlm run --minutes` raised): the
        schedule is the new budget's, with progress re-measured against it. The warmup's end
        is rescaled to the new progress units, and the learning rate climbs linearly from
        where it stopped to the new schedule's value over `warmup_steps` steps, re-warming as
        continual pre-training does (Ibrahim et al. 2024, "Simple and Scalable Strategies to
        Continually Pre-train Large Language Models") instead of jumping."""
        old, new = state["progress"], self.progress(self.step, self.elapsed_before)
        if self.warmup_end is not None and old > 0:
            self.warmup_end *= new / old
        self.rewarm = (self.step, self.lr_factor)
        self._say(f"budget changed ({_budget_text(state['budget'])} -> {_budget_text(self._budget())}): "
                  f"{new:.0%} of the new budget used; the learning-rate schedule is re-planned")

    def learning_rate_factor(self, progress: float) -> float:
        """Multiplier of the peak learning rate for the next step."""
        factor = lr_factor(self.config.schedule, self.step, progress, self.warmup_end or 0.0)
        if self.rewarm is not None:
            start_step, start_factor = self.rewarm
            ramp = (self.step - start_step + 1) / max(self.config.schedule.warmup_steps, 1)
            if ramp < 1:
                factor = start_factor + (factor - start_factor) * ramp
        return factor

    def save_checkpoint(self, elapsed: float, val_loss: float | None) -> Path:
        trainer_state = {
            "step": self.step, "tokens": self.step * self.tokens_per_step,
            "elapsed_s": elapsed, "warmup_end": self.warmup_end,
            "best_val_loss": self.best_val_loss, "scaler": self.scaler.state_dict(),
            "model_config": self.model_config.to_dict(), "budget": self._budget(),
            "progress": self.progress(self.step, elapsed), "lr_factor": self.lr_factor,
            "rewarm": self.rewarm, "initial_eval": self.initial_eval,
        }
        rank_state = {"rng": ckpt.capture_rng_state(), "loader": self.prefetcher.state_dict()}
        self.last_checkpoint = ckpt.save_checkpoint(
            self.out_dir / CHECKPOINTS, self.step, model=self.raw_model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, trainer_state=trainer_state, rank_state=rank_state,
            val_loss=val_loss, keep=self.config.run.keep_checkpoints, sharded=self.sharded,
            ctx=self.ctx, adapters=self._adapters())
        return self.last_checkpoint

    # ----------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per target) and bits per byte (train.bpb: the definition
        `scratchlm eval` uses) over the same rows every time: each document scored on its own
        (document packing and masking), the first `eval_batches` batches' worth of rows split
        across ranks, or the whole split when eval_batches is 0."""
        run = self.config.run
        per_rank = math.ceil(run.eval_batches / self.ctx.world_size) if run.eval_batches else None
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for x, y in self.val_loader.one_pass(per_rank):
            segments = self.val_loader.segment_ids(x)
            x, y, segments = (t.to(self.device) for t in (x, y, segments))
            with self.autocast():
                logits = self.model(x, segment_ids=segments)
            sums += score_sums(logits, y, self.token_bytes)
        self.model.train()
        totals = all_reduce_sum(sums.tolist(), self.ctx)
        return {"val_loss": loss_per_token(totals), "val_bpb": bits_per_byte(totals)}

    def sample(self) -> str:
        """A short generation from the prompt (same seed every time, so samples at
        successive evaluations are comparable). Every rank runs it: under FSDP the forward
        passes gather weights collectively."""
        run = self.config.run
        # A document starts after an end-of-text token, in training and here.
        prompt = [self.tokenizer.eot_id or 0] + self.tokenizer.encode_ordinary(run.sample_prompt)
        idx = torch.tensor([prompt[-self.context_length:]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(run.seed)
        with self.autocast(), eager(self.config.run.compile):
            ids = list(self.raw_model.generate(idx, run.sample_tokens, temperature=0.8,
                                               top_k=50, generator=generator,
                                               stop_token=self.tokenizer.eot_id))
        return self.tokenizer.decode(prompt[1:] + ids)

    # ----------------------------------------------------------------------- the loop
    def run(self, resume: bool) -> dict[str, Any]:
        self._restore(resume)
        if self.ctx.is_main:
            atomic_write_json(self.out_dir / RUN_MARKER, {"format": "scratchlm training run"})
            atomic_write_text(self.out_dir / CONFIG_COPY, dump_config_yaml(self.config))
            self.metrics.truncate_after(self.step)
        self._say(self._banner())
        if self.config.run.eval_first and self.step == 0:
            self.initial_eval = self._evaluate_and_log(self.elapsed_before)
        session = _Session(start=self.clock(), last_checkpoint=self.clock(),
                           counts=torch.zeros(2, device=self.device))
        bar = self._progress_bar()
        with _stop_requests() as stop_requested:
            while True:
                progress = self._control_point(session, stop_requested(), bar)
                if progress >= 1.0:
                    break
                self._optimizer_step(session, progress)
                bar.update(1)
                bar.set_postfix(loss=f"{session.loss:.4f}",
                                tok_s=f"{session.tokens_per_s(self.tokens_per_step):,.0f}",
                                eta=_eta(session.elapsed, progress), refresh=False)
                self._after_step(session)
        bar.close()
        self._read_back(session)

        elapsed = self._elapsed(session)
        if session.eval_step != self.step:
            session.eval_result = self._evaluate_and_log(elapsed)
        if not self._checkpointed_now():  # so a later --resume finds the finished state
            self.save_checkpoint(elapsed, session.eval_result["val_loss"])
        return self._finish(elapsed, session)

    def _elapsed(self, session: _Session) -> float:
        return self.elapsed_before + self.clock() - session.start

    def _control_point(self, session: _Session, stop_requested: bool, bar) -> float:
        """Between steps: agree across ranks on time, stop requests and time-based
        checkpoints (each rank has its own clock and signals; all take the largest), act on
        them, and return the fraction of the budget used."""
        run = self.config.run
        checkpoint_due = (run.checkpoint_minutes is not None and
                          self.clock() - session.last_checkpoint >= 60 * run.checkpoint_minutes)
        elapsed, stop, checkpoint_due = all_reduce_max(
            [self._elapsed(session), float(stop_requested), float(checkpoint_due)], self.ctx)
        session.elapsed = elapsed
        if stop or checkpoint_due:
            self._read_back(session)  # the checkpoint below needs the current streak
            if self.step > 0 and session.bad_streak == 0 and not self._checkpointed_now():
                self.save_checkpoint(elapsed, None)
            session.last_checkpoint = self.clock()
            if stop:
                bar.close()
                self._say(f"interrupted at step {self.step}; checkpoint {self.last_checkpoint}")
                raise KeyboardInterrupt
        return self.progress(self.step, elapsed)

    def _optimizer_step(self, session: _Session, progress: float) -> None:
        if self.warmup_end is None and self.step >= self.config.schedule.warmup_steps:
            self.warmup_end = progress
        self.lr_factor = self.learning_rate_factor(progress)
        set_lr(self.optimizer, self.lr_factor)
        t0 = self.clock()
        stats = self.train_step()
        self.step += 1
        session.steps += 1
        session.record(stats)
        if self._read_back_due():
            # Inside the timed region: on a GPU the read waits for the queued steps, whose
            # time then counts towards tokens/s.
            self._read_back(session)
        session.step_seconds += self.clock() - t0

    def _read_back_due(self) -> bool:
        """Whether this step's figures are needed on the host now: it logs, evaluates or
        checkpoints (a checkpoint must know whether a non-finite streak is on)."""
        run = self.config.run
        return self.step == 1 or any(every and self.step % every == 0 for every in
                                     (run.log_every, run.eval_every, run.checkpoint_every))

    def _read_back(self, session: _Session) -> None:
        """Copy the last step's loss and gradient norm, and the counts of skipped steps, to
        the host: with torch's fused optimizer (the default on CUDA) the loop's only device
        sync between log intervals. Non-finite steps were skipped as they happened (see
        step_unless_non_finite); they are reported, and the run stopped for too long a
        streak, here, at the next log/eval/checkpoint step rather than at once."""
        if session.pending is None:
            return
        loss, grad_norm, streak, skipped = session.pending.tolist()
        session.pending = None
        session.loss, session.grad_norm, session.bad_streak = loss, grad_norm, int(streak)
        newly_skipped, session.skipped = int(skipped) - session.skipped, int(skipped)
        if newly_skipped:
            self._on_bad_steps(newly_skipped, loss, grad_norm, session.bad_streak)

    def _after_step(self, session: _Session) -> None:
        """Log, evaluate and checkpoint on their step intervals."""
        run = self.config.run
        elapsed = self._elapsed(session)
        if self.step % run.log_every == 0 or self.step == 1:
            tokens_per_s = session.tokens_per_s(self.tokens_per_step)
            self.metrics.log(dict(kind="train", step=self.step, tokens=self.tokens,
                                  loss=session.loss, grad_norm=session.grad_norm,
                                  lr=self.optimizer.param_groups[0]["lr"],
                                  tokens_per_s=tokens_per_s, elapsed_s=elapsed,
                                  mfu=self._mfu(tokens_per_s)))
        val_loss = None
        if run.eval_every and self.step % run.eval_every == 0:
            session.eval_result, session.eval_step = self._evaluate_and_log(elapsed), self.step
            val_loss = session.eval_result["val_loss"]
        if run.checkpoint_every and self.step % run.checkpoint_every == 0 \
                and session.bad_streak == 0:  # never checkpoint during a non-finite streak
            self.save_checkpoint(elapsed, val_loss)
            session.last_checkpoint = self.clock()

    def _checkpointed_now(self) -> bool:
        return (self.last_checkpoint is not None
                and self.last_checkpoint.name == ckpt.checkpoint_name(self.step))

    @property
    def tokens(self) -> int:
        return self.step * self.tokens_per_step

    def train_step(self) -> torch.Tensor:
        """One optimizer step, queued on the device without waiting for it: returns a device
        tensor [mean loss over processes, gradient norm, 1.0 if the update was skipped for a
        non-finite loss or norm else 0.0]."""
        host, batches = self.prefetcher.next()
        loss = accumulate_gradients(self.model, batches, self.autocast, self.scaler, self.device, self.objective,
                                    counts=[self.objective.weight(batch) for batch in host])
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.raw_model.parameters(), self.config.optimizer.grad_clip)
        stats = all_reduce_mean_(torch.stack([loss, grad_norm.to(loss.device)]), self.ctx)
        found_inf = (~torch.isfinite(stats).all()).float()
        step_unless_non_finite(self.optimizer, found_inf)
        self.scaler.update()  # fp16: its own inf check was recorded by unscale_
        self.optimizer.zero_grad(set_to_none=True)
        return torch.cat([stats, found_inf[None]])

    def _batch(self) -> tuple[torch.Tensor, ...]:
        """The next training micro-batch: (x, y), plus segment ids under document masking."""
        x, y = self.train_loader.next_batch()
        if self.config.data.document_mask:
            return x, y, self.train_loader.segment_ids(x)
        return x, y

    def _on_bad_steps(self, count: int, loss: float, grad_norm: float, streak: int) -> None:
        limit = self.config.run.max_bad_steps
        self._say(f"step {self.step}: {count} step(s) with a non-finite loss or gradient norm since the "
                  f"last report, updates skipped (now: loss {loss}, gradient norm {grad_norm}; "
                  f"{streak}/{limit} in a row)")
        if streak >= limit:
            raise ScratchLMError(
                f"{streak} consecutive non-finite steps (up to step {self.step}): stopping. "
                f"Last good checkpoint: {self.last_checkpoint or 'none'}; lower optimizer.lr "
                f"or check the data")

    def _evaluate_and_log(self, elapsed: float) -> dict[str, float]:
        result = self.evaluate()
        if self.best_val_loss is None or result["val_loss"] < self.best_val_loss:
            self.best_val_loss = result["val_loss"]
        self.metrics.log(dict(kind="eval", step=self.step, tokens=self.tokens,
                              elapsed_s=elapsed, **result))
        self._say(f"step {self.step}: {_figures_text(result)}")
        if self.config.run.sample_tokens > 0:
            text = self.sample()
            self.metrics.log(dict(kind="sample", step=self.step, tokens=self.tokens, text=text))
            self._say(f"sample: {text!r}")
        return result

    def _parameter_counts(self) -> dict[str, int]:
        """All parameters and the ones the optimizer updates (fewer with LoRA)."""
        from scratchlm.model.lora import count_trainable

        counts = count_trainable(self.raw_model)
        return {"total_params": counts.total, "trainable_params": counts.trainable}

    def _adapters(self) -> tuple[str, Any] | None:
        """(base model directory, LoraConfig) of a LoRA run, whose checkpoints hold adapters only."""
        return None if self.lora is None else (self.config.model.init_from, self.lora)

    def _mfu(self, tokens_per_s: float) -> float | None:
        return model_flops_utilization(tokens_per_s, self.flops_per_token, self.peak_flops,
                                       self.ctx.world_size)

    def _finish(self, elapsed: float, session: _Session) -> dict[str, Any]:
        final_dir = self.out_dir / FINAL
        full_weights = None
        if self.sharded:
            full_weights = ckpt.gather_full_weights(self.raw_model, self.ctx)
        eval_result = session.eval_result
        tokens_per_s = session.tokens_per_s(self.tokens_per_step) if session.steps else None
        summary = {
            "steps": self.step, "tokens": self.tokens, "elapsed_s": round(elapsed, 3),
            "train_tokens_per_s": tokens_per_s, "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s) if tokens_per_s else None, "mfu_gpu": matched_gpu(self.device),
            "val_loss": eval_result.get("val_loss"), "val_bpb": eval_result.get("val_bpb"),
            **{name: value for name, value in eval_result.items() if name not in ("val_loss", "val_bpb")},
            "initial_eval": self.initial_eval,
            "best_val_loss": self.best_val_loss, "final_dir": str(final_dir),
            "best_checkpoint": None, "device": str(self.device),
            "world_size": self.ctx.world_size, **self._parameter_counts(),
        }
        if self.ctx.is_main:
            from scratchlm.model.directory import save_adapter, save_model

            extra = {"summary": _json_safe(summary)}
            if self.lora is not None:
                save_adapter(final_dir, self.raw_model, self.tokenizer, self.config.model.init_from, self.lora,
                             extra=extra, overwrite=True)
            else:
                save_model(final_dir, self.raw_model, self.tokenizer, extra=extra, state_dict=full_weights,
                           overwrite=True)
            best = ckpt.best_checkpoint(self.out_dir / CHECKPOINTS)
            summary["best_checkpoint"] = str(best) if best else None
            plot_loss(self.out_dir / METRICS_FILE, self.out_dir / LOSS_PLOT)
            atomic_write_json(self.out_dir / SUMMARY, _json_safe(summary))
            self._say(f"done: {self.step} steps, {self.tokens:,} tokens, {_figures_text(eval_result)}; "
                      f"{'adapters' if self.lora is not None else 'model'} in {final_dir}")
        self.metrics.close()
        return summary

    def _banner(self) -> str:
        n_params = self.raw_model.num_params() if not self.sharded else \
            self.model_config.num_params()
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        mode = (self.config.run.distributed if self.ctx.enabled else "single process")
        packing = self._rows_text()
        lora = ""
        if self.lora is not None:
            from scratchlm.model.lora import count_trainable

            lora = f" with LoRA rank {self.lora.rank} on {','.join(self.lora.targets)}: " + \
                count_trainable(self.raw_model).describe()
        return (f"training {n_params / 1e6:.2f}M parameters{lora} on {self.device} ({dtype}, {mode}, "
                f"{self.ctx.world_size} process(es), {torch.get_num_threads()} CPU threads); "
                f"{self.tokens_per_step:,} tokens/step = {self.grad_accum} micro-batch(es) of "
                f"{self.config.run.micro_batch_size}x{self.context_length} per process; {packing}; "
                f"{_budget_text(self._budget())}; "
                f"MFU {self._mfu_text()}")

    def _mfu_text(self) -> str:
        if self.peak_flops is None:
            return "n/a (no GPU peak known)"
        return f"against the {matched_gpu(self.device)} dense bf16 peak of {self.peak_flops / 1e12:.0f} TFLOP/s"

    def _rows_text(self) -> str:
        """How the batch rows are filled, for the banner."""
        data = self.config.data
        return (f"{data.packing} packing ({self.train_loader.padding_fraction:.1%} padding"
                f"{', attention within documents' if data.document_mask else ''})")

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                    disable=not (self.ctx.is_main and self.config.run.progress),
                    file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------- helpers
@dataclass
class _Session:
    """Counters of this process's session of a run (not checkpointed)."""

    start: float  # the trainer's clock at the start
    last_checkpoint: float  # the trainer's clock at the last checkpoint of this session
    elapsed: float = 0.0  # run time including earlier sessions, agreed across ranks
    steps: int = 0
    step_seconds: float = 0.0  # time inside optimizer steps only: the tokens/s denominator
    bad_streak: int = 0  # consecutive non-finite steps, as of the last read-back
    loss: float = math.nan  # of the last step read back (see Trainer._read_back)
    grad_norm: float = math.nan
    skipped: int = 0  # non-finite steps skipped in this session, as of the last read-back
    eval_step: int = -1
    eval_result: dict[str, float] = field(default_factory=dict)
    # On the device: [non-finite streak, skipped steps] after the last step, and that step's
    # [loss, grad norm, streak, skipped] until it is read back.
    counts: torch.Tensor | None = None
    pending: torch.Tensor | None = None

    def record(self, stats: torch.Tensor) -> None:
        """Fold a step's device stats (Trainer.train_step) into the device counters."""
        skipped = stats[2]
        self.counts = torch.stack([(self.counts[0] + 1) * skipped, self.counts[1] + skipped])
        self.pending = torch.cat([stats[:2], self.counts])

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.steps * tokens_per_step / max(self.step_seconds, 1e-9)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _figures_text(result: dict[str, float]) -> str:
    """An evaluation's figures for the log: 'val loss 2.3456, 1.2345 bits/byte' and the like."""
    names = {"val_loss": "val loss {:.4f}", "val_bpb": "{:.4f} bits/byte"}
    return ", ".join(names.get(name, name.replace("_", " ") + " {:.4f}").format(value)
                     for name, value in result.items())


def _budget_text(budget: dict[str, float | None]) -> str:
    return ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None)


def _eta(elapsed: float, progress: float) -> str:
    if progress <= 0:
        return "?"
    seconds = int(elapsed * (1 - progress) / progress)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C / SIGTERM (e.g. Slurm preemption) into a request the loop handles at a
    step boundary: it checkpoints, then raises KeyboardInterrupt. A signal landing inside
    optimizer.step() would otherwise leave half-updated weights. A second Ctrl-C interrupts
    at once. Only the main thread can install handlers; elsewhere signals act as usual."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, frame):  # noqa: ARG001
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
