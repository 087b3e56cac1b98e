"""Where documents come from: the one reader of raw text for every command.

`tokenizer train`, `data prepare` and `run` all read their inputs here, so a JSONL file, a
gzip file or a directory means the same documents to each of them. Every source yields
`Document`s (text, plus a URL when the record has one). A document is the unit that filters
judge, dedup compares, the split assigns and the tokenizer learns from.

Formats are chosen by extension after stripping `.gz` / `.zst`:
  .jsonl / .ndjson   one JSON object per line, text in `text_field`
  .json              a list of objects (or one object), text in `text_field`
  .parquet           a column named `text_field` (read with pyarrow, batch by batch)
  anything else      plain text, cut into documents by `doc_mode` (see `split_text`)
A directory contributes its files with these formats, code and .txt/.md/.rst (recursively,
sorted); an explicitly named file is read whatever its extension.

The name `stdlib` means the embedded corpus: the `.py` sources of the Python standard library
shipped with the running interpreter, one document per file, so the pipeline works offline.

Plain text streams through in blocks (a multi-GB file never sits in memory, except in doc
mode `file`, where the file is one document). Problems in the data are counted in
`SourceStats`, never printed per record: bytes that are not UTF-8 (replaced by U+FFFD) and
malformed records (skipped, the first few kept with file:line for the summary).
"""

from __future__ import annotations

import codecs
import functools
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from scratchlm.errors import ScratchLMError

EOT_DELIMITER = "<|endoftext|>"
STDLIB_SOURCE = "stdlib"
DOC_MODES = ("auto", "file", "eot", "blank", "line")

# Extensions treated as source code: they get the `code` filter profile and one document per
# file, because blank lines inside a program do not separate independent documents.
CODE_EXTENSIONS = frozenset(
    ".py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .rb .sh .lua .jl .scala .kt .swift".split()
)
_STRUCTURED_EXTENSIONS = frozenset({".jsonl", ".ndjson", ".json", ".parquet"})
_COMPRESSION_SUFFIXES = (".gz", ".zst")
_PLAIN_TEXT_EXTENSIONS = frozenset({".txt", ".text", ".md", ".rst", ""})

# Directories skipped inside the stdlib: test suites (31 MB of mostly generated fixtures that
# would dominate the corpus) and third-party code that merely happens to be installed there.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)

# Plain text is decoded and cut into documents this many bytes at a time; doc_mode "auto"
# decides from the first block.
READ_BLOCK_BYTES = 1 << 20
# Malformed records: how many locations the summary shows (all of them are counted).
SHOWN_PROBLEMS = 3
# A document is binary, not text, when more than this share of its characters are U+FFFD
# (bytes that were not UTF-8) or control characters other than whitespace. Text in any
# language has next to none; random bytes give ~50%, UTF-16 (every other byte NUL) ~50%.
# A few such characters never make binary data: "caf\ufffd" is text with one bad byte.
MAX_NON_TEXT_FRACTION = 0.1
MIN_NON_TEXT_CHARS = 16
_NON_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class Document:
    text: str
    url: str | None = None  # from a JSON record's "url" field, used by the URL blocklist
    profile: str = "prose"  # which filter profile applies: "prose" or "code"


@dataclass
class SourceStats:
    """What reading one input produced; problems are counted, not silently lost."""

    input: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    malformed: int = 0  # records skipped (bad JSON, missing or non-string text field)
    malformed_examples: list[str] = field(default_factory=list)  # the first few, "file:line: why"
    invalid_utf8_bytes: int = 0  # bytes that were not UTF-8, each run replaced by one U+FFFD
    invalid_utf8_files: list[str] = field(default_factory=list)
    binary_files: list[str] = field(default_factory=list)  # skipped: "path (share of non-text)"
    profile: str = "prose"  # of its documents; "mixed" for a directory of code and prose

    def problems(self) -> list[str]:
        """One line per kind of problem met, for summaries ([] when the input was clean)."""
        lines = []
        if self.binary_files:
            lines.append(f"skipped {len(self.binary_files)} file(s) that look like binary data, not text: "
                         f"{_shown(self.binary_files)}")
        if self.invalid_utf8_bytes:
            lines.append(f"{self.invalid_utf8_bytes:,} byte(s) of invalid UTF-8 replaced by U+FFFD (in "
                         f"{_shown(self.invalid_utf8_files)})")
        if self.malformed:
            lines.append(f"{self.malformed:,} malformed record(s) skipped (first: "
                         f"{'; '.join(self.malformed_examples)})")
        # Files are named in each line; a directory or glob is named first, for context.
        single_file = Path(self.input).is_file()
        return lines if single_file else [f"{self.input}: {line}" for line in lines]


