"""One public function per `scratchlm tokenizer` verb (the CLI only parses and prints)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory
from scratchlm.tokenizer.files import TOKENIZER_FILES
from scratchlm.tokenizer.pretokenize import check_readable_inputs, holdout_start, pattern_regex
from scratchlm.tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from scratchlm.tokenizer.train import check_vocab_size, train_bpe

# Compression is measured on the last 1% of the input (at most 1 MB, at most half the last
# file), cut at a safe edge of the last file; training never sees those bytes.
HOLDOUT_FRACTION = 0.01
HOLDOUT_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    vocab_size: int
    num_merges: int
    special_tokens: dict[str, int]
    input_bytes: int
    seconds: float
    heldout_bytes: int
    heldout_tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def bytes_per_token(self) -> float:
        return self.heldout_bytes / max(self.heldout_tokens, 1)

    def describe(self) -> str:
        compression = (
            f"compression on {self.heldout_bytes:,} held-out bytes (tail of the last input): "
            f"{self.bytes_per_token:.3f} bytes/token"
            if self.heldout_bytes
            else "compression: input too small to hold out a sample"
        )
        return (
            f"trained {self.vocab_size} tokens ({self.num_merges} merges, special tokens "
            f"{self.special_tokens}) in {self.seconds:.2f} s, {self.mb_per_s:.2f} MB/s of input\n"
            f"{compression}\nsaved to {self.out_dir}"
        )


def train_tokenizer(
    inputs: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    special_tokens: Iterable[str] | None = None,
    pattern: str = "gpt2",
    workers: int | None = None,
    progress: bool = False,
) -> TrainSummary:
    """Train on `inputs` (minus a held-out tail), save to `out_dir` atomically, and summarise."""
    files = check_readable_inputs(inputs)
    specials = check_vocab_size(vocab_size, [ENDOFTEXT] if special_tokens is None else special_tokens)
    pattern_regex(pattern)  # an unknown name fails before any work
    total = sum(f.stat().st_size for f in files)
    last_size = files[-1].stat().st_size
    holdout = min(int(total * HOLDOUT_FRACTION), HOLDOUT_MAX_BYTES, last_size // 2)
    heldout_from = holdout_start(files[-1], holdout, specials, pattern) if holdout else last_size

    started = time.perf_counter()
    num_merges = vocab_size - 256 - len(specials)
    with _progress_bars(progress, total - (last_size - heldout_from), num_merges) as (on_bytes, on_merge):
        vocab, merges = train_bpe(files, vocab_size, specials, pattern=pattern, workers=workers,
                                  holdout_bytes=holdout, on_bytes=on_bytes, on_merge=on_merge)
    tokenizer = Tokenizer(vocab, merges, specials, pattern=pattern)
    seconds = time.perf_counter() - started

    heldout_text = _read_tail(files[-1], heldout_from)
    heldout_ids = tokenizer.encode(heldout_text)
    with atomic_directory(out_dir) as tmp:
        tokenizer.save(tmp)
    return TrainSummary(
        out_dir=str(out_dir),
        vocab_size=tokenizer.vocab_size,
        num_merges=len(tokenizer.merges),
        special_tokens=tokenizer.special_tokens,
        input_bytes=total,
        seconds=seconds,
        heldout_bytes=len(heldout_text.encode("utf-8", errors="surrogateescape")),
        heldout_tokens=len(heldout_ids),
    )


def _read_tail(path: Path, start: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", errors="surrogateescape")


@contextlib.contextmanager
def _progress_bars(enabled: bool, total_bytes: int, total_merges: int):
    """tqdm bars on stderr, one per phase (bytes pre-tokenized, then merges learned);
    yields the (on_bytes, on_merge) callbacks for train_bpe, or Nones when disabled."""
    if not enabled:
        yield None, None
        return
    from tqdm import tqdm

    bars = [tqdm(total=total_bytes, unit="B", unit_scale=True, desc="pre-tokenize", file=sys.stderr)]

    def on_merge() -> None:
        if len(bars) == 1:  # first merge: counting is done
            bars[0].close()
            bars.append(tqdm(total=total_merges, unit="merge", desc="merge", file=sys.stderr))
        bars[-1].update(1)

    try:
        yield bars[0].update, on_merge
    finally:
        for bar in bars:
            bar.close()


def encode_text(tokenizer_dir: str | os.PathLike, source: TextIO) -> Iterator[int]:
    """Ids of everything read from `source`, streamed with bounded memory."""
    return Tokenizer.load(tokenizer_dir).encode_iterable(source)


def decode_ids(tokenizer_dir: str | os.PathLike, ids_text: Iterable[str]) -> str:
    """Text of whitespace-separated ids read from `ids_text`."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    ids: list[int] = []
    for lineno, line in enumerate(ids_text, start=1):
        for word in line.split():
            try:
                ids.append(int(word))
            except ValueError:
                raise ScratchLMError(f"line {lineno}: {word!r} is not a token id") from None
    return tokenizer.decode(ids)


def tokenizer_info(tokenizer_dir: str | os.PathLike) -> dict:
    """A summary of a saved tokenizer: sizes, pattern, special tokens, fingerprint, files."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    lengths = tokenizer.token_byte_lengths()
    longest = max(range(tokenizer.vocab_size), key=lambda i: lengths[i])
    return {
        "directory": str(tokenizer_dir),
        "files": list(TOKENIZER_FILES),
        "vocab_size": tokenizer.vocab_size,
        "merges": len(tokenizer.merges),
        "pattern": tokenizer.pattern,
        "special_tokens": tokenizer.special_tokens,
        "eot_id": tokenizer.eot_id,
        "mean_token_bytes": round(float(lengths[lengths > 0].mean()), 3),
        "longest_token": tokenizer.decode([longest]),
        "fingerprint": tokenizer.fingerprint(),
    }
