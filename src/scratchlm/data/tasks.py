"""Data preparation as independent tasks: the plan that slices the inputs, and one task's work.

`data prepare` cuts its inputs into N tasks of about equal bytes (`plan_tasks`): by file, and
inside a large file by byte range moved to document starts (scratchlm.sources), so every
document belongs to exactly one task whatever N is. A task (`run_task`) streams its slice
through read -> clean -> filter -> fingerprint -> tokenize in batches and writes, under
`OUT/tasks/task_NNNNN/`:

    tokens.bin      the token ids of the documents it kept, one after another (no separators)
    docs.bin        one DOC_RECORD per document (token count, bytes, characters, split coin,
                    exact-dedup key, which input it came from)
    signatures.bin  MinHash signatures, num_perm uint32 per document   (when dedup is on)
    band_BB.bin     LSH band keys: for band BB, one uint64 per document (when dedup is on;
                    a file per band, so finalize reads one band at a time)
    task.json       settings, plan fingerprint, counts; written last

A task directory is built under a temporary name and renamed when complete, so one that
exists is finished; a killed task leaves only a hidden temporary directory, removed when the
task runs again. Nothing a task holds grows with the corpus: one batch of documents at a time.
What needs all tasks (dedup across them, the split, the shards) is data/finalize.py.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from scratchlm.data.clean import clean_text
from scratchlm.data.dedup import MinHasher, band_keys, choose_bands, exact_key
from scratchlm.data.filters import FILTERS, Blocklists, first_failing_filter, scrub_pii
from scratchlm.data.shards import shard_dtype
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json
from scratchlm.sources import (SourceStats, hash_fraction, iter_file_documents, looks_binary, resolve_input,
                               split_boundary)

TASKS_DIR = "tasks"
TASK_FILE = "task.json"
TASK_FORMAT_VERSION = 1
DOC_RECORD = np.dtype([("source", "<i4"), ("tokens", "<i8"), ("bytes", "<i8"), ("chars", "<i8"),
                       ("fraction", "<f8"), ("key", "V16")])
# PrepareConfig fields that do not change what is written: tasks that differ only in these
# belong together (a Slurm task may run with other --workers than its siblings).
RUNTIME_FIELDS = ("workers", "progress", "batch_documents")
# Why a document can be dropped: binary data (judged before cleaning), then the filters.
# Binary data and empty documents are dropped whatever the filter settings.
DROP_REASONS = ("binary", *FILTERS)
ALWAYS_ON = ("binary", "empty")


def task_name(index: int) -> str:
    return f"task_{index:05d}"


def band_file(band: int) -> str:
    return f"band_{band:02d}.bin"


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Slice:
    """Part of one input file: the documents that start in bytes [start, end), or the whole
    file when start is None."""

    source: int  # index into Plan.sources
    path: str
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Plan:
    sources: list[dict[str, Any]]  # {"input": spec, "role": "val" | "train", "files": n}
    tasks: list[list[Slice]]
    fingerprint: str  # of the inputs (paths, sizes, modification times) and the cut

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


def plan_tasks(inputs: list[str], val_inputs: list[str], num_tasks: int, doc_mode: str = "auto") -> Plan:
    """Cut the inputs (validation inputs first: on duplicates, dedup keeps their copy) into
    `num_tasks` slices of about equal bytes. The same inputs give the same plan in every process
    (a Slurm array's tasks each compute it)."""
    if num_tasks < 1:
        raise ScratchLMError(f"--num-tasks must be at least 1, got {num_tasks}")
    sources, files = [], []
    for role, specs in (("val", val_inputs), ("train", inputs)):
        for spec in specs:
            paths = resolve_input(spec)
            sources.append({"input": spec, "role": role, "files": len(paths)})
            files.extend((len(sources) - 1, path) for path in paths)
    sizes = [path.stat().st_size for _, path in files]
    total = sum(sizes)
    bounds = [total * k // num_tasks for k in range(num_tasks + 1)]
    tasks: list[list[Slice]] = [[] for _ in range(num_tasks)]
    digest = hashlib.sha256(json.dumps([num_tasks, doc_mode, sources]).encode())
    offset = 0
    for (source, path), size in zip(files, sizes):
        digest.update(f"{path}\0{size}\0{path.stat().st_mtime_ns}\n".encode())
        boundary = split_boundary(path, doc_mode) if size else None
        if boundary is None:  # whole: the task whose range holds the file's first byte
            owner = min(bisect.bisect_right(bounds, offset) - 1, num_tasks - 1)
            tasks[owner].append(Slice(source, str(path)))
        else:
            for k in range(num_tasks):
                start, end = max(bounds[k], offset) - offset, min(bounds[k + 1], offset + size) - offset
                if start < end:
                    tasks[k].append(Slice(source, str(path), start, end))
        offset += size
    return Plan(sources, tasks, digest.hexdigest())


# --------------------------------------------------------------------------- one task
class TaskWriter:
    """Appends documents to a task directory's files, a batch at a time."""

    def __init__(self, directory: Path, dtype: np.dtype, bands: int | None) -> None:
        names = ["tokens.bin", "docs.bin"]
        if bands is not None:
            names += ["signatures.bin", *(band_file(b) for b in range(bands))]
        self.files = {name: open(directory / name, "wb") for name in names}
        self.dtype = dtype
        self.documents = 0

    def add(self, tokens: list[np.ndarray], records: np.ndarray, signatures: np.ndarray | None,
            bands: np.ndarray | None) -> None:
        for ids in tokens:
            self.files["tokens.bin"].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.files["docs.bin"].write(records.tobytes())
        if signatures is not None:
            self.files["signatures.bin"].write(np.ascontiguousarray(signatures, dtype="<u4").tobytes())
            for b in range(bands.shape[1]):
                self.files[band_file(b)].write(np.ascontiguousarray(bands[:, b], dtype="<u8").tobytes())
        self.documents += len(records)

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


@dataclass
class TaskContext:
    """What processing a batch needs: settings, tokenizer, blocklists, the MinHash functions."""

    config: Any  # PrepareConfig
    tokenizer: Any  # scratchlm.tokenizer.Tokenizer
    blocklists: Blocklists
    minhasher: MinHasher
    bands: int
    rows: int


def process_batch(context: TaskContext, batch: list[tuple[int, Any]], dropped: dict[str, int],
                  pii: dict[str, int]):
    """Clean, filter, fingerprint and tokenize a batch of (source index, Document); returns
    (token arrays, DOC_RECORD array, signatures, band keys) of the documents kept."""
    config = context.config
    disabled = frozenset(config.disabled_filters)
    tokens, records, signatures = [], [], []
    for source, doc in batch:
        profile = config.profile or doc.profile
        # Always applied, filters or not. Binary data is judged before cleaning, which would
        # delete its control characters and hide what it is; an empty text has nothing to train on.
        if looks_binary(doc.text):
            dropped["binary"] += 1
            continue
        text = clean_text(doc.text, profile)
        reason = "empty" if not text else None
        if reason is None and config.filter:
            reason = first_failing_filter(text, profile, config.filters, context.blocklists, disabled, doc.url)
        if reason is not None:
            dropped[reason] += 1
            continue
        if config.scrub_pii:
            text, counts = scrub_pii(text)
            for kind, n in counts.items():
                pii[kind] = pii.get(kind, 0) + n
        # Data is ordinary text: a special token's string in a document is encoded as text and
        # never forges a boundary; the separator is added when the shards are written.
        ids = np.asarray(context.tokenizer.encode_ordinary(text), dtype=np.uint32)
        tokens.append(ids)
        records.append((source, len(ids), len(text.encode("utf-8")), len(text), hash_fraction(text),
                        exact_key(text)))
        if config.dedup:
            signatures.append(context.minhasher.signature(text))
    records_array = np.array(records, dtype=DOC_RECORD)
    if not config.dedup or not tokens:
        return tokens, records_array, None, None
    stacked = np.stack(signatures)
    return tokens, records_array, stacked, band_keys(stacked, context.bands, context.rows)


def iter_task_documents(plan: Plan, index: int, config, stats: dict[int, SourceStats]
                        ) -> Iterator[tuple[int, Any]]:
    """(source index, Document) of every document of task `index`, in corpus order."""
    for piece in plan.tasks[index]:
        source_stats = stats.setdefault(piece.source, SourceStats(input=plan.sources[piece.source]["input"]))
        byte_range = None if piece.start is None else (piece.start, piece.end)
        for doc in iter_file_documents(Path(piece.path), text_field=config.text_field, doc_mode=config.doc_mode,
                                       min_doc_chars=config.min_doc_chars, strict_json=config.strict_json,
                                       stats=source_stats, byte_range=byte_range):
            source_stats.documents += 1
            source_stats.bytes += len(doc.text.encode("utf-8"))
            source_stats.profile = (doc.profile if source_stats.documents == 1 or source_stats.profile == doc.profile
                                    else "mixed")
            yield piece.source, doc


def output_settings(config) -> dict[str, Any]:
    """The settings that decide what a task writes (all tasks of a data directory share them)."""
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}


def run_task(out_dir: Path, plan: Plan, index: int, config, tokenizer, tokenizer_dir: Path,
             on_bytes: Callable[[int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Process task `index` of `plan` into out_dir/tasks/task_NNNNN (unless it is already
    there with the same settings); returns its task.json record."""
    if not 0 <= index < plan.num_tasks:
        raise ScratchLMError(f"--task-index {index} is outside [0, {plan.num_tasks}) (--num-tasks {plan.num_tasks})")
    tasks = out_dir / TASKS_DIR
    final = tasks / task_name(index)
    identity = task_identity(plan, config, tokenizer, tokenizer_dir)
    if finished_task(out_dir, index, identity, overwrite):
        return read_task(final)
    shutil.rmtree(final, ignore_errors=True)  # a task with other settings, being redone (overwrite)
    for stale in tasks.glob(f".{task_name(index)}.*.tmp"):  # left by a killed run of this task
        shutil.rmtree(stale, ignore_errors=True)

    started = time.perf_counter()
    bands, rows = choose_bands(config.minhash_permutations, config.near_dup_threshold)
    context = TaskContext(config, tokenizer, Blocklists.load(config.blocklist_words, config.blocklist_urls),
                          MinHasher(config.minhash_permutations, config.minhash_ngram), bands, rows)
    dtype = shard_dtype(tokenizer.vocab_size)
    stats: dict[int, SourceStats] = {}
    dropped = {name: 0 for name in DROP_REASONS}
    pii: dict[str, int] = {}
    kept = kept_bytes = 0
    with atomic_directory(final, overwrite=True, what="data task") as tmp:
        writer = TaskWriter(tmp, dtype, bands if config.dedup else None)
        try:
            batch, batch_bytes = [], 0
            for item in iter_task_documents(plan, index, config, stats):
                batch.append(item)
                batch_bytes += len(item[1].text)
                if len(batch) == config.batch_documents:
                    kept, kept_bytes = _write_batch(context, writer, batch, dropped, pii, kept, kept_bytes)
                    if on_bytes:
                        on_bytes(batch_bytes)
                    batch, batch_bytes = [], 0
            if batch:
                kept, kept_bytes = _write_batch(context, writer, batch, dropped, pii, kept, kept_bytes)
                if on_bytes:
                    on_bytes(batch_bytes)
        finally:
            writer.close()
        record = {
            **identity, "format_version": TASK_FORMAT_VERSION, "task_index": index,
            "documents": kept, "bytes": kept_bytes, "bands_rows": [bands, rows],
            "sources": {str(k): _stats_record(v) for k, v in sorted(stats.items())},
            "dropped": dropped, "pii_replacements": pii, "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write_json(tmp / TASK_FILE, record)
    return record


def _write_batch(context, writer, batch, dropped, pii, kept: int, kept_bytes: int) -> tuple[int, int]:
    tokens, records, signatures, bands = process_batch(context, batch, dropped, pii)
    writer.add(tokens, records, signatures, bands)
    return kept + len(records), kept_bytes + int(records["bytes"].sum())


def finished_task(out_dir: Path, index: int, identity: dict[str, Any], overwrite: bool) -> bool:
    """Is task `index` finished with these settings? One finished with other settings is an
    error naming them, unless `overwrite` (then it is to be redone)."""
    directory = out_dir / TASKS_DIR / task_name(index)
    if not directory.is_dir():
        return False
    differing = [k for k, v in identity.items() if read_task(directory).get(k) != v]
    if differing and not overwrite:
        raise ScratchLMError(f"{directory} was prepared with other {', '.join(differing)}; use --overwrite to "
                             f"prepare it again")
    return not differing


def task_identity(plan: Plan, config, tokenizer, tokenizer_dir: Path) -> dict[str, Any]:
    """What makes tasks belong to one data directory: compared field by field."""
    return {
        "num_tasks": plan.num_tasks, "plan": plan.fingerprint, "inputs": plan.sources,
        "settings": output_settings(config), "tokenizer_hash": tokenizer.fingerprint(),
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()), "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
    }


def _stats_record(stats: SourceStats) -> dict[str, Any]:
    return {"documents": stats.documents, "bytes": stats.bytes, "profile": stats.profile,
            "malformed": stats.malformed, "malformed_examples": stats.malformed_examples,
            "invalid_utf8_bytes": stats.invalid_utf8_bytes, "invalid_utf8_files": stats.invalid_utf8_files,
            "binary_files": stats.binary_files}


def read_task(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / TASK_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"{directory} is not a finished data task (no {TASK_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ScratchLMError(f"{directory / TASK_FILE}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("format_version") != TASK_FORMAT_VERSION:
        raise ScratchLMError(f"{directory / TASK_FILE}: not a scratchlm data task of format {TASK_FORMAT_VERSION}")
    return record

