"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model").

For a prompt x with a preferred reply y_w and a rejected one y_l, the policy pi (initialised
from the SFT model) is trained against the frozen SFT model pi_ref with

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

where log pi(y|x) sums the reply's token log-probabilities (the prompt is context only, as
in SFT). beta * (log pi - log pi_ref) is the policy's implicit reward: the held-out figures are
how often the chosen reply's reward exceeds the rejected one's (preference accuracy) and
by how much on average (reward margin).

The reference model never changes, so its log-probabilities are computed once, before
training, and stored beside the data (`reference_logps.{split}.npy`): the reference
needs no memory during training and is frozen by construction.

Data: the pairs are written as a fine-tuning data directory (scratchlm.post.data) whose
documents alternate chosen, rejected; `PairLoader` serves them as batches whose rows
alternate the same way (one sequence per row), and `PreferenceTrainer` is the training
loop with this objective, loader and evaluation.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from scratchlm.data.loader import IGNORE
from scratchlm.data.shards import open_loss_mask, open_shard, read_manifest, split_info
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_bytes
from scratchlm.post.finetune import (DATA, TRAIN, FinetuneSettings, default_learning_rate, prepare_output,
                                     publish, training_config)
from scratchlm.train.distributed import all_reduce_sum
from scratchlm.train.loop import Trainer

REFERENCE_FILE = "reference_logps.{split}.npy"
DPO_LR = 5e-6  # peak learning rate at GPT-2 small's width (finetune.default_learning_rate)


