"""Bits per byte of a model on held-out documents.

Loss per token depends on the tokenizer (a bigger vocabulary packs more bytes into each
token), so models with different tokenizers, and models against gzip, are compared in bits
per *byte* of the original text:

    bpb = (sum over predicted tokens of -ln p(token | context)) / ln 2 / (bytes those tokens decode to)

Each document is scored on its own, the way the compression baselines see it: the model is
given the end-of-text token as its only context for the first token (that is how documents
are separated in training), and documents longer than the context are cut into consecutive
windows, each starting fresh. Fresh windows make the figure slightly pessimistic for long
documents, never optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class BitsPerByte:
    bits_per_byte: float
    loss_per_token: float  # mean nats per predicted token
    tokens: int
    bytes: int
    documents: int


def _windows(documents: Iterable[np.ndarray], bos: int | None, context_length: int,
             byte_lengths: np.ndarray, counts: dict) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (inputs, targets) windows covering every token of every document exactly once."""
    for doc in documents:
        tokens = [int(t) for t in doc]
        if not tokens:
            continue
        # Without an end-of-text token there is nothing to condition the first token on, so it is
        # not scored and its bytes are not counted either.
        seq = ([bos] if bos is not None else []) + tokens
        counts["documents"] += 1
        counts["bytes"] += int(byte_lengths[seq[1:]].sum())
        for start in range(0, len(seq) - 1, context_length):
            chunk = seq[start:start + context_length + 1]
            yield chunk[:-1], chunk[1:]


@torch.no_grad()
def evaluate_bits_per_byte(model: torch.nn.Module, tokenizer, documents: Iterable[np.ndarray], *,
                           context_length: int, batch_size: int = 8,
                           device: str | torch.device | None = None) -> BitsPerByte:
    """Score `documents` (arrays of token ids, no end-of-text token) with `model`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    byte_lengths = np.asarray(tokenizer.token_byte_lengths())
    counts = {"documents": 0, "bytes": 0}
    total_nats = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()

    def flush(batch: list[tuple[list[int], list[int]]]) -> None:
        nonlocal total_nats, total_tokens
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
        nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        total_nats += float(nats)
        total_tokens += int((y != IGNORE).sum())

    batch: list[tuple[list[int], list[int]]] = []
    for window in _windows(documents, tokenizer.eot_id, context_length, byte_lengths, counts):
        batch.append(window)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    model.train(was_training)

    if counts["bytes"] == 0:
        raise ValueError("no held-out bytes to evaluate: every document was empty")
    return BitsPerByte(
        bits_per_byte=total_nats / math.log(2) / counts["bytes"],
        loss_per_token=total_nats / total_tokens,
        tokens=total_tokens,
        bytes=counts["bytes"],
        documents=counts["documents"],
    )