def _shown(items: list[str]) -> str:
    more = len(items) - SHOWN_PROBLEMS
    return ", ".join(items[:SHOWN_PROBLEMS]) + (f" and {more} more" if more > 0 else "")


def hash_fraction(text: str, salt: bytes = b"scratchlm-split") -> float:
    """A uniform value in [0, 1) determined by the text alone: the deterministic coin that
    holds documents out. Each use has its own `salt` (at most 16 bytes) so the coins are
    independent: the data stage's validation split uses the default."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8,
                             person=salt).digest()
    return int.from_bytes(digest, "big") / 2**64


def non_text_fraction(text: str) -> float:
    """Share of characters that are U+FFFD or non-whitespace control characters."""
    if not text:
        return 0.0
    return len(_NON_TEXT.findall(text)) / len(text)


def looks_binary(text: str) -> bool:
    bad = len(_NON_TEXT.findall(text))
    return bad >= MIN_NON_TEXT_CHARS and bad > MAX_NON_TEXT_FRACTION * len(text)


# --------------------------------------------------------------------------- inputs
def stdlib_files() -> list[Path]:
    """The stdlib's own `.py` files (tests and bundled third-party code excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def resolve_input(spec: str) -> list[Path]:
    """Expand one input spec (file, directory, glob or `stdlib`) into a sorted list of files."""
    if spec == STDLIB_SOURCE:
        return stdlib_files()
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        # Only formats we read (not images, .bin shards...); dot-files and dot-directories are
        # metadata (.git, huggingface_hub's .cache), not corpus. Explicit files are always read.
        readable = _STRUCTURED_EXTENSIONS | CODE_EXTENSIONS | _PLAIN_TEXT_EXTENSIONS
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and format_suffix(p) in readable
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ScratchLMError(f"input directory holds no readable files: {spec}")
        return files
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise ScratchLMError(f"input glob matched no files: {spec}")
        return matches
    if path.exists():
        raise ScratchLMError(f"input is neither a file nor a directory: {spec}")
    raise ScratchLMError(f"input not found: {spec}")


def format_suffix(path: Path) -> str:
    """The extension that decides the format, after removing a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def open_binary(path: Path) -> IO[bytes]:
    """Open a file for reading, transparently decompressing .gz and .zst."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith(".zst"):
            import zstandard

            # Buffered, so that it reads line by line like the other two (JSONL).
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- decoding
class _InvalidBytes:
    """Counts the bytes a decoder replaces. Python's codec error handlers are global and
    named, so one handler adds to whichever counter is active in this process."""

    active: _InvalidBytes | None = None

    def __init__(self) -> None:
        self.count = 0

    @staticmethod
    def handler(error: UnicodeDecodeError) -> tuple[str, int]:
        if _InvalidBytes.active is not None:
            _InvalidBytes.active.count += error.end - error.start
        return "\ufffd", error.end


