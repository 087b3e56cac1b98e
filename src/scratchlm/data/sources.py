"""Where documents come from: files, directories, globs, compressed files and the stdlib corpus.

Every source yields `Document`s (text, plus a URL when the record has one). A document is the
unit that filters judge, dedup compares, the split assigns, and the loader can align windows to.

Formats are chosen by extension after stripping `.gz` / `.zst`:
  .jsonl / .ndjson   one JSON object per line, text in `text_field`
  .json              a list of objects (or one object), text in `text_field`
  .parquet           a column named `text_field` (read with pyarrow, batch by batch)
  anything else      plain text, cut into documents by `doc_mode` (see `split_text`)
A directory contributes its files with these formats, code and .txt/.md/.rst (recursively,
sorted); an explicitly named file is read whatever its extension.

The name `stdlib` means the embedded corpus: the `.py` sources of the Python standard library
shipped with the running interpreter, one document per file, so the pipeline works offline.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

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


@dataclass
class Document:
    text: str
    url: str | None = None  # from a JSON record's "url" field, used by the URL blocklist
    profile: str = "prose"  # which filter profile applies: "prose" or "code"


@dataclass
class SourceStats:
    """What reading one input produced; malformed records are counted, not silently lost."""

    input: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    malformed: int = 0
    profile: str = "prose"  # of its documents; "mixed" for a directory of code and prose
    malformed_locations: list[str] = field(default_factory=list)


def stdlib_files() -> list[Path]:
    """The stdlib's own `.py` files (tests and bundled third-party code excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def resolve_input(spec: str) -> list[Path]:
    """Expand one input spec (file, directory, or glob) into a sorted list of files."""
    if spec == STDLIB_SOURCE:
        return stdlib_files()
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        # Only formats we read (not images, .bin shards...); dot-files and dot-directories are
        # metadata (.git, huggingface_hub's .cache), not corpus. Explicit files are always read.
        readable = _STRUCTURED_EXTENSIONS | CODE_EXTENSIONS | _PLAIN_TEXT_EXTENSIONS
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and format_suffix(p) in readable
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise ScratchLMError(f"input glob matched no files: {spec}")
        return matches
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
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def read_text(path: Path) -> str:
    """Whole file as text; undecodable bytes become U+FFFD rather than aborting a big run."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ScratchLMError(f"cannot read {path}: {exc}") from exc
    return data.decode("utf-8", errors="replace")


def split_text(text: str, mode: str, min_chars: int) -> list[str]:
    """Cut a text file into documents.

    file:  the whole file is one document (code, or a corpus that is one long text).
    eot:   documents separated by `<|endoftext|>` (TinyStories V2, GPT-style dumps).
    blank: blank-line separated blocks, consecutive blocks merged until a document reaches
           `min_chars`, so plays and stories become documents long enough for the quality
           filters (Gopher wants >= 50 words) instead of one-line speeches.
    line:  one document per line (wiki_demo: one article per line).
    """
    if mode == "file":
        return [text] if text.strip() else []
    if mode == "eot":
        return [part for part in text.split(EOT_DELIMITER) if part.strip()]
    if mode == "line":
        return [line for line in text.splitlines() if line.strip()]
    if mode == "blank":
        docs, current, size = [], [], 0
        for block in text.replace("\r\n", "\n").split("\n\n"):
            if not block.strip():
                continue
            current.append(block)
            size += len(block)
            if size >= min_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n\n".join(current))
        return docs
    raise ScratchLMError(f"unknown doc_mode {mode!r}; expected one of {', '.join(DOC_MODES)}")


def auto_doc_mode(path: Path, text: str) -> str:
    """Pick a doc_mode for a text file from its extension and contents."""
    if format_suffix(path) in CODE_EXTENSIONS:
        return "file"
    if EOT_DELIMITER in text:
        return "eot"
    if "\n\n" in text.strip():
        return "blank"
    if text.strip().count("\n") > 0:
        return "line"
    return "file"


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
    message = f"malformed record at {where}: {reason}"
    if strict:
        raise ScratchLMError(message)
    warnings.warn(f"skipping {message}", stacklevel=3)
    stats.malformed += 1
    stats.malformed_locations.append(where)


def _iter_jsonl(path: Path, text_field: str, strict: bool, stats: SourceStats) -> Iterator[tuple[str, str | None]]:
    with open_binary(path) as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text, url = _record_text(json.loads(line), text_field)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                _malformed(stats, where, str(exc), strict)
                continue
            yield text, url


def _iter_json(path: Path, text_field: str, strict: bool, stats: SourceStats) -> Iterator[tuple[str, str | None]]:
    try:
        data = json.loads(read_text(path))
    except ValueError as exc:
        raise ScratchLMError(f"{path} is not valid JSON: {exc}") from exc
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        try:
            text, url = _record_text(record, text_field)
        except ValueError as exc:
            _malformed(stats, where, str(exc), strict)
            continue
        yield text, url


def _iter_parquet(path: Path, text_field: str, strict: bool, stats: SourceStats) -> Iterator[tuple[str, str | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise ScratchLMError(f"cannot read parquet file {path}: {exc}") from exc
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ScratchLMError(f"{path} has no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field] + (["url"] if "url" in names and text_field != "url" else [])
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        texts = batch.column(0).to_pylist()
        urls = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, url in zip(texts, urls):
            where = f"{path}[row {row}]"
            row += 1
            if not isinstance(text, str):
                _malformed(stats, where, f"column {text_field!r} is null", strict)
                continue
            yield text, url if isinstance(url, str) else None


def iter_file_documents(
    path: Path, *, text_field: str, doc_mode: str, min_doc_chars: int,
    strict_json: bool, stats: SourceStats,
) -> Iterator[Document]:
    suffix = format_suffix(path)
    profile = "code" if suffix in CODE_EXTENSIONS else "prose"
    if suffix in _STRUCTURED_EXTENSIONS:
        reader = {".jsonl": _iter_jsonl, ".ndjson": _iter_jsonl, ".json": _iter_json,
                  ".parquet": _iter_parquet}[suffix]
        for text, url in reader(path, text_field, strict_json, stats):
            yield Document(text=text, url=url, profile=profile)
        return
    text = read_text(path)
    mode = auto_doc_mode(path, text) if doc_mode == "auto" else doc_mode
    for part in split_text(text, mode, min_doc_chars):
        yield Document(text=part, profile=profile)


def iter_documents_from(
    spec: str, *, text_field: str = "text", doc_mode: str = "auto", min_doc_chars: int = 1000,
    strict_json: bool = False, stats: SourceStats | None = None,
) -> Iterator[Document]:
    """All documents of one input spec, in a deterministic order (files sorted by path)."""
    stats = stats if stats is not None else SourceStats(input=spec)
    for path in resolve_input(spec):
        stats.files += 1
        for doc in iter_file_documents(
            path, text_field=text_field, doc_mode=doc_mode, min_doc_chars=min_doc_chars,
            strict_json=strict_json, stats=stats,
        ):
            stats.documents += 1
            stats.bytes += len(doc.text.encode("utf-8"))
            stats.profile = doc.profile if stats.documents == 1 or stats.profile == doc.profile else "mixed"
            yield doc
