"""Training/validation batches from token shards: memory-mapped, shuffled, resumable, rank-aware.

The split is cut into windows of context_length + 1 tokens (x = window[:-1], y = window[1:]):
  stream    contiguous windows over each shard's token stream (every token is used once);
  document  windows start at a document boundary; a document longer than the context is
            continued by further windows starting at its own offsets + k·context_length, and a
            window may run past its document's end into the next ones (packing, no padding).

Each epoch visits all windows in an order drawn from (seed, epoch) alone. Rank r of W takes
the permuted windows r, r + W, r + 2W, ... (truncated to the same count on every rank, so ranks
stay in lockstep and never share a window). The whole position is one number,
`windows_consumed` by each rank, which is why the state dict is tiny and identical on every
rank, and a resumed loader replays exactly the batches it would have produced. Batches simply
continue into the next epoch, so a split smaller than one batch still works (the val split of
a tiny corpus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from scratchlm.data.shards import open_shard, read_manifest, split_info
from scratchlm.errors import ScratchLMError

PACKING_MODES = ("stream", "document")
_STATE_VERSION = 1


def stream_window_starts(num_tokens: int, context_length: int) -> np.ndarray:
    return np.arange(0, num_tokens - context_length, context_length, dtype=np.int64)


def document_window_starts(doc_starts: np.ndarray, num_tokens: int, context_length: int) -> np.ndarray:
    """Offsets doc_start + k·context_length inside every document, whose window fits the shard."""
    doc_ends = np.append(doc_starts[1:], num_tokens)
    per_doc = -(-(doc_ends - doc_starts) // context_length)  # ceil: windows starting in each document
    k = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    starts = np.repeat(doc_starts, per_doc) + k * context_length
    return starts[starts + context_length + 1 <= num_tokens].astype(np.int64)


class TokenLoader:
    """(x, y) batches from one split of a data directory; see the module docstring."""

    def __init__(
        self, data_dir: str | Path, split: str = "train", batch_size: int = 8, context_length: int = 256, *,
        rank: int = 0, world_size: int = 1, seed: int = 0, packing: str = "stream",
    ):
        if packing not in PACKING_MODES:
            raise ScratchLMError(f"packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}")
        if not 0 <= rank < world_size:
            raise ScratchLMError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or context_length < 1:
            raise ScratchLMError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
        self.data_dir = Path(data_dir)
        self.split, self.batch_size, self.context_length = split, batch_size, context_length
        self.rank, self.world_size, self.seed, self.packing = rank, world_size, seed, packing
        self.manifest = read_manifest(self.data_dir)
        dtype = np.dtype(self.manifest["dtype"])

        self._shards: list[np.ndarray] = []
        window_shard, window_start = [], []
        for i, shard in enumerate(split_info(self.manifest, split, self.data_dir)["shards"]):
            tokens, doc_starts = open_shard(self.data_dir, shard, dtype)
            self._shards.append(tokens)
            starts = (stream_window_starts(len(tokens), context_length) if packing == "stream"
                      else document_window_starts(doc_starts, len(tokens), context_length))
            window_shard.append(np.full(len(starts), i, dtype=np.int32))
            window_start.append(starts)
        self._window_shard = np.concatenate(window_shard) if window_shard else np.zeros(0, np.int32)
        self._window_start = np.concatenate(window_start) if window_start else np.zeros(0, np.int64)
        self.num_windows = len(self._window_start)
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank == 0:
            tokens = sum(len(t) for t in self._shards)
            raise ScratchLMError(
                f"{split} split of {self.data_dir} has {tokens} tokens: not one window of "
                f"{context_length + 1} tokens per rank for {world_size} rank(s); use a shorter context"
            )
        self.windows_consumed = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens all ranks together see in one epoch."""
        return self.windows_per_rank * self.world_size * self.context_length

    @property
    def batches_per_epoch(self) -> int:
        return self.windows_per_rank // self.batch_size

    @property
    def epoch(self) -> int:
        return self.windows_consumed // self.windows_per_rank

    # ------------------------------------------------------------------ batches
    def _rank_windows(self, epoch: int) -> np.ndarray:
        """This rank's window ids for `epoch`, in visiting order (cached per epoch)."""
        if epoch != self._perm_epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm = order[self.rank :: self.world_size][: self.windows_per_rank]
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size, context_length), y = x shifted left by one."""
        rows = np.empty((self.batch_size, self.context_length + 1), dtype=np.int64)
        for row in range(self.batch_size):
            epoch, offset = divmod(self.windows_consumed, self.windows_per_rank)
            window = self._rank_windows(epoch)[offset]
            start = self._window_start[window]
            rows[row] = self._shards[self._window_shard[window]][start : start + self.context_length + 1]
            self.windows_consumed += 1
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION, "split": self.split, "seed": self.seed, "packing": self.packing,
            "context_length": self.context_length, "world_size": self.world_size,
            "num_windows": self.num_windows, "windows_consumed": self.windows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The batch size may change; the window layout may not."""
        current = self.state_dict()
        for key in ("version", "split", "seed", "packing", "context_length", "world_size", "num_windows"):
            if state.get(key) != current[key]:
                raise ScratchLMError(
                    f"loader state does not match this data/loader: {key} is {state.get(key)!r} in the "
                    f"checkpoint, {current[key]!r} now"
                )
        self.windows_consumed = int(state["windows_consumed"])