codecs.register_error("scratchlm-count-replace", _InvalidBytes.handler)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of invalid bytes): invalid UTF-8 becomes U+FFFD, as errors="replace"."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        counter = _InvalidBytes.active = _InvalidBytes()
        try:
            return data.decode("utf-8", errors="scratchlm-count-replace"), counter.count
        finally:
            _InvalidBytes.active = None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a (compressed) file raises on corrupt or truncated data."""
    import zstandard

    return OSError, EOFError, zstandard.ZstdError


def _decoded_blocks(raw: IO[bytes], stats: SourceStats, where: str) -> Iterator[str]:
    """Text of a binary stream, READ_BLOCK_BYTES at a time, invalid bytes counted.

    A block never ends with "\\r", so a CRLF pair is never cut in two (line-based splitting
    then sees the same text whatever the block size)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="scratchlm-count-replace")
    counter = _InvalidBytes()
    held = ""
    while True:
        try:
            data = raw.read(READ_BLOCK_BYTES)
        except _read_errors() as exc:
            raise ScratchLMError(f"cannot read {where}: {exc}") from None
        _InvalidBytes.active = counter
        try:
            text = held + decoder.decode(data, final=not data)
        finally:
            _InvalidBytes.active = None
        held = ""
        if data and text.endswith("\r"):
            text, held = text[:-1], "\r"
        if text:
            yield text
        if not data:
            break
    if counter.count:
        stats.invalid_utf8_bytes += counter.count
        stats.invalid_utf8_files.append(where)


def read_text(path: Path, stats: SourceStats | None = None) -> str:
    """Whole file as text; undecodable bytes become U+FFFD (counted in `stats`)."""
    return "".join(_decoded_blocks(open_binary(path), stats or SourceStats(str(path)), str(path)))


# --------------------------------------------------------------------------- plain text
def auto_doc_mode(path: Path, head: str) -> str:
    """Pick a doc_mode for a text file from its extension and its first block."""
    if format_suffix(path) in CODE_EXTENSIONS:
        return "file"
    if EOT_DELIMITER in head:
        return "eot"
    if "\n\n" in head.strip().replace("\r\n", "\n"):
        return "blank"
    if head.strip().count("\n") > 0:
        return "line"
    return "file"


_BLANK_LINES = re.compile(r"\n{2,}")
_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


def split_blocks(blocks: Iterable[str], mode: str, min_chars: int) -> Iterator[str]:
    """Cut a stream of text into documents (the whole-text semantics of `split_text`).

    Each mode cuts only where the text seen so far decides the cut, and carries the rest into
    the next block, so the documents are the same whatever the block boundaries.
    """
    if mode not in DOC_MODES or mode == "auto":
        raise ScratchLMError(f"unknown doc_mode {mode!r}; expected one of {', '.join(DOC_MODES[1:])}")
    if mode == "file":
        text = "".join(blocks)
        if text.strip():
            yield text
        return
    if mode == "blank":
        yield from _merge_small(_blank_separated(blocks), min_chars)
        return
    carry = ""
    for block in blocks:
        if mode == "eot":
            *parts, carry = (carry + block).split(EOT_DELIMITER)
        else:  # line: the last line is complete only once a line break follows it
            parts = (carry + block).splitlines(keepends=True)
            carry = parts.pop() if parts and not parts[-1].endswith(tuple(_LINE_BREAKS)) else ""
            parts = [line.rstrip(_LINE_BREAKS) for line in parts]
        yield from (part for part in parts if part.strip())
    if carry.strip():
        yield carry


def _blank_separated(blocks: Iterable[str]) -> Iterator[str]:
    """Blocks of text between blank lines; a run of newlines is a separator only once text
    follows it (it may continue in the next block)."""
    carry = ""
    for block in blocks:
        text = carry + block.replace("\r\n", "\n")  # blocks never split a CRLF
        # The carry holds no separator except maybe a run at its very end: search from there.
        start = len(carry.rstrip("\n"))
        cuts = [m for m in _BLANK_LINES.finditer(text, start) if m.end() < len(text)]
        if not cuts:
            carry = text
            continue
        carry = text[cuts[-1].end():]
        yield from _BLANK_LINES.split(text[: cuts[-1].start()])
    yield from _BLANK_LINES.split(carry)


def _merge_small(parts: Iterable[str], min_chars: int) -> Iterator[str]:
    """Join consecutive non-blank parts with a blank line until they reach `min_chars`."""
    merged: list[str] = []
    size = 0
    for part in parts:
        if not part.strip():
            continue
        merged.append(part)
        size += len(part)
        if size >= min_chars:
            yield "\n\n".join(merged)
            merged, size = [], 0
    if merged:
        yield "\n\n".join(merged)


