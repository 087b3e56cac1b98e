"""Training/validation batches from token shards: memory-mapped, shuffled, resumable, rank-aware.

A shard holds documents, each followed by the EOT token: `d0 EOT d1 EOT ...`. The EOT before
a document doubles as its beginning-of-sequence token: a document's inputs are
`[EOT] + d` and its targets `d + [EOT]` (predicting the EOT teaches the model to stop). For
the first document of a shard the EOT before it is implied.

A batch row holds `context_length` targets, made of *pieces*: a piece is a run of targets
`stream[a:b]` with the inputs `stream[a-1:b-1]` (that implied EOT when a = 0). Every target of
a split lies in exactly one piece, so one epoch predicts every token exactly once.
  stream    rows are consecutive pieces of `context_length` targets over each shard (nanoGPT's
            windows, without overlap); the last row of a shard is padded.
  document  Best-fit packing (Ding et al. 2024, "Fewer Truncations Improve Language
            Modeling"): each document is one piece, or, when longer than the context, pieces
            of `context_length` targets; pieces are packed into rows largest first, each into
            the fullest row it fits, and the rest of a row is padding. Rows then start at
            document starts (BOS-aligned), and no document is cut short of its context except
            where it exceeds the context window itself.
Padding is the EOT id as input and -1 as target (ignored by the loss). In data with a loss mask
(fine-tuning conversations) a target outside the mask is -1 too: the prompt is read, not learnt. A piece that continues
a document (its first input is not an EOT) always opens its row, so a row's documents are
found from its inputs alone: a new one starts at each EOT (`segment_ids`). With the model's
document masking (`Transformer(..., segment_ids=...)`) each document in a row is then
computed as if it were alone.

Each epoch visits all rows in an order drawn from (seed, epoch) alone. Rank r of W takes the
permuted rows r, r + W, r + 2W, ... (truncated to the same count on every rank, so ranks stay
in lockstep and never share a row). The whole position is one number, `windows_consumed` by
each rank, which is why the state dict is tiny and identical on every rank, and a resumed
loader replays exactly the batches it would have produced. Batches simply continue into the
next epoch, so a split smaller than one batch still works (the val split of a tiny corpus).
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from scratchlm.data.shards import open_loss_mask, open_shard, read_manifest, split_info
from scratchlm.errors import ScratchLMError

PACKING_MODES = ("stream", "document")
IGNORE = -1  # target of a padding slot (the model's cross-entropy ignores it)
_STATE_VERSION = 2


def stream_pieces(num_tokens: int, context_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(piece starts, piece ends, row of each piece) for stream packing of one shard."""
    starts = np.arange(0, num_tokens, context_length, dtype=np.int64)
    ends = np.minimum(starts + context_length, num_tokens)
    return starts, ends, np.arange(len(starts), dtype=np.int64)