# --------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from summed reply log-probabilities."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    # -log sigmoid(z) = softplus(-z), computed without overflow for large |z|.
    return F.softplus(-(chosen_reward - rejected_reward)), chosen_reward, rejected_reward


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target) at the targets that are not IGNORE: (rows,)."""
    per_token = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="none")
    return per_token.view(targets.shape).sum(dim=1)


class DirectPreference:
    """The training loop's objective for DPO (see scratchlm.train.loop.LanguageModeling).
    A batch is (x, y, reference log-probs) with rows alternating chosen, rejected."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def weight(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0] // 2  # pairs

    def loss(self, model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, reference = batch
        logps = sequence_logps(model(x), y)
        loss, _, _ = dpo_loss(logps[0::2], logps[1::2], reference[0::2], reference[1::2], self.beta)
        return loss.mean()


# --------------------------------------------------------------------------- data
class PairLoader:
    """Batches of preference pairs from a split of a preference data directory: row 2i is a
    pair's chosen sequence, row 2i+1 its rejected one, each alone in its context-length row.

    Shuffling, rank striding and the resumable position follow scratchlm.data.TokenLoader:
    every epoch visits the pairs in an order drawn from (seed, epoch), rank r of W takes
    pairs r, r + W, ... of it, and the position is one number."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, context_length: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, with_reference: bool = True) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ScratchLMError(f"a preference batch holds whole pairs: {batch_size} rows is not an even number")
        self.data_dir, self.split, self.context_length = Path(data_dir), split, context_length
        self.pairs_per_batch = batch_size // 2
        self.rank, self.world_size, self.seed = rank, world_size, seed
        manifest = read_manifest(self.data_dir)
        self.eot_id = int(manifest["eot_id"])
        self.sequences: list[tuple[np.ndarray, np.ndarray]] = []
        for shard in split_info(manifest, split, self.data_dir)["shards"]:
            tokens, starts = open_shard(self.data_dir, shard, np.dtype(manifest["dtype"]))
            mask = open_loss_mask(self.data_dir, shard)
            for a, b in zip(starts, np.append(starts[1:], len(tokens))):
                self.sequences.append((np.asarray(tokens[a:b - 1], dtype=np.int64), np.asarray(mask[a:b - 1]) > 0))
        if len(self.sequences) % 2:
            raise ScratchLMError(f"{self.data_dir}: the {split} split holds an odd number of sequences, not pairs")
        self.num_pairs = len(self.sequences) // 2
        self.pairs_per_rank = self.num_pairs // world_size
        if self.pairs_per_rank == 0:
            raise ScratchLMError(f"the {split} split of {self.data_dir} has {self.num_pairs} pair(s): fewer than "
                                 f"the {world_size} process(es)")
        self.reference = self._reference() if with_reference else None
        self.pairs_consumed = 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _reference(self) -> np.ndarray:
        path = self.data_dir / REFERENCE_FILE.format(split=self.split)
        if not path.is_file():
            raise ScratchLMError(f"{path}: missing (the reference model's log-probabilities, written before training)")
        reference = np.load(path, allow_pickle=False)
        if reference.shape != (len(self.sequences),):
            raise ScratchLMError(f"{path}: {reference.shape} values for {len(self.sequences)} sequences")
        return reference

    # Sizes the training loop reports.
    @property
    def tokens_per_epoch(self) -> int:
        return sum(len(ids) + 1 for ids, _ in self.sequences)

    @property
    def padding_fraction(self) -> float:
        """Share of padding if every row were context-length (batches are cut to their longest row)."""
        return 1.0 - self.tokens_per_epoch / (len(self.sequences) * self.context_length)

    def _rows(self, pairs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(x, y, reference log-probs) of these pairs: x = [EOT] + sequence, y = sequence + [EOT]
        with the prompt's targets and the EOT's ignored; rows padded to the batch's longest
        sequence (preference pairs are often far shorter than the context: padding them all
        to it would spend most of each step on padding)."""
        rows = np.stack([pairs * 2, pairs * 2 + 1], axis=1).reshape(-1)
        width = max((len(self.sequences[row][0]) + 1 for row in rows), default=1)
        x = np.full((len(rows), width), self.eot_id, dtype=np.int64)
        y = np.full((len(rows), width), IGNORE, dtype=np.int64)
        for i, row in enumerate(rows):
            ids, mask = self.sequences[row]
            x[i, 1:len(ids) + 1] = ids
            y[i, :len(ids)] = np.where(mask, ids, IGNORE)
        reference = self.reference[rows] if self.reference is not None else np.zeros(len(rows))
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(reference.astype(np.float32))

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        pairs = np.empty(self.pairs_per_batch, dtype=np.int64)
        for i in range(self.pairs_per_batch):
            epoch, offset = divmod(self.pairs_consumed, self.pairs_per_rank)
            if epoch != self._order_epoch:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
                self._order, self._order_epoch = order[self.rank::self.world_size][:self.pairs_per_rank], epoch
            pairs[i] = self._order[offset]
            self.pairs_consumed += 1
        return self._rows(pairs)

    def one_pass(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's share of every pair once, in file order (evaluation). Every rank yields
        the same number of batches; the last ones may be smaller."""
        mine = np.arange(self.rank, self.num_pairs, self.world_size)
        batches = math.ceil(math.ceil(self.num_pairs / self.world_size) / self.pairs_per_batch)
        for n in range(batches if max_batches is None else min(batches, max_batches)):
            yield self._rows(mine[n * self.pairs_per_batch:(n + 1) * self.pairs_per_batch])

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "world_size": self.world_size,
                "num_pairs": self.num_pairs, "pairs_consumed": self.pairs_consumed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seed", "world_size", "num_pairs"):
            if state.get(key) != self.state_dict()[key]:
                raise ScratchLMError(f"loader state does not match this data: {key} is {state.get(key)!r} in the "
                                     f"checkpoint, {self.state_dict()[key]!r} now")
        self.pairs_consumed = int(state["pairs_consumed"])


# --------------------------------------------------------------------------- the trainer
class PreferenceTrainer(Trainer):
    """The training loop with DPO's objective, pair batches and held-out preference figures."""

    def __init__(self, *args, beta: float, **kwargs) -> None:
        self.objective = DirectPreference(beta)
        super().__init__(*args, **kwargs)

    def _loader(self, split: str, packing: str) -> PairLoader:  # noqa: ARG002 - one row per sequence
        run = self.config.run
        return PairLoader(self.config.data.dir, split, run.micro_batch_size, self.context_length,
                          rank=self.ctx.rank, world_size=self.ctx.world_size, seed=run.seed)

    def _batch(self) -> tuple[torch.Tensor, ...]:
        return self.train_loader.next_batch()

    def _rows_text(self) -> str:
        return "one sequence per row, chosen and rejected side by side, rows cut to their batch's longest"

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean DPO loss, preference accuracy and reward margin over every held-out pair."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, margin, pairs
        for batch in self.val_loader.one_pass():
            x, y, reference = (t.to(self.device) for t in batch)
            if not len(x):
                continue
            with self.autocast():
                logits = self.model(x)
            loss, chosen, rejected = dpo_loss(*_pairs(sequence_logps(logits, y), reference), self.objective.beta)
            sums += torch.stack([loss.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(),
                                 torch.tensor(len(loss), device=self.device)]).double()
        self.model.train()
        loss, correct, margin, pairs = all_reduce_sum(sums.tolist(), self.ctx)
        return {"val_loss": loss / pairs, "val_preference_accuracy": correct / pairs,
                "val_reward_margin": margin / pairs}


def _pairs(logps: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return logps[0::2], logps[1::2], reference[0::2], reference[1::2]


@torch.no_grad()
def reference_logps(model, loader: PairLoader) -> np.ndarray:
    """The model's summed reply log-probabilities of every sequence of `loader`, in file order."""
    model.eval()
    device = next(model.parameters()).device
    values = []
    for x, y, _ in loader.one_pass():
        values.append(sequence_logps(model(x.to(device)), y.to(device)).double().cpu().numpy())
    return np.concatenate(values)


# --------------------------------------------------------------------------- the command
def dpo(sft_dir: str | Path, data_files: list[str | Path], out_dir: str | Path,
        settings: FinetuneSettings | None = None, *, beta: float = 0.1, resume: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    """Train the chat model in `sft_dir` on the preference pairs of `data_files` with DPO.
    OUT_DIR becomes the tuned model (or adapter) directory, with summary.json holding the
    held-out preference accuracy and reward margin before and after."""
    from scratchlm.model.directory import load_model
    from scratchlm.post.chat import chat_format
    from scratchlm.post.data import files_fingerprint, prepare_masked_data
    from scratchlm.post.formats import read_preference_file, split_held_out
    from scratchlm.train import train

    settings = settings or FinetuneSettings()
    settings.check()
    if not (math.isfinite(beta) and beta > 0):
        raise ScratchLMError(f"--beta: must be a positive number, got {beta}")
    if not data_files:
        raise ScratchLMError("dpo: no --data file given")
    started = time.monotonic()
    model, tokenizer = load_model(sft_dir)
    if chat_format(tokenizer) != "chatml":
        raise ScratchLMError(f"{sft_dir}: not a chat model (its tokenizer has no chat tokens); fine-tune it with "
                             f"`scratchlm sft` first")
    context = model.config.context_length

    pairs, skipped = [], 0
    for path in data_files:
        found, equal = read_preference_file(path)
        pairs += found
        skipped += equal
    train_set, val_set = split_held_out(pairs, settings.val_fraction, settings.seed)
    if not train_set or not val_set:
        raise ScratchLMError(f"dpo: {len(pairs)} pair(s) are too few to hold out a validation slice of "
                             f"{settings.val_fraction:.0%}")
    out_dir = prepare_output(Path(out_dir), resume, overwrite)  # after the data proved readable
    data_dir = out_dir / DATA
    fingerprint = files_fingerprint(data_files, {"val_fraction": settings.val_fraction, "seed": settings.seed,
                                                 "tokenizer": tokenizer.fingerprint(), "context": context,
                                                 "reference": str(Path(sft_dir).resolve())})
    stats = prepare_masked_data(data_dir, tokenizer, context,
                                {split: [[p.conversation(p.chosen), p.conversation(p.rejected)] for p in items]
                                 for split, items in (("train", train_set), ("val", val_set))},
                                "preference", fingerprint, resume, {"pairs": len(pairs), "equal_pairs_skipped": skipped})
    if stats["truncated"]:
        print(f"dpo: {stats['truncated']} replies of {stats['pairs']} pairs do not fit the context of {context} "
              f"tokens with their prompt; {stats['no_target_left']} pairs were left out", file=sys.stderr)
    for split in ("train", "val"):  # the frozen reference: computed once
        path = data_dir / REFERENCE_FILE.format(split=split)
        if not path.is_file():
            loader = PairLoader(data_dir, split, 2 * settings.micro_batch_size, context, with_reference=False)
            buffer = _npy_bytes(reference_logps(model, loader))
            atomic_write_bytes(path, buffer)

    rows = PairLoader(data_dir, "train", 2, context, with_reference=False).num_pairs * 2
    lr = default_learning_rate(DPO_LR, model.config.d_model, settings.lora_rank > 0)
    config = training_config(settings, Path(sft_dir), data_dir, context, rows, 2, default_lr=lr)
    config.data.document_mask = False  # one sequence per row: nothing to mask
    run = train(config, out_dir / TRAIN, resume=resume, overwrite=overwrite,
                trainer=functools.partial(PreferenceTrainer, beta=beta))
    before = run.get("initial_eval") or {}
    summary = {
        "sft_model": str(Path(sft_dir).resolve()), "data": [str(Path(p).resolve()) for p in data_files],
        "beta": beta, **stats, "train_pairs": len(train_set), "val_pairs": len(val_set),
        "base_val_preference_accuracy": before.get("val_preference_accuracy"),
        "base_val_reward_margin": before.get("val_reward_margin"), "base_val_loss": before.get("val_loss"),
        "val_preference_accuracy": run.get("val_preference_accuracy"),
        "val_reward_margin": run.get("val_reward_margin"), "val_loss": run["val_loss"],
        "steps": run["steps"], "tokens": run["tokens"], "train_seconds": run["elapsed_s"],
        "seconds": round(time.monotonic() - started, 1), "lora_rank": settings.lora_rank,
        "trainable_params": run["trainable_params"], "total_params": run["total_params"],
    }
    publish(out_dir, run, summary)
    return summary


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