def split_text(text: str, mode: str, min_chars: int) -> list[str]:
    """Cut a text into documents.

    file:  the whole text is one document (code, or a corpus that is one long text).
    eot:   documents separated by `<|endoftext|>` (TinyStories V2, GPT-style dumps): the file
           format's separator, removed here; the data stage adds its own separator token.
    blank: blocks separated by blank lines, consecutive blocks merged until a document reaches
           `min_chars`, so plays and stories become documents long enough for the quality
           filters (Gopher wants >= 50 words) instead of one-line speeches.
    line:  one document per line (wiki_demo: one article per line).
    """
    return list(split_blocks([text], mode, min_chars))


# --------------------------------------------------------------------------- records
def _record_text(record: object, text_field: str) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"missing field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field {text_field!r} is {type(text).__name__}, not a string")
    url = record.get("url")
    return text, url if isinstance(url, str) else None


def _malformed(stats: SourceStats, where: str, reason: str, strict: bool) -> None:
    if strict:
        raise ScratchLMError(f"malformed record at {where}: {reason}")
    stats.malformed += 1
    if len(stats.malformed_examples) < SHOWN_PROBLEMS:
        stats.malformed_examples.append(f"{where}: {reason}")


def _iter_jsonl(path: Path, text_field: str, strict: bool, stats: SourceStats,
                byte_range: tuple[int, int] | None = None) -> Iterator[tuple[str, str | None]]:
    invalid = 0
    with open_binary(path) as raw:
        start = 0
        if byte_range is not None:
            start, end = aligned_range(raw, byte_range, b"\n")
            raw = io.BufferedReader(_Window(raw, start, end))
        try:
            for index, line in enumerate(raw):
                if index == 0 and start == 0:
                    line = line.removeprefix(codecs.BOM_UTF8)  # a BOM is not part of the first record
                if not line.strip():
                    continue
                decoded, bad = decode_utf8(line)
                invalid += bad
                try:
                    text, url = _record_text(json.loads(decoded), text_field)
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    line_number = (_lines_before(path, start) if start else 0) + index + 1
                    _malformed(stats, f"{path}:{line_number}", str(exc), strict)
                    continue
                yield text, url
        except _read_errors() as exc:
            raise ScratchLMError(f"cannot read {path}: {exc}") from None
    if invalid:
        stats.invalid_utf8_bytes += invalid
        stats.invalid_utf8_files.append(str(path))


def _iter_json(path: Path, text_field: str, strict: bool, stats: SourceStats) -> Iterator[tuple[str, str | None]]:
    try:
        data = json.loads(read_text(path, stats))
    except ValueError as exc:
        raise ScratchLMError(f"{path} is not valid JSON: {exc}") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        try:
            text, url = _record_text(record, text_field)
        except ValueError as exc:
            _malformed(stats, where, str(exc), strict)
            continue
        yield text, url


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise ScratchLMError(f"cannot read parquet file {path}: {exc}") from None


def row_group_offsets(path: Path) -> list[int]:
    """Where each row group of a Parquet file starts (its first data page): the document
    boundaries a byte range of the file is aligned to."""
    metadata = _open_parquet(path).metadata
    return [metadata.row_group(i).column(0).data_page_offset for i in range(metadata.num_row_groups)]


