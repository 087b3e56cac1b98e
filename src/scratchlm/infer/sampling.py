"""Sampling settings of a request, and sampling a whole batch of rows at once.

Every row of a (rows, vocab) logits tensor has its own settings; the batch is processed with
tensor operations over all rows (per-row settings become (rows, 1) columns), so the cost of
a decoding step does not grow with a Python loop over requests. The order of the steps is
the one of Hugging Face `generate` (its `LogitsProcessor`s), which the tests check against:

    penalties -> temperature -> top-k -> top-p -> min-p -> draw

Penalties follow vLLM: the repetition penalty (CTRL, Keskar et al. 2019) applies to every
token seen so far, prompt included, as in Hugging Face; the presence and frequency penalties
(OpenAI) count the generated tokens only. Temperature 0 is greedy: the argmax of the
penalised logits. The draw is an inverse-CDF lookup of one uniform number per row, taken from
the request's own random generator, so a seeded request draws the same numbers whatever else
is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from scratchlm.errors import ScratchLMError

# OpenAI's accepted range for the presence and frequency penalties.
PENALTY_RANGE = 2.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled (field meanings as in the OpenAI API).

    `max_tokens` is an upper limit: the engine also ends a request with "length" once prompt
    plus completion fill the model's context. `stop` strings are matched in the generated text
    across token boundaries and are not part of the output; `stop_token_ids` end a request in
    addition to the end tokens the engine always stops at. A string or list passed as `stop`
    or `stop_token_ids` is stored as a tuple.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # JSON front ends produce lists (or null), and OpenAI allows a single stop string.
        for name in ("stop", "stop_token_ids"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))

    def check(self, context_length: int | None = None) -> None:
        """Raise a one-line ScratchLMError naming the first bad field. No field depends on
        `context_length` (accepted so callers can pass the model's): `max_tokens` is never
        refused for being long, the engine clips it to the room a prompt leaves."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ScratchLMError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ScratchLMError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ScratchLMError(f"top_k must be an integer >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ScratchLMError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise ScratchLMError(f"min_p must be in [0, 1] (or None), got {self.min_p!r}")
        if (not _is_number(self.repetition_penalty)
                or not 0 < self.repetition_penalty < math.inf):
            raise ScratchLMError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise ScratchLMError(f"{name} must be between -2 and 2, got {value!r}")
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), tuple):
                raise ScratchLMError(f"{name} must be a list, got {getattr(self, name)!r}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ScratchLMError(f"stop must hold non-empty strings, got {text!r}")
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ScratchLMError(f"stop_token_ids must hold token ids >= 0, got {token!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ScratchLMError(f"seed must be an integer between 0 and 2^63 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _as_tuple(value: object) -> object:
    """None -> (), a string -> (string,), any other iterable -> tuple; anything else is kept
    for `check` to name."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# --------------------------------------------------------------------------- the steps
# Each takes logits (rows, vocab) and per-row settings as (rows, 1) columns and returns new
# logits, removed tokens set to -inf (as Hugging Face's warpers do). A neutral setting
# (penalty 1, top_k 0, top_p 1, min_p 0) leaves its row unchanged.

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty on every token in `seen` (rows, vocab bool): a positive logit is divided
    by `penalty`, a negative one multiplied, so a penalty > 1 always makes the token less likely."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: minus `presence` once for a token generated at least once, minus
    `frequency` for every time it was generated (`counts`, rows x vocab)."""
    return logits - presence * (counts > 0) - frequency * counts


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (ties with the k-th kept); 0 = no limit."""
    vocab = logits.shape[-1]
    largest_k = min(int(top_k.max()), vocab)
    if largest_k < 1:
        return logits
    kth = logits.topk(largest_k, dim=-1).values.gather(-1, top_k.clamp(1, largest_k) - 1)
    limited = (top_k > 0) & (top_k < vocab)
    return logits.masked_fill(limited & (logits < kth), -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens until their total
    probability reaches `top_p`. A token goes when the tokens ranked above it already reach
    it, so the most likely token always stays; top_p 1 keeps everything."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p < 1: rounding can push the mass before the last tokens to 1.0 exactly.
    drop_sorted = (mass_before >= top_p) & (top_p < 1)
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens less likely than `min_p` times the most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, -math.inf)


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits): the first token whose cumulative probability
    exceeds the row's uniform number in [0, 1) (scaled by the total, which rounding leaves
    near 1). "Exceeds", not "reaches": a token of probability 0 is never chosen."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)


# --------------------------------------------------------------------------- a batch
class BatchSampler:
    """The settings of a batch of requests as (rows, 1) tensors, built once per batch
    composition and reused for every decoding step until a request joins or leaves."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device) -> None:
        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        # Greedy rows divide by 1: their sampled token is computed but not used.
        self.temperature = column([p.temperature or 1.0 for p in params])
        self.top_k = column([p.top_k or 0 for p in params], torch.long)
        self.top_p = column([1.0 if p.top_p is None else p.top_p for p in params])
        self.min_p = column([p.min_p or 0.0 for p in params])
        self.repetition = column([p.repetition_penalty for p in params])
        self.presence = column([p.presence_penalty for p in params])
        self.frequency = column([p.frequency_penalty for p in params])
        self.any_top_k = any(p.top_k is not None for p in params)
        self.any_top_p = any(p.top_p is not None and p.top_p < 1 for p in params)
        self.any_min_p = any(p.min_p for p in params)
        self.any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        self.any_presence_frequency = any(p.presence_penalty or p.frequency_penalty for p in params)

    def rows(self, start: int, stop: int) -> BatchSampler:
        """The settings of rows start .. stop - 1 (views, no copies)."""
        part = BatchSampler.__new__(BatchSampler)
        for name, value in vars(self).items():
            setattr(part, name, value[start:stop] if isinstance(value, torch.Tensor) else value)
        return part

    def sample(self, logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
        """Token ids (rows,) for fp32 `logits` (rows, vocab). `seen`: tokens of prompt and
        output so far (bool), `counts`: how often each was generated, `uniforms`: one
        number in [0, 1) per row (unused for greedy rows)."""
        if self.any_repetition:
            logits = apply_repetition_penalty(logits, seen, self.repetition)
        if self.any_presence_frequency:
            logits = apply_presence_frequency(logits, counts, self.presence, self.frequency)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy = logits.argmax(dim=-1) if self.any_greedy else None
        logits = logits / self.temperature
        if self.any_top_k:
            logits = top_k_filter(logits, self.top_k)
        if self.any_top_p:
            logits = top_p_filter(logits, self.top_p)
        if self.any_min_p:
            logits = min_p_filter(logits, self.min_p)
        sampled = draw(logits, uniforms)
        return sampled if greedy is None else torch.where(self.greedy, greedy, sampled)

