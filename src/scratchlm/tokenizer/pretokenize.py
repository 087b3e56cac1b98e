"""Pre-tokenization: split text into the pieces BPE merges inside of, and count them.

BPE never merges across a pre-token boundary, so the regex decides what a token can span
(a word with its leading space, a run of digits, ...). Special tokens, where the caller allows
them, are cut out before the regex runs, so nothing is ever merged across them either.

Training counts the pre-tokens of documents (from `scratchlm.sources`, the reader every
command shares) in batches spread over worker processes. Encoding a long stream cuts it only
at "safe" edges, where cutting yields the same pre-tokens as not cutting (`find_safe_edge`).
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from collections import Counter
from typing import Callable, Iterable, Iterator

import regex

from scratchlm.errors import ScratchLMError
from scratchlm.workers import process_pool, result_of

# The GPT-2 pattern as tiktoken writes it (possessive quantifiers: same splits as the original
# `'s|'t|...|\s+(?!\S)|\s+`, faster), and the GPT-4 (cl100k) one. Keeping tiktoken's exact strings
# means our reference pre-tokenizer and the tiktoken fast path split text identically.
PATTERNS: dict[str, str] = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}

# Safe edges, per pattern, next to a newline followed by a printable ASCII character Y.
# GPT-2: a whitespace run W before Y splits as W[:-1], "\n", Y (the last newline is alone), so
#   cutting just before that newline leaves every pre-token unchanged (W[:-1] then ends the text
#   and `\s++$` takes it whole, as `\s+(?!\S)` did).
# GPT-4: a run ending in a newline is one pre-token (`\s*[\r\n]`, or trailing a punctuation run),
#   and Y never absorbs a newline, so cutting just after the newline is safe.
# This also covers CRLF text and blank lines between paragraphs.
_SAFE_EDGES = {"gpt2": r"(?=\n[\x21-\x7e])", "gpt4": r"(?<=\n)(?=[\x21-\x7e])"}
_SAFE_EDGE_TEXT = {name: re.compile(edge) for name, edge in _SAFE_EDGES.items()}

# Documents are counted in batches of about this many characters per worker task: small enough
# that a few MB spread evenly over the workers (1 MB batches left one of two workers idle for a
# third of a 2.9 MB corpus), large enough that returning each batch's counts stays cheap.
BATCH_CHARS = 1 << 19


def pattern_regex(pattern: str) -> str:
    """The regex source for a pattern name ("gpt2", "gpt4")."""
    try:
        return PATTERNS[pattern]
    except KeyError:
        raise ScratchLMError(
            f"unknown pre-tokenization pattern {pattern!r} (choose from {', '.join(PATTERNS)})"
        ) from None


def special_token_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex matching any special token, longest first so that overlapping ones
    (`<|endoftext|>` and `<|endoftext|><|endoftext|>`) resolve to the longer."""
    tokens = sorted(set(special_tokens), key=lambda t: (-len(t), t))
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in tokens))


def split_on_special_tokens(text: str, specials: regex.Pattern | None) -> Iterator[tuple[str, bool]]:
    """Yield (piece, is_special) in order; empty ordinary pieces are skipped."""
    if specials is None:
        if text:
            yield text, False
        return
    start = 0
    for match in specials.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False


def find_safe_edge(text: str, pattern: str) -> int:
    """Index of the last safe chunk edge in `text` (> 0), or -1 if there is none."""
    edge = _SAFE_EDGE_TEXT[pattern]
    # Every edge sits next to a newline: walk back over newlines (fast) and test each one.
    newline = text.rfind("\n")
    while newline >= 0:
        m = edge.search(text, newline, newline + 2)
        if m and m.start() > 0:
            return m.start()
        newline = text.rfind("\n", 0, newline)
    return -1


# --------------------------------------------------------------------------- counting
def utf8_bytes(text: str) -> bytes:
    """UTF-8 of `text`; lone surrogates (not text, but Python strings can hold them) become
    U+FFFD, as tiktoken does."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def count_batch(texts: list[str], pattern: str) -> Counter[bytes]:
    """Pre-token counts of a batch of documents (runs inside a worker process).

    Documents are ordinary text: a special token's string inside one is counted like any
    other text, never as a boundary (special tokens come from the code that assembles
    sequences, never from data)."""
    pretokenizer = regex.compile(pattern_regex(pattern))
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pretokenizer.findall(text))
    return Counter({utf8_bytes(k): v for k, v in counts.items()})


def _batches(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_pretokens(
    texts: Iterable[str],
    pattern: str = "gpt2",
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch_chars: int = BATCH_CHARS,
) -> Counter[bytes]:
    """Pre-token counts over a stream of documents, batches counted in parallel processes.

    At most two batches per worker are in flight, so a corpus of any size streams through
    bounded memory. Input that fits in one batch is counted in this process (a pool costs
    more than it saves). `on_progress(characters)` is called as batches finish.
    """
    pattern_regex(pattern)  # fail early on an unknown name
    workers = workers or os.cpu_count() or 1
    batches = _batches(texts, batch_chars)
    head = list(itertools.islice(batches, 2))
    counts: Counter[bytes] = Counter()

    def add(batch_counts: Counter[bytes], chars: int) -> None:
        counts.update(batch_counts)
        if on_progress:
            on_progress(chars)

    if len(head) < 2 or workers == 1:
        for batch in itertools.chain(head, batches):
            add(count_batch(batch, pattern), sum(map(len, batch)))
        return counts
    with process_pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for batch in itertools.chain(head, batches):
            pending.append((pool.submit(count_batch, batch, pattern), sum(map(len, batch))))
            if len(pending) >= 2 * workers:
                future, chars = pending.popleft()
                add(result_of(future, "counting pre-tokens"), chars)
        while pending:
            future, chars = pending.popleft()
            add(result_of(future, "counting pre-tokens"), chars)
    return counts