def document_pieces(doc_starts: np.ndarray, num_tokens: int, context_length: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(piece starts, piece ends, row of each piece) for best-fit document packing of one shard.

    A document's targets are its tokens and its EOT: stream[start : next start]. Rows are
    numbered in the order they are opened; pieces come out grouped by row, in row order.
    """
    doc_ends = np.append(doc_starts[1:], num_tokens)
    per_doc = -(-(doc_ends - doc_starts) // context_length)  # pieces per document (ceil)
    k = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    starts = np.repeat(doc_starts, per_doc) + k * context_length
    ends = np.minimum(starts + context_length, np.repeat(doc_ends, per_doc))
    lengths = ends - starts

    row = np.full(len(starts), -1, dtype=np.int64)
    space_of_row: list[int] = []
    rows_with_space: dict[int, list[int]] = {}  # remaining space -> rows (a stack)
    spaces: list[int] = []  # sorted remaining spaces that some row has

    def open_row(piece: int) -> None:
        row[piece] = len(space_of_row)
        space_of_row.append(context_length - int(lengths[piece]))
        offer(row[piece])

    def offer(r: int) -> None:
        space = space_of_row[r]
        if space > 0:
            if space not in rows_with_space or not rows_with_space[space]:
                rows_with_space[space] = []
                bisect.insort(spaces, space)
            rows_with_space[space].append(r)

    # Continuations (k > 0) open their own rows: their first input is not an EOT, so they
    # must come first in a row for its documents to be found from the inputs.
    for piece in np.flatnonzero(k > 0):
        open_row(piece)
    # Fresh pieces, largest first (ties: corpus order, for determinism), each into the row
    # with the least space that still fits it.
    fresh = np.flatnonzero(k == 0)
    for piece in fresh[np.argsort(-lengths[fresh], kind="stable")]:
        need = int(lengths[piece])
        i = bisect.bisect_left(spaces, need)
        if i == len(spaces):
            open_row(piece)
            continue
        space = spaces[i]
        r = rows_with_space[space].pop()
        if not rows_with_space[space]:
            del spaces[i]
        row[piece] = r
        space_of_row[r] = space - need
        offer(r)
    # Within a row: the continuation first, then the documents in corpus order.
    order = np.lexsort((np.where(k > 0, -1, np.arange(len(starts))), row))
    return starts[order], ends[order], row[order]


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
        self.eot_id = int(self.manifest["eot_id"])
        dtype = np.dtype(self.manifest["dtype"])

        # Pieces of all shards, grouped by row: row r is pieces row_offsets[r]:row_offsets[r+1].
        self._shards: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []  # per shard, when the data has a loss mask
        piece_shard, piece_start, piece_end, row_sizes = [], [], [], []
        for i, shard in enumerate(split_info(self.manifest, split, self.data_dir)["shards"]):
            tokens, doc_starts = open_shard(self.data_dir, shard, dtype)
            self._shards.append(tokens)
            if self.manifest.get("loss_mask"):
                self._masks.append(open_loss_mask(self.data_dir, shard))
            starts, ends, rows = (stream_pieces(len(tokens), context_length) if packing == "stream"
                                  else document_pieces(doc_starts, len(tokens), context_length))
            piece_shard.append(np.full(len(starts), i, dtype=np.int32))
            piece_start.append(starts)
            piece_end.append(ends)
            row_sizes.append(np.bincount(rows, minlength=rows.max() + 1 if len(rows) else 0))
        self._piece_shard = np.concatenate(piece_shard) if piece_shard else np.zeros(0, np.int32)
        self._piece_start = np.concatenate(piece_start) if piece_start else np.zeros(0, np.int64)
        self._piece_end = np.concatenate(piece_end) if piece_end else np.zeros(0, np.int64)
        sizes = np.concatenate(row_sizes) if row_sizes else np.zeros(0, np.int64)
        self._row_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        targets = self._piece_end - self._piece_start
        self._row_targets = np.add.reduceat(targets, self._row_offsets[:-1]) if len(sizes) else sizes

        self.num_windows = len(sizes)  # rows
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank == 0:
            tokens = sum(len(t) for t in self._shards)
            raise ScratchLMError(
                f"{split} split of {self.data_dir} has {tokens} tokens in {self.num_windows} row(s) of "
                f"{context_length}: not one row per rank for {world_size} rank(s); use fewer processes"
                if tokens else f"{split} split of {self.data_dir} is empty")
        self.windows_consumed = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def tokens_per_epoch(self) -> int:
        """Targets (padding excluded) all ranks together predict in one epoch."""
        used = np.random.default_rng([self.seed, 0]).permutation(self.num_windows)
        used = used[: self.windows_per_rank * self.world_size]
        return int(self._row_targets[used].sum())

    @property
    def padding_fraction(self) -> float:
        """Share of row slots that are padding (one epoch, all rows)."""
        slots = self.num_windows * self.context_length
        return 1.0 - float(self._row_targets.sum()) / slots if slots else 0.0

    @property
    def batches_per_epoch(self) -> int:
        return self.windows_per_rank // self.batch_size

    @property
    def epoch(self) -> int:
        return self.windows_consumed // self.windows_per_rank

    # ------------------------------------------------------------------ batches
    def _rank_windows(self, epoch: int) -> np.ndarray:
        """This rank's row ids for `epoch`, in visiting order (cached per epoch)."""
        if epoch != self._perm_epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm = order[self.rank :: self.world_size][: self.windows_per_rank]
            self._perm_epoch = epoch
        return self._perm

    def _fill_row(self, row: int, x: np.ndarray, y: np.ndarray) -> None:
        """Write row `row`'s inputs and targets into x and y (already padding)."""
        at = 0
        for piece in range(self._row_offsets[row], self._row_offsets[row + 1]):
            tokens = self._shards[self._piece_shard[piece]]
            a, b = int(self._piece_start[piece]), int(self._piece_end[piece])
            n = b - a
            y[at : at + n] = tokens[a:b]
            if self._masks:
                y[at : at + n][self._masks[self._piece_shard[piece]][a:b] == 0] = IGNORE
            if a > 0:
                x[at : at + n] = tokens[a - 1 : b - 1]
            else:  # the implied EOT before the shard's first document
                x[at + 1 : at + n] = tokens[: n - 1]
            at += n

    def _batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of these rows; a row id of -1 stays all padding."""
        x = np.full((len(rows), self.context_length), self.eot_id, dtype=np.int64)
        y = np.full((len(rows), self.context_length), IGNORE, dtype=np.int64)
        for i, row in enumerate(rows):
            if row >= 0:
                self._fill_row(int(row), x[i], y[i])
        return torch.from_numpy(x), torch.from_numpy(y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size, context_length): y[i, t] is the target of
        x[i, :t+1] (within a document, y is x shifted left by one); padding targets are -1."""
        rows = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            epoch, offset = divmod(self.windows_consumed, self.windows_per_rank)
            rows[i] = self._rank_windows(epoch)[offset]
            self.windows_consumed += 1
        return self._batch(rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def one_pass(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of every row once (rows r, r + W, ... of the epoch-0 order; not
        truncated, so all ranks together cover the whole split), in batches, the last one
        smaller; at most `max_batches`. For evaluation: it leaves the training position alone.

        Every rank yields the same number of batches (FSDP's forward passes are collective):
        a rank whose share ran out gets one all-padding row, which counts for nothing."""
        order = np.random.default_rng([self.seed, 0]).permutation(self.num_windows)[self.rank :: self.world_size]
        rows_per_rank = -(-self.num_windows // self.world_size)
        batches = -(-rows_per_rank // self.batch_size)
        for n in range(batches if max_batches is None else min(batches, max_batches)):
            rows = order[n * self.batch_size : (n + 1) * self.batch_size]
            yield self._batch(rows if len(rows) else np.array([-1]))

    def segment_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Document index of every input position of a batch: a new document starts at each
        EOT (see the module docstring); for the model's document masking."""
        return (x == self.eot_id).cumsum(dim=1)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION, "split": self.split, "seed": self.seed, "packing": self.packing,
            "context_length": self.context_length, "world_size": self.world_size,
            "num_windows": self.num_windows, "windows_consumed": self.windows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The batch size may change; the row layout may not."""
        current = self.state_dict()
        for key in ("version", "split", "seed", "packing", "context_length", "world_size", "num_windows"):
            if state.get(key) != current[key]:
                raise ScratchLMError(
                    f"loader state does not match this data/loader: {key} is {state.get(key)!r} in the "
                    f"checkpoint, {current[key]!r} now"
                )
        self.windows_consumed = int(state["windows_consumed"])
