"""One public function per `scratchlm tokenizer` verb (the CLI only parses and prints)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, check_output_directory
from scratchlm.sources import (DOC_MODES, Document, SourceStats, check_inputs, hash_fraction,
                               iter_documents_from, looks_binary, non_text_fraction)
from scratchlm.tokenizer.files import TOKENIZER_FILES, TOKENIZER_JSON
from scratchlm.tokenizer.pretokenize import pattern_regex
from scratchlm.tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from scratchlm.tokenizer.train import NoTextError, check_vocab_size, train_bpe

# Compression is measured on held-out documents: those whose hash (a coin independent of the
# data stage's validation split) falls below HOLDOUT_FRACTION, up to HOLDOUT_MAX_BYTES.
# Training never sees them.
HOLDOUT_FRACTION = 0.01
HOLDOUT_MAX_BYTES = 1 << 20
_HOLDOUT_SALT = b"scratchlm-tok-ho"


@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    vocab_size: int
    num_merges: int
    special_tokens: dict[str, int]
    documents: int  # documents trained on
    input_bytes: int  # UTF-8 bytes trained on
    seconds: float
    heldout_documents: int
    heldout_bytes: int  # UTF-8 bytes of the held-out documents
    heldout_tokens: int  # their token count (ordinary text: no special tokens)
    binary_documents: int = 0  # skipped: they look like binary data, not text
    problems: tuple[str, ...] = ()  # invalid UTF-8 and malformed records met while reading
    sample_mb: float | None = None  # reading stopped at this much (--sample-mb), or None: all read
    requested_vocab_size: int | None = None  # when the corpus could not fill the vocabulary

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def bytes_per_token(self) -> float | None:
        return self.heldout_bytes / self.heldout_tokens if self.heldout_tokens else None

    def describe(self) -> str:
        if self.heldout_tokens:
            compression = (f"compression on {self.heldout_documents} held-out document(s), "
                           f"{self.heldout_bytes:,} bytes: {self.bytes_per_token:.3f} bytes/token")
        else:
            compression = (f"compression: no held-out document (one in {round(1 / HOLDOUT_FRACTION)} "
                           f"is held out; this corpus has {self.documents})")
        read = (f"a sample of {self.input_bytes / 1e6:,.2f} MB (the first documents of each input, "
                f"round-robin, up to --sample-mb {self.sample_mb:g})" if self.sample_mb is not None
                else f"{self.input_bytes / 1e6:,.2f} MB")
        lines = [
            f"trained {self.vocab_size} tokens ({self.num_merges} merges, special tokens "
            f"{self.special_tokens}) on {self.documents:,} document(s), {read}, in {self.seconds:.2f} s "
            f"({self.mb_per_s:.2f} MB/s)",
            compression,
        ]
        if self.requested_vocab_size and self.requested_vocab_size > self.vocab_size:
            lines.append(f"note: {self.vocab_size} tokens, not the {self.requested_vocab_size} asked for: the "
                         f"text has no more pairs of tokens to merge (a larger corpus fills a larger vocabulary)")
        if self.binary_documents:
            lines.append(f"skipped {self.binary_documents} document(s) that look like binary data, not text")
        lines += list(self.problems)
        lines.append(f"saved to {self.out_dir}")
        return "\n".join(lines)


def train_tokenizer(
    inputs: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    special_tokens: Iterable[str] | None = None,
    pattern: str = "gpt2",
    workers: int | None = None,
    progress: bool = False,
    *,
    sample_mb: float | None = None,
    text_field: str = "text",
    doc_mode: str = "auto",
    overwrite: bool = False,
    exclude: Callable[[Document], bool] | None = None,
) -> TrainSummary:
    """`scratchlm tokenizer train`: read `inputs` (files, directories, globs, `stdlib`) as
    documents, skip binary ones, hold out a sample for the compression figure, train on the
    rest, save to `out_dir` (atomically; a non-empty directory needs `overwrite`), summarise.

    `sample_mb` trains on a sample of about that many megabytes, taken round-robin across the
    inputs so that every input is represented. `exclude(document)` leaves documents out (the
    run leaves out what the data stage will hold out for validation).
    """
    specs = [str(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    check_inputs(specs)
    specials = check_vocab_size(vocab_size, [ENDOFTEXT] if special_tokens is None else special_tokens)
    pattern_regex(pattern)  # an unknown name fails before any work
    if sample_mb is not None and not sample_mb > 0:
        raise ScratchLMError(f"--sample-mb must be > 0, got {sample_mb}")
    if workers is not None and workers < 1:
        raise ScratchLMError(f"--workers must be at least 1, got {workers}")
    if doc_mode not in DOC_MODES:
        raise ScratchLMError(f"doc_mode must be one of {', '.join(DOC_MODES)}, got {doc_mode!r}")
    out_dir = check_output_directory(out_dir, overwrite, "tokenizer")

    stats = [SourceStats(input=spec) for spec in specs]
    streams = [iter_documents_from(spec, stats=spec_stats, text_field=text_field, doc_mode=doc_mode)
               for spec, spec_stats in zip(specs, stats)]
    documents = round_robin(streams) if sample_mb is not None else itertools.chain.from_iterable(streams)
    texts = (doc.text for doc in documents if exclude is None or not exclude(doc))
    split = _HoldOut(int(sample_mb * 1e6) if sample_mb is not None else None)

    started = time.perf_counter()
    with _progress_bars(progress, vocab_size - 256 - len(specials)) as (on_chars, on_merge):
        try:
            vocab, merges = train_bpe(split.training_texts(texts), vocab_size, specials, pattern=pattern,
                                      workers=workers, on_chars=on_chars, on_merge=on_merge)
        except NoTextError:
            raise ScratchLMError(split.why_no_text(", ".join(specs), stats)) from None
    tokenizer = Tokenizer(vocab, merges, specials, pattern=pattern)
    seconds = time.perf_counter() - started

    heldout_tokens = sum(len(tokenizer.encode_ordinary(text)) for text in split.heldout)
    with atomic_directory(out_dir, overwrite, "tokenizer", commit_last=(TOKENIZER_JSON,)) as tmp:
        tokenizer.save(tmp)
    return TrainSummary(
        out_dir=str(out_dir),
        vocab_size=tokenizer.vocab_size,
        num_merges=len(tokenizer.merges),
        special_tokens=tokenizer.special_tokens,
        documents=split.documents,
        input_bytes=split.bytes,
        seconds=seconds,
        heldout_documents=len(split.heldout),
        heldout_bytes=split.heldout_bytes,
        heldout_tokens=heldout_tokens,
        binary_documents=split.binary,
        problems=tuple(line for s in stats for line in s.problems()),
        sample_mb=sample_mb,
        requested_vocab_size=vocab_size,
    )


class _HoldOut:
    """Routes documents: binary ones skipped, a hashed sample held out, the rest to training."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.heldout: list[str] = []
        self.heldout_bytes = 0
        self.documents = self.bytes = self.binary = 0
        self.worst_non_text = 0.0

    def training_texts(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            if looks_binary(text):
                self.binary += 1
                self.worst_non_text = max(self.worst_non_text, non_text_fraction(text))
                continue
            size = len(text.encode("utf-8"))
            if (self.heldout_bytes < HOLDOUT_MAX_BYTES
                    and hash_fraction(text, _HOLDOUT_SALT) < HOLDOUT_FRACTION):
                self.heldout.append(text)
                self.heldout_bytes += size
                continue
            self.documents += 1
            self.bytes += size
            yield text
            if self.max_bytes is not None and self.bytes >= self.max_bytes:
                return

    def why_no_text(self, what: str, stats: list[SourceStats]) -> str:
        problems = "; ".join(line for s in stats for line in s.problems())
        if self.binary:
            problems = "; ".join(filter(None, [problems, (
                f"{self.binary} document(s) look like binary data ({self.worst_non_text:.0%} of their "
                f"characters are invalid UTF-8 or control characters)")]))
        if problems:
            return f"no text to train on in {what}: {problems}"
        return f"no text to train on in {what} (empty, or only held-out documents)"


def round_robin(streams: list[Iterator]) -> Iterator:
    """One item from each stream in turn, until all are exhausted."""
    streams = [iter(s) for s in streams]
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


@contextlib.contextmanager
def _progress_bars(enabled: bool, total_merges: int):
    """tqdm bars on stderr, one per phase (characters pre-tokenized, then merges learned);
    yields the (on_chars, on_merge) callbacks for train_bpe, or Nones when disabled."""
    if not enabled:
        yield None, None
        return
    from tqdm import tqdm

    bars = [tqdm(unit="char", unit_scale=True, desc="pre-tokenize", file=sys.stderr)]

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


def encode_text(tokenizer_dir: str | os.PathLike, source: Iterable[str],
                allow_special: bool = False) -> Iterator[int]:
    """Ids of everything read from `source` as ordinary text, streamed with bounded memory;
    with `allow_special`, special-token strings become their ids (read whole, then)."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    if allow_special:
        return iter(tokenizer.encode("".join(source), allowed_special="all"))
    return tokenizer.encode_iterable(source)


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
