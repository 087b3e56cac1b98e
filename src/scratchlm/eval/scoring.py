"""Log-likelihood of a continuation given a context: the one primitive behind every
multiple-choice benchmark, scored the way lm-evaluation-harness scores it.

Token boundaries follow the harness (`_encode_pair`): a trailing space of the context moves
to the continuation, the context + continuation string is encoded whole, and the continuation
is what follows the context's own tokens. Both encodings start with <|endoftext|> (the
harness's `add_bos_token=True`): every training document follows one, so a question starts
the way a document does. Text is ordinary text (a special token's string in a question is
text). When context + continuation exceed the model's window, the input is cut from the left
(`(context + continuation)[-(L + 1):][:-1]`, as the harness does).

Speed: requests with the same (cut) context tokens — the choices of one question — share
it. The contexts of a batch are run once, right-padded, into a KV cache; the cache rows are
repeated once per choice (`KVCache.select`) and all continuations run as one ragged batch
after them. A 4-choice HellaSwag item thus costs one context plus four endings instead of
four full sequences.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from scratchlm.errors import ScratchLMError


@dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum of log p(continuation token | everything before), natural log
    is_greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens scored


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with the harness's token boundaries (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    context_ids = prefix + tokenizer.encode_ordinary(context)
    whole = prefix + tokenizer.encode_ordinary(context + continuation)
    return context_ids, whole[len(context_ids):]


def _cut(context_ids: list[int], continuation_ids: list[int], window: int) -> tuple[tuple[int, ...], list[int]]:
    """The context tokens the model sees before the continuation, after the harness's left cut."""
    if not continuation_ids:
        raise ScratchLMError("a continuation encodes to no tokens: nothing to score")
    if len(continuation_ids) >= window + 1 or (not context_ids and len(continuation_ids) > window):
        raise ScratchLMError(f"a continuation of {len(continuation_ids)} tokens does not fit the model's context "
                             f"of {window} tokens")
    whole = (context_ids + continuation_ids)[-(window + 1):]
    context = tuple(whole[:len(whole) - len(continuation_ids)])
    if not context:
        raise ScratchLMError("an empty context: the tokenizer has no <|endoftext|> to start from")
    return context, continuation_ids


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   progress: bool = True) -> list[Score]:
    """Score each (context, continuation) request; `batch_size` continuations run per forward."""
    return score_tokens(model, [encode_pair(tokenizer, context, continuation) for context, continuation in requests],
                        batch_size=batch_size, progress=progress)


@torch.no_grad()
def score_tokens(model, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 32,
                 progress: bool = True) -> list[Score]:
    """Score (context ids, continuation ids) requests: the token-level form of `loglikelihoods`
    (the lm-evaluation-harness adapter also scores rolling windows through it)."""
    if batch_size < 1:
        raise ScratchLMError(f"batch size must be at least 1, got {batch_size}")
    window = model.config.context_length
    encoded = [_cut(list(context), list(continuation), window) for context, continuation in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(encoded):
        groups.setdefault(context, []).append(i)
    # Longest first, as the harness orders them: padding stays small within a batch, and an
    # out-of-memory error shows up in the first batch rather than after an hour.
    order = sorted(groups, key=lambda c: -(len(c) + max(len(encoded[i][1]) for i in groups[c])))
    scores: list[Score | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    from tqdm import tqdm

    try:
        with tqdm(total=len(encoded), desc="scoring", unit="req", file=sys.stderr, disable=not progress) as bar:
            batch: list[tuple[int, ...]] = []
            rows = longest_context = longest_continuation = 0
            for context in order:
                size = len(groups[context])
                continuation = max(len(encoded[i][1]) for i in groups[context])
                # Padded, every row runs as far as the longest context plus the longest
                # continuation of the batch: that must stay within the model's positions.
                too_long = max(longest_context, len(context)) + max(longest_continuation, continuation) - 1 > window
                if batch and (rows + size > batch_size or too_long):
                    _score_batch(model, batch, groups, encoded, scores)
                    bar.update(rows)
                    batch, rows, longest_context, longest_continuation = [], 0, 0, 0
                batch.append(context)
                rows += size
                longest_context = max(longest_context, len(context))
                longest_continuation = max(longest_continuation, continuation)
            if batch:
                _score_batch(model, batch, groups, encoded, scores)
                bar.update(rows)
    finally:
        model.train(was_training)
    return scores  # type: ignore[return-value]


def _score_batch(model, contexts: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[int]],
                 encoded: list[tuple[tuple[int, ...], list[int]]], scores: list[Score | None]) -> None:
    device = model.tok_emb.weight.device
    requests = [i for context in contexts for i in groups[context]]
    continuations = [encoded[i][1] for i in requests]
    context_lengths = torch.tensor([len(c) for c in contexts])
    longest_context, longest_continuation = int(context_lengths.max()), max(len(c) for c in continuations)

    # 1. The contexts, right-padded, into the cache; the logits at each context's last token
    #    predict the first continuation token.
    cache = model.new_kv_cache(len(contexts), longest_context + longest_continuation - 1)
    padded = torch.zeros(len(contexts), longest_context, dtype=torch.long)
    for row, context in enumerate(contexts):
        padded[row, :len(context)] = torch.tensor(context)
    hidden = model.features(padded.to(device), kv_cache=cache)
    last = model.lm_head(hidden[torch.arange(len(contexts), device=device), (context_lengths - 1).to(device)]).float()
    # 2. One cache row per continuation; the cache then continues at each context's own end
    #    (pad keys past it are overwritten or masked).
    owner = [row for row, context in enumerate(contexts) for _ in groups[context]]
    cache.lengths = context_lengths.clone()
    cache = cache.select(owner)
    first = F.log_softmax(last[torch.tensor(owner, device=device)], dim=-1)  # (R, V)
    rest = None
    if longest_continuation > 1:
        inputs = torch.zeros(len(requests), longest_continuation - 1, dtype=torch.long)
        for row, ids in enumerate(continuations):
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        rest = F.log_softmax(model(inputs.to(device), kv_cache=cache), dim=-1)  # (R, C-1, V)
    for row, (index, ids) in enumerate(zip(requests, continuations)):
        targets = torch.tensor(ids, device=device)
        predicted = first[row:row + 1] if rest is None else torch.cat([first[row:row + 1], rest[row, :len(ids) - 1]])
        scores[index] = Score(loglikelihood=float(predicted.gather(1, targets[:, None]).sum()),
                              is_greedy=bool((predicted.argmax(-1) == targets).all()), tokens=len(ids))
