"""Byte-level BPE training.

Start from the 256 byte values; repeatedly merge the most frequent adjacent pair of tokens
inside the pre-tokens ("words") and give the result a new id. Ties go to the
lexicographically greatest pair of byte strings, so training is deterministic.

The loop is incremental: words are deduplicated with their counts, an index maps each pair to
the words that contain it, and a max-heap with lazy invalidation yields the best pair. A merge
only touches the words holding the merged pair, so late merges (rare pairs) are cheap.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Callable, Iterable

from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer.pretokenize import count_pretokens, pattern_regex

# heapq is a min-heap; to pop the greatest pair of byte strings first on equal counts, each
# token gets a key that sorts in the opposite order: every byte b becomes chr(256 - b) and a
# terminator chr(257), larger than any byte, makes a string sort after its own extensions.
_INVERT = {b: 256 - b for b in range(256)}
_END = chr(257)
_LOW = (1 << 32) - 1


def _descending_key(token: bytes) -> str:
    return token.decode("latin-1").translate(_INVERT) + _END


def bpe_merges(
    word_counts: dict[bytes, int],
    num_new_tokens: int,
    on_merge: Callable[[], None] | None = None,
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn merges from pre-token counts until `num_new_tokens` tokens beyond the bytes exist.

    Returns (token_bytes, merges): token_bytes[id] for ids 0..255 (the bytes) and each new token,
    and the merges as (left id, right id) in the order learned. Stops early when no pair is left.
    Should a merge produce bytes that already have an id (x+yz after xy+z), that id is reused and
    no new one is allocated, as Hugging Face's trainer does (so merges may outnumber new tokens).
    """
    token_bytes = [bytes([b]) for b in range(256)]
    token_id = {t: i for i, t in enumerate(token_bytes)}
    keys = [_descending_key(t) for t in token_bytes]
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())

    # A pair (x, y) is the int x << 32 | y: ints hash far faster than tuples, and this loop is
    # all dict and set updates.
    pair_counts: dict[int, int] = defaultdict(int)
    pair_words: dict[int, set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        count = counts[wi]
        for x, y in zip(word, word[1:]):
            pair = x << 32 | y
            pair_counts[pair] += count
            pair_words[pair].add(wi)

    # Entries are (-count, key(left), key(right), left, right). Invariant: each live pair has an
    # entry whose count is >= its true count (a pair that grows gets a fresh entry; one that
    # shrinks gets none). A popped entry is the answer when its count is exact; one that
    # overstates is pushed back corrected; one that understates is a stale duplicate: dropped.
    heap = [(-c, keys[p >> 32], keys[p & _LOW], p >> 32, p & _LOW) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(token_bytes) < 256 + num_new_tokens and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        ab = a << 32 | b
        actual = pair_counts.get(ab, 0)
        if actual != -neg:
            if 0 < actual < -neg:
                heapq.heappush(heap, (-actual, keys[a], keys[b], a, b))
            continue

        merged = token_bytes[a] + token_bytes[b]
        new = token_id.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            token_id[merged] = new
            keys.append(_descending_key(merged))
        merges.append((a, b))

        # Merge in place, left to right. Only the neighbours of an occurrence change: (x, a)
        # and (b, y) lose the word's count, (x, new) and (new, y) gain it. For back-to-back
        # occurrences the second one's left step undoes the (new, a) the first one added.
        grown: set[int] = set()
        for wi in pair_words.pop(ab):
            word = words[wi]
            occurrences = word.count(a)  # 0 for stale index entries: pairs are never unindexed
            count = counts[wi]
            i = 0
            for _ in range(occurrences):
                try:
                    i = word.index(a, i)
                except ValueError:  # a == b: one merge used up two of the a's
                    break
                if i + 1 < len(word) and word[i + 1] == b:
                    if i:
                        left = word[i - 1]
                        pair_counts[left << 32 | a] -= count
                        pair = left << 32 | new
                        pair_counts[pair] += count
                        pair_words[pair].add(wi)
                        grown.add(pair)
                    if i + 2 < len(word):
                        right = word[i + 2]
                        pair_counts[b << 32 | right] -= count
                        pair = new << 32 | right
                        pair_counts[pair] += count
                        pair_words[pair].add(wi)
                        grown.add(pair)
                    word[i] = new
                    del word[i + 1]
                i += 1
        del pair_counts[ab]
        for pair in grown:
            c = pair_counts[pair]
            if c > 0:
                x, y = pair >> 32, pair & _LOW
                heapq.heappush(heap, (-c, keys[x], keys[y], x, y))
        if on_merge:
            on_merge()
    return token_bytes, merges


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Iterable[str] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    workers: int | None = None,
    *,
    on_chars: Callable[[int], None] | None = None,
    on_merge: Callable[[], None] | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on documents (strings; see `Tokenizer.train` for files).

    Returns (vocab, merges): vocab maps id -> bytes with the 256 bytes at ids 0..255, the merged
    tokens after them in the order learned, then the special tokens (as UTF-8); merges lists the
    (left, right) byte pairs in merge order. `vocab_size` counts the special tokens. A corpus too
    small to fill the vocabulary yields a smaller one. No merge spans two documents, and the
    text of a special token inside a document is ordinary text. `on_chars`/`on_merge` report
    progress.
    """
    if isinstance(texts, str):
        raise ScratchLMError("train_bpe takes an iterable of documents, not one string "
                             "(wrap it in a list)")
    specials = check_vocab_size(vocab_size, special_tokens)
    pattern_regex(pattern)  # an unknown name fails before any work
    word_counts = count_pretokens(texts, pattern, workers, on_progress=on_chars)
    if not word_counts:
        raise NoTextError("no text to train on")
    token_bytes, merge_ids = bpe_merges(word_counts, vocab_size - 256 - len(specials), on_merge)
    vocab = dict(enumerate(token_bytes))
    for token in specials:
        vocab[len(vocab)] = token.encode("utf-8")
    merges = [(token_bytes[a], token_bytes[b]) for a, b in merge_ids]
    return vocab, merges


class NoTextError(ScratchLMError):
    """The documents held no text at all (the caller knows why: empty input, binary data...)."""


def check_vocab_size(vocab_size: int, special_tokens: Iterable[str]) -> list[str]:
    """The special tokens (deduplicated, in order), after checking that the vocab has room for
    the 256 bytes and all of them."""
    if isinstance(special_tokens, str):  # a bare string would otherwise become its characters
        special_tokens = [special_tokens]
    specials: list[str] = []
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise ScratchLMError(f"special tokens must be non-empty strings, got {token!r}")
        if token not in specials:
            specials.append(token)
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ScratchLMError(
            f"vocab size {vocab_size} is below 256 bytes + {len(specials)} special tokens = {minimum}"
        )
    return specials
