"""Pre-tokenization: split text into the pieces BPE merges inside of, and count them.

BPE never merges across a pre-token boundary, so the regex decides what a token can span
(a word with its leading space, a run of digits, ...). Special tokens are cut out before the
regex runs, so nothing is ever merged across them either.

Training reads files in chunks whose edges are "safe": cutting the text there yields the same
pre-tokens as not cutting it. That lets chunks be counted in parallel processes and lets a
multi-GB file stream through bounded memory while giving the same counts as one big pass.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import regex

from scratchlm.errors import ScratchLMError

# The GPT-2 pattern as tiktoken writes it (possessive quantifiers: same splits as the original
# `'s|'t|...|\s+(?!\S)|\s+`, faster), and the GPT-4 (cl100k) one. Keeping tiktoken's exact strings
# means our reference pre-tokenizer and the tiktoken fast path split text identically.
PATTERNS: dict[str, str] = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}

# Safe chunk edges, per pattern, next to a newline followed by a printable ASCII character Y.
# GPT-2: a whitespace run W before Y splits as W[:-1], "\n", Y (the last newline is alone), so
#   cutting just before that newline leaves every pre-token unchanged (W[:-1] then ends the text
#   and `\s++$` takes it whole, as `\s+(?!\S)` did).
# GPT-4: a run ending in a newline is one pre-token (`\s*[\r\n]`, or trailing a punctuation run),
#   and Y never absorbs a newline, so cutting just after the newline is safe.
# This also covers CRLF text and blank lines between paragraphs.
_SAFE_EDGES = {"gpt2": r"(?=\n[\x21-\x7e])", "gpt4": r"(?<=\n)(?=[\x21-\x7e])"}
_SAFE_EDGE_TEXT = {name: re.compile(edge) for name, edge in _SAFE_EDGES.items()}
_SAFE_EDGE_BYTES = {name: re.compile(edge.encode()) for name, edge in _SAFE_EDGES.items()}

# Chunks aim at a quarter of the input per worker (so uneven chunks still balance), within
# [MIN_CHUNK_BYTES, DEFAULT_CHUNK_BYTES]: small inputs stay one chunk, counted in-process.
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 256 << 10
# Text with no safe edge for this long (one giant line) is cut at a newline or space anyway:
# the pre-tokens at that one cut may differ from an uncut pass; memory stays bounded.
MAX_UNSAFE_BYTES = 64 << 20


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


# --------------------------------------------------------------------------- chunked files
@dataclass(frozen=True)
class Chunk:
    path: str
    start: int
    end: int


def _next_edge(f, offset: int, file_size: int, special_bytes: list[bytes], pattern: str) -> int:
    """First safe edge at or after `offset`: the start of a special token, else a safe newline."""
    f.seek(offset)
    data = b""
    searched = 0  # data[:searched] holds no edge; re-scan only a small overlap of it
    overlap = max((len(s) for s in special_bytes), default=0) + 2
    while True:
        block = f.read(1 << 16)
        data += block
        start = max(0, searched - overlap)
        # Either kind of edge is fine; take the earliest so chunks stay near their target size.
        hits = [i for i in (data.find(s, start) for s in special_bytes) if i >= 0]
        m = _SAFE_EDGE_BYTES[pattern].search(data, start)
        if m:
            hits.append(m.start())
        if hits:
            return offset + min(hits)
        if not block or offset + len(data) >= file_size:
            return file_size
        if len(data) >= MAX_UNSAFE_BYTES:
            cut = max(data.rfind(b"\n"), data.rfind(b" "))
            return offset + (cut + 1 if cut >= 0 else len(data))
        searched = len(data)


def chunk_file(
    path: str | os.PathLike, special_tokens: Iterable[str], pattern: str, chunk_bytes: int, end: int | None = None
) -> list[Chunk]:
    """Split a file (up to byte `end`) into chunks of about `chunk_bytes` whose edges are safe cuts."""
    path = str(path)
    size = os.path.getsize(path) if end is None else end
    special_bytes = [t.encode("utf-8") for t in special_tokens]
    chunks: list[Chunk] = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            end = size if start + chunk_bytes >= size else _next_edge(f, start + chunk_bytes, size, special_bytes, pattern)
            chunks.append(Chunk(path, start, end))
            start = end
    return chunks


def holdout_start(path: str | os.PathLike, holdout_bytes: int, special_tokens: Iterable[str], pattern: str) -> int:
    """Where a held-out tail of about `holdout_bytes` starts in a file: the first safe edge at or
    after size - holdout_bytes (or exactly there when the tail has no safe edge)."""
    size = os.path.getsize(path)
    target = max(0, size - holdout_bytes)
    with open(path, "rb") as f:
        start = _next_edge(f, target, size, [t.encode("utf-8") for t in special_tokens], pattern)
    return start if start < size else target


def count_chunk(chunk: Chunk, special_tokens: tuple[str, ...], pattern: str) -> Counter[bytes]:
    """Count the pre-tokens of one chunk of a file (runs inside a worker process)."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    # surrogateescape keeps invalid UTF-8 bytes as lone surrogates through the regex and turns
    # them back into the very same bytes below: a corpus with bad bytes is handled byte-wise.
    text = data.decode("utf-8", errors="surrogateescape")
    del data
    pretokenizer = regex.compile(pattern_regex(pattern))
    specials = special_token_regex(special_tokens)
    counts: Counter[str] = Counter()
    for piece, is_special in split_on_special_tokens(text, specials):
        if not is_special:
            counts.update(pretokenizer.findall(piece))
    return Counter({k.encode("utf-8", errors="surrogateescape"): v for k, v in counts.items()})


