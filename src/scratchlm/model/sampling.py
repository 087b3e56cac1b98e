"""Choosing the next token from a row of logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import torch

from scratchlm.errors import ScratchLMError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ScratchLMError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ScratchLMError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ScratchLMError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from `logits` (vocab,). Temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        probs = _nucleus(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches top_p
    (Holtzman et al. 2019); multinomial renormalises what is left."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    # A token is dropped when the tokens ranked above it already reach top_p; the most
    # likely token has nothing before it and therefore always survives.
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
