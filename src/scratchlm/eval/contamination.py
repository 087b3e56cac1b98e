"""Benchmark contamination: which items share a 13-gram of tokens with the training data.

The check GPT-3's paper ran on its own training set (Brown et al. 2020, appendix C), here
for any data directory: every 13-token window of an item's text (its own prompt and gold
answer, without few-shot examples) is hashed, every 13-token window of the training shards
is hashed with the same polynomial hash, and an item is contaminated when any of its
windows occurs in the training data. Items shorter than 13 tokens cannot match and count as
clean. The shards are streamed in chunks (memory stays flat however large the data) and
hashed with numpy: 13 multiply-adds per token, then a binary search among the items' hashes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from scratchlm.errors import ScratchLMError

NGRAM = 13
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so the hash mixes every token (mod 2^64)
_CHUNK_TOKENS = 1 << 23


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """Hash of every n-token window of `tokens` (len(tokens) - n + 1 of them; none if shorter)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        for offset in range(n):
            hashes = hashes * _MULTIPLIER + tokens[offset:offset + count] + np.uint64(1)
    return hashes


def contaminated_items(item_tokens: dict[str, list[list[int]]], data_dir: str | Path, *, split: str = "train",
                       progress: bool = True) -> dict[str, list[bool]]:
    """For each task, which of its items (as token lists) share a 13-gram with `split` of the
    data directory `data_dir` (tokenized with the same tokenizer: the caller checks)."""
    from tqdm import tqdm

    from scratchlm.data.shards import open_shard, read_manifest, split_info

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    shards = split_info(manifest, split, data_dir)["shards"]
    per_item = {task: [ngram_hashes(np.array(tokens)) for tokens in items] for task, items in item_tokens.items()}
    wanted = np.unique(np.concatenate([h for items in per_item.values() for h in items] or [np.empty(0, np.uint64)]))
    found = np.zeros(len(wanted), dtype=bool)
    total = sum(shard["tokens"] for shard in shards)
    with tqdm(total=total, desc="contamination", unit="tok", unit_scale=True, file=sys.stderr,
              disable=not progress) as bar:
        for shard in shards:
            tokens, _ = open_shard(data_dir, shard, np.dtype(manifest["dtype"]))
            # Chunks overlap by NGRAM - 1 tokens so no window is missed at a chunk boundary.
            for start in range(0, max(len(tokens) - NGRAM + 1, 0), _CHUNK_TOKENS):
                hashes = ngram_hashes(tokens[start:start + _CHUNK_TOKENS + NGRAM - 1])
                if len(wanted):
                    position = np.searchsorted(wanted, hashes).clip(max=len(wanted) - 1)
                    found[position[wanted[position] == hashes]] = True
                bar.update(min(_CHUNK_TOKENS, len(tokens) - start))
    seen = set(wanted[found].tolist())
    return {task: [any(h in seen for h in hashes.tolist()) for hashes in items] for task, items in per_item.items()}


def check_tokenizer_matches(tokenizer, data_dir: str | Path) -> None:
    from scratchlm.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    if manifest["tokenizer_hash"] != tokenizer.fingerprint():
        raise ScratchLMError(f"--contamination {data_dir}: its shards were tokenized with another tokenizer than "
                             f"the model's, so token 13-grams cannot be compared (give the model's training data)")
