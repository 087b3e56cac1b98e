"""Bits per byte: the one definition that the trainer's validation and `scratchlm eval` share.

Loss per token depends on the tokenizer (a bigger vocabulary packs more bytes into each
token), so models with different tokenizers, and models against gzip, are compared in bits
per *byte* of the original text:

    bpb = (sum over targets that decode to text of -ln p(target | context)) / ln 2
          / (UTF-8 bytes those targets decode to)

Targets that decode to no bytes — the end-of-text token predicted at the end of each
document — are left out of both sums: they are not text (gzip never sees them either), and
counting their nats over zero bytes would charge the model for a byte it does not produce.
Targets below 0 are padding and count nowhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Positions of the accumulated sums returned by `score_sums`.
NATS, TOKENS, TEXT_NATS, BYTES = range(4)


def score_sums(logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """float64 [nats over all targets, number of targets, nats over text targets, their bytes].

    logits (..., vocab), targets (...) with -1 (any negative) for padding, token_bytes (vocab,)
    the bytes each id decodes to (Tokenizer.token_byte_lengths, 0 for special tokens), on the
    logits' device. Sums add up over batches and processes; `bits_per_byte` reads them.
    """
    flat = targets.reshape(-1)
    valid = flat >= 0
    safe = flat.clamp(min=0)
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe, reduction="none") * valid
    nbytes = token_bytes[safe] * valid
    text = nbytes > 0
    return torch.stack([nats.sum(dtype=torch.float64), valid.sum().to(torch.float64),
                        (nats * text).sum(dtype=torch.float64), nbytes.sum().to(torch.float64)])


def bits_per_byte(sums: torch.Tensor | list[float]) -> float:
    """bits per byte from `score_sums` totals."""
    return float(sums[TEXT_NATS]) / math.log(2) / max(float(sums[BYTES]), 1.0)


def loss_per_token(sums: torch.Tensor | list[float]) -> float:
    """Mean nats per target (the training loss's definition) from `score_sums` totals."""
    return float(sums[NATS]) / max(float(sums[TOKENS]), 1.0)