def _count_chunk_star(args: tuple[Chunk, tuple[str, ...], str]) -> tuple[int, Counter[bytes]]:
    chunk = args[0]
    return chunk.end - chunk.start, count_chunk(*args)


def count_pretokens(
    paths: Iterable[str | os.PathLike],
    special_tokens: Iterable[str],
    pattern: str = "gpt2",
    workers: int | None = None,
    chunk_bytes: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    last_file_end: int | None = None,
) -> Counter[bytes]:
    """Pre-token counts over all files, in parallel processes over safe chunks.

    Each worker reads its own byte range, so the parent never holds a whole file and the
    task queue holds only (path, start, end) triples. `on_progress(nbytes)` is called as
    chunks finish. `last_file_end` stops reading the last file there (a held-out tail).
    """
    specials = tuple(special_tokens)
    pattern_regex(pattern)  # fail early on an unknown name
    paths = list(paths)
    workers = workers or os.cpu_count() or 1
    if not chunk_bytes:
        total = sum(os.path.getsize(p) for p in paths)
        chunk_bytes = min(DEFAULT_CHUNK_BYTES, max(total // (4 * workers), MIN_CHUNK_BYTES))
    chunks = [
        c
        for n, p in enumerate(paths)
        for c in chunk_file(p, specials, pattern, chunk_bytes, last_file_end if n == len(paths) - 1 else None)
    ]
    tasks = [(c, specials, pattern) for c in chunks]
    workers = min(workers, len(tasks))
    counts: Counter[bytes] = Counter()
    # One chunk (or one worker) is counted in this process: a pool costs more than it saves.
    with multiprocessing.get_context().Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap_unordered(_count_chunk_star, tasks) if pool else map(_count_chunk_star, tasks)
        for nbytes, chunk_counts in results:
            counts.update(chunk_counts)
            if on_progress:
                on_progress(nbytes)
    return counts


def check_readable_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Resolve input files, raising a one-line error for missing, unreadable or empty ones."""
    files = [Path(p) for p in paths]
    if not files:
        raise ScratchLMError("no input files given")
    for path in files:
        if not path.exists():
            raise ScratchLMError(f"input file not found: {path}")
        if not path.is_file():
            raise ScratchLMError(f"input is not a file: {path}")
        if not os.access(path, os.R_OK):
            raise ScratchLMError(f"input file is not readable: {path}")
        if path.stat().st_size == 0:
            raise ScratchLMError(f"input file is empty: {path}")
    return files
