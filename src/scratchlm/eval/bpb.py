"""Bits per byte of a model on held-out documents (the definition: scratchlm.train.bpb).

Each document is scored on its own, the way the compression baselines see it: the model is
given the end-of-text token as its only context for the first token (that is how documents
are separated in training), and documents longer than the context are cut into consecutive
windows, each starting fresh. Fresh windows make the figure slightly pessimistic for long
documents, never optimistic. The trainer's validation pass packs the same windows into rows
with document masking, and gets the same figure (tests/test_train_loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from scratchlm.train.bpb import BYTES, TOKENS, bits_per_byte, loss_per_token, score_sums

IGNORE = -1


@dataclass(frozen=True)
class BitsPerByte:
    bits_per_byte: float
    loss_per_token: float  # mean nats per predicted token
    tokens: int
    bytes: int
    documents: int


def _windows(documents: Iterable[np.ndarray], bos: int | None, context_length: int,
             counts: dict) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (inputs, targets) windows covering every token of every document exactly once."""
    for doc in documents:
        tokens = [int(t) for t in doc]
        if not tokens:
            continue
        # Without an end-of-text token there is nothing to condition the first token on, so it is
        # not scored and its bytes are not counted either.
        seq = ([bos] if bos is not None else []) + tokens
        counts["documents"] += 1
        for start in range(0, len(seq) - 1, context_length):
            chunk = seq[start:start + context_length + 1]
            yield chunk[:-1], chunk[1:]


@torch.no_grad()
def evaluate_bits_per_byte(model: torch.nn.Module, tokenizer, documents: Iterable[np.ndarray], *,
                           context_length: int, batch_size: int = 8,
                           device: str | torch.device | None = None) -> BitsPerByte:
    """Score `documents` (arrays of token ids, no end-of-text token) with `model`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    token_bytes = torch.as_tensor(np.asarray(tokenizer.token_byte_lengths()), dtype=torch.int64, device=device)
    counts = {"documents": 0}
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()

    def flush(batch: list[tuple[list[int], list[int]]]) -> None:
        nonlocal sums
        width = max(len(x) for x, _ in batch)
        x = torch.zeros((len(batch), width), dtype=torch.long)
        y = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, (inputs, targets) in enumerate(batch):
            x[row, :len(inputs)] = torch.tensor(inputs)
            y[row, :len(targets)] = torch.tensor(targets)
        x, y = x.to(device), y.to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            logits = model(x)
        sums += score_sums(logits, y, token_bytes)

    batch: list[tuple[list[int], list[int]]] = []
    for window in _windows(documents, tokenizer.eot_id, context_length, counts):
        batch.append(window)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    model.train(was_training)

    if sums[BYTES] == 0:
        raise ValueError("no held-out bytes to evaluate: every document was empty")
    return BitsPerByte(
        bits_per_byte=bits_per_byte(sums),
        loss_per_token=loss_per_token(sums),
        tokens=int(sums[TOKENS]),
        bytes=int(sums[BYTES]),
        documents=counts["documents"],
    )