def _iter_parquet(path: Path, text_field: str, strict: bool, stats: SourceStats,
                  byte_range: tuple[int, int] | None = None) -> Iterator[tuple[str, str | None]]:
    parquet = _open_parquet(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ScratchLMError(f"{path} has no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field] + (["url"] if "url" in names and text_field != "url" else [])
    groups = list(range(parquet.metadata.num_row_groups))
    if byte_range is not None:  # the row groups that start inside the range
        offsets = row_group_offsets(path)
        groups = [i for i in groups if byte_range[0] <= offsets[i] < byte_range[1]]
    if not groups:
        return
    row = sum(parquet.metadata.row_group(i).num_rows for i in range(groups[0]))
    for batch in parquet.iter_batches(columns=columns, batch_size=4096, row_groups=groups):
        texts = batch.column(0).to_pylist()
        urls = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, url in zip(texts, urls):
            where = f"{path}[row {row}]"
            row += 1
            if not isinstance(text, str):
                _malformed(stats, where, f"column {text_field!r} is not a string ({text!r})", strict)
                continue
            yield text, url if isinstance(url, str) else None


# --------------------------------------------------------------------------- documents
def iter_file_documents(
    path: Path, *, text_field: str = "text", doc_mode: str = "auto", min_doc_chars: int = 1000,
    strict_json: bool = False, stats: SourceStats, byte_range: tuple[int, int] | None = None,
) -> Iterator[Document]:
    """The documents of one file; with `byte_range` (a, b) only those that start in [a, b)
    (see `split_boundary`: the file must be splittable; documents start at line starts, after
    a separator, or at row groups). Whatever the ranges, every document is read exactly once."""
    suffix = format_suffix(path)
    profile = "code" if suffix in CODE_EXTENSIONS else "prose"
    if suffix in _STRUCTURED_EXTENSIONS:
        reader = {".jsonl": _iter_jsonl, ".ndjson": _iter_jsonl, ".json": _iter_json,
                  ".parquet": _iter_parquet}[suffix]
        args = (path, text_field, strict_json, stats) + ((byte_range,) if byte_range is not None else ())
        for text, url in reader(*args):
            if _LONE_SURROGATES.search(text):
                # JSON can spell lone surrogates ("\\ud83d"), which are not text: replace and
                # count them like invalid bytes.
                text, bad = _LONE_SURROGATES.subn("\ufffd", text)
                stats.invalid_utf8_bytes += bad
                if str(path) not in stats.invalid_utf8_files:
                    stats.invalid_utf8_files.append(str(path))
            yield Document(text=text, url=url, profile=profile)
        return
    head = file_head(path)
    if looks_binary(head):  # judged on the first block: a binary file is binary throughout
        stats.binary_files.append(f"{path} ({non_text_fraction(head):.0%} invalid UTF-8 or "
                                  f"control characters)")
        return
    mode = auto_doc_mode(path, head) if doc_mode == "auto" else doc_mode
    with open_binary(path) as raw:
        if byte_range is not None:
            boundary = _TEXT_BOUNDARIES.get(mode)
            if boundary is None or path.name.lower().endswith(_COMPRESSION_SUFFIXES):
                raise ScratchLMError(f"{path}: doc_mode {mode} files cannot be split by byte range")
            raw = _Window(raw, *aligned_range(raw, byte_range, boundary))
        for part in split_blocks(_decoded_blocks(raw, stats, str(path)), mode, min_doc_chars):
            yield Document(text=part, profile=profile)


def file_head(path: Path) -> str:
    """The first READ_BLOCK_BYTES of a file as text: what decides binary-or-not and doc_mode
    "auto", the same for the whole file whichever part of it is read."""
    with open_binary(path) as raw:
        try:
            data = raw.read(READ_BLOCK_BYTES)
        except _read_errors() as exc:
            raise ScratchLMError(f"cannot read {path}: {exc}") from None
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- byte ranges
# Documents of these doc modes start right after these bytes, so a file can be cut there.
_TEXT_BOUNDARIES = {"line": b"\n", "eot": EOT_DELIMITER.encode()}


def split_boundary(path: Path, doc_mode: str = "auto") -> bytes | str | None:
    """How a file may be divided between tasks: the bytes after which documents start
    (JSONL: b"\\n"; plain text in line or eot mode), "row_groups" (Parquet), or None when only
    whole (compressed files, JSON arrays, blank-line and whole-file documents)."""
    suffix = format_suffix(path)
    if path.name.lower().endswith(_COMPRESSION_SUFFIXES) or suffix == ".json":
        return None
    if suffix in (".jsonl", ".ndjson"):
        return b"\n"
    if suffix == ".parquet":
        return "row_groups"
    head = file_head(path)
    if looks_binary(head):
        return None
    return _TEXT_BOUNDARIES.get(auto_doc_mode(path, head) if doc_mode == "auto" else doc_mode)


def _boundary_at_or_after(f: IO[bytes], pos: int, size: int, boundary: bytes) -> int:
    """The first position >= pos where a document starts: 0, just after `boundary`, or the end."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    # An occurrence ending at `pos` or later may begin up to len(boundary) bytes before it.
    at = max(0, pos - len(boundary))
    f.seek(at)
    carry = b""
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        data = carry + block
        found = data.find(boundary)
        if found >= 0:
            return at - len(carry) + found + len(boundary)
        carry = data[-(len(boundary) - 1):] if len(boundary) > 1 else b""
        at += len(block)


def aligned_range(f: IO[bytes], byte_range: tuple[int, int], boundary: bytes) -> tuple[int, int]:
    """[start, end) moved forward to document starts: adjacent ranges stay adjacent, so
    every document lies in exactly one of them."""
    size = f.seek(0, os.SEEK_END)
    start, end = byte_range
    return (_boundary_at_or_after(f, start, size, boundary),
            _boundary_at_or_after(f, max(start, end), size, boundary))


class _Window(io.RawIOBase):
    """Bytes [start, end) of a seekable binary file, read as a stream."""

    def __init__(self, f: IO[bytes], start: int, end: int) -> None:
        super().__init__()
        f.seek(start)
        self._f, self._left = f, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


@functools.lru_cache(maxsize=64)
def _lines_before(path: Path, start: int) -> int:
    """Lines before byte `start` of a file (counted only when a malformed record needs its line
    number: it is a scan of everything before `start`)."""
    count, remaining = 0, start
    with open(path, "rb") as f:
        while remaining > 0 and (block := f.read(min(remaining, 1 << 22))):
            count += block.count(b"\n")
            remaining -= len(block)
    return count

def iter_documents_from(
    spec: str, *, text_field: str = "text", doc_mode: str = "auto", min_doc_chars: int = 1000,
    strict_json: bool = False, stats: SourceStats | None = None,
) -> Iterator[Document]:
    """All documents of one input spec, in a deterministic order (files sorted by path)."""
    stats = stats if stats is not None else SourceStats(input=spec)
    if doc_mode not in DOC_MODES:
        raise ScratchLMError(f"unknown doc_mode {doc_mode!r}; expected one of {', '.join(DOC_MODES)}")
    for path in resolve_input(spec):
        stats.files += 1
        for doc in iter_file_documents(path, text_field=text_field, doc_mode=doc_mode,
                                       min_doc_chars=min_doc_chars, strict_json=strict_json,
                                       stats=stats):
            size = len(doc.text.encode("utf-8"))
            stats.documents += 1
            stats.bytes += size
            stats.profile = doc.profile if stats.documents == 1 or stats.profile == doc.profile else "mixed"
            yield doc


def iter_documents(specs: Iterable[str], stats: list[SourceStats] | None = None,
                   **options) -> Iterator[Document]:
    """Documents of several input specs in order; one SourceStats per spec is appended to
    `stats` as its reading starts (options as for `iter_documents_from`)."""
    for spec in specs:
        spec_stats = SourceStats(input=spec)
        if stats is not None:
            stats.append(spec_stats)
        yield from iter_documents_from(spec, stats=spec_stats, **options)


def check_inputs(specs: Iterable[str]) -> None:
    """Fail on a missing input before any work is done."""
    specs = list(specs)
    if not specs:
        raise ScratchLMError("no inputs given")
    for spec in specs:
        resolve_input(spec)


__all__ = [
    "CODE_EXTENSIONS", "DOC_MODES", "Document", "EOT_DELIMITER", "SourceStats", "check_inputs",
    "decode_utf8", "format_suffix", "hash_fraction", "iter_documents", "iter_documents_from",
    "looks_binary", "non_text_fraction", "open_binary", "read_text", "resolve_input",
    "split_text", "stdlib_files",
]
