"""`data finalize`: the steps that need every task: dedup across tasks, the split, the shards.

Documents are numbered in corpus order (task 0's, then task 1's, ...; tasks are consecutive
slices of the inputs), so every decision below depends on the documents alone, never on how
many tasks there were: the kept documents and the shards are the same for 1 task or 100.

  exact dedup  a 16-byte key per document; the first occurrence is kept
  near dedup   one band at a time: the band keys the tasks wrote (8 bytes per document) are
               sorted, documents sharing a key are candidates, candidates are verified against
               their MinHash signatures, read from the tasks' files only for those pairs;
               union-find keeps the first document of each cluster
  split        explicit validation inputs, the hash coin each task recorded, or position
  write        token ids copied from the tasks' files into shards, an EOT after each document

Memory holds a compact record per document (52 bytes), one band's keys and their order (16
bytes per document) and the union-find (8): nothing else grows with the corpus.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scratchlm.data.config import PrepareConfig
from scratchlm.data.dedup import choose_bands, first_of_each_cluster, verified_pairs
from scratchlm.data.filters import PROFILES
from scratchlm.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, index_name, mask_name, shard_dtype
from scratchlm.data.split import cut_at_line, position_cut, split_by_fraction
from scratchlm.data.tasks import ALWAYS_ON, DOC_RECORD, DROP_REASONS, TASKS_DIR, band_file, read_task, task_name
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json, remove_outputs
from scratchlm.sources import SHOWN_PROBLEMS, SourceStats

# Fields every task of one data directory must agree on (named when they do not).
_SHARED_FIELDS = ("num_tasks", "plan", "inputs", "settings", "tokenizer_hash", "vocab_size", "eot_id")


def load_tasks(out_dir: Path) -> list[dict[str, Any]]:
    """The records of all tasks of `out_dir`, checked complete and consistent."""
    tasks_dir = out_dir / TASKS_DIR
    if not tasks_dir.is_dir():
        raise ScratchLMError(f"{out_dir} holds no data tasks to finalize (no {TASKS_DIR}/; run `scratchlm data "
                             f"prepare ... --num-tasks N --task-index I -o {out_dir}` first)")
    found = sorted(p for p in tasks_dir.iterdir() if p.is_dir() and p.name.startswith("task_"))
    if not found:
        raise ScratchLMError(f"{tasks_dir} holds no finished task")
    records = [read_task(path) for path in found]
    first = records[0]
    for record, path in zip(records, found):
        differing = [k for k in _SHARED_FIELDS if record.get(k) != first.get(k)]
        if differing:
            raise ScratchLMError(f"{path.name} was prepared with other {', '.join(differing)} than "
                                 f"{found[0].name}; prepare all tasks with the same inputs, tokenizer and "
                                 f"settings")
    num_tasks = first["num_tasks"]
    indices = {record["task_index"] for record in records}
    missing = [i for i in range(num_tasks) if i not in indices]
    if missing:
        unfinished = {p.name.split(".")[1] for p in tasks_dir.glob(".task_*.tmp")}
        names = [task_name(i) + (" (unfinished)" if task_name(i) in unfinished else "") for i in missing]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ScratchLMError(f"{len(missing)} of {num_tasks} tasks are missing in {tasks_dir}: {shown}")
    return sorted(records, key=lambda r: r["task_index"])


class _TaskFiles:
    """The tasks' files seen as one corpus: document g is document g - starts[t] of task t."""

    def __init__(self, tasks_dir: Path, records: list[dict[str, Any]], dtype: np.dtype, num_perm: int,
                 bands: int) -> None:
        self.dirs = [tasks_dir / task_name(r["task_index"]) for r in records]
        counts = [r["documents"] for r in records]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        docs = []
        for directory, count in zip(self.dirs, counts):
            table = np.fromfile(directory / "docs.bin", dtype=DOC_RECORD)
            if len(table) != count:
                raise ScratchLMError(f"{directory}: docs.bin holds {len(table)} documents, task.json says {count}")
            docs.append(table)
        self.docs = np.concatenate(docs) if docs else np.zeros(0, DOC_RECORD)
        self.token_starts = np.concatenate(
            [np.concatenate([[0], np.cumsum(d["tokens"])[:-1]]) for d in docs if len(d)] or [np.zeros(0)]
        ).astype(np.int64)
        self.dtype, self.num_perm, self.bands = dtype, num_perm, bands
        self._token_files: dict[int, Any] = {}

    def _memmap(self, task: int, name: str, dtype: str, width: int) -> np.ndarray:
        count = int(self.starts[task + 1] - self.starts[task])
        if count == 0:
            return np.zeros((0, width), dtype=dtype)
        return np.memmap(self.dirs[task] / name, dtype=dtype, mode="r", shape=(count, width))

    def tokens(self, doc: int) -> np.ndarray:
        """Token ids of document `doc`, read (not memory-mapped: the pages would stay in the
        process's memory) from its task's open tokens file."""
        task = int(np.searchsorted(self.starts, doc, side="right")) - 1
        if task not in self._token_files:
            self._token_files[task] = open(self.dirs[task] / "tokens.bin", "rb")
        f = self._token_files[task]
        f.seek(int(self.token_starts[doc]) * self.dtype.itemsize)
        count = int(self.docs["tokens"][doc])
        return np.frombuffer(f.read(count * self.dtype.itemsize), dtype=self.dtype)

    def close(self) -> None:
        for f in self._token_files.values():
            f.close()

    def band_column(self, band: int, docs: np.ndarray) -> np.ndarray:
        """The `band`-th band key of each of `docs` (each task wrote a file per band)."""
        column = np.concatenate([np.fromfile(directory / band_file(band), dtype="<u8")
                                 for directory in self.dirs])
        return column[docs]

    def signature_rows(self, docs: np.ndarray) -> np.ndarray:
        rows = np.empty((len(docs), self.num_perm), dtype=np.uint32)
        tasks = np.searchsorted(self.starts, docs, side="right") - 1
        for task in np.unique(tasks):
            chosen = tasks == task
            rows[chosen] = self._memmap(int(task), "signatures.bin", "<u4", self.num_perm)[docs[chosen] - self.starts[task]]
        return rows


def finalize_data(out_dir: str | Path, *, keep_tasks: bool = False, progress: bool = True,
                  tasks_seconds: float | None = None) -> dict:
    """Turn the finished tasks in `out_dir` into its data directory (manifest and shards, as
    `TokenLoader` reads them); the tasks' files are removed unless `keep_tasks`. Returns the
    manifest. `tasks_seconds` is the wall time the tasks took, for the closing table."""
    out_dir = Path(out_dir).absolute()
    started = time.perf_counter()
    records = load_tasks(out_dir)
    first = records[0]
    config = PrepareConfig.from_settings(first["settings"])
    dtype = shard_dtype(first["vocab_size"])
    bands, rows = choose_bands(config.minhash_permutations, config.near_dup_threshold)
    files = _TaskFiles(out_dir / TASKS_DIR, records, dtype, config.minhash_permutations, bands)
    docs = files.docs
    sources = first["inputs"]
    stats = _merge_sources(records, sources, config)
    dropped = {name: sum(r["dropped"][name] for r in records) for name in DROP_REASONS}
    log = _StageLog(started)
    log.add("read", sum(s.documents for s in stats), sum(s.bytes for s in stats), 0.0)
    kept = np.arange(len(docs))
    # The tasks read, clean, filter and tokenize in one pass: their time is one figure.
    log.add("clean+filter+tokenize", len(kept), int(docs["bytes"].sum()),
            tasks_seconds if tasks_seconds is not None else sum(r["seconds"] for r in records))

    if config.dedup and len(kept):
        _, first_copies = np.unique(docs["key"], return_index=True)
        kept = np.sort(first_copies)
        log.add("exact dedup", len(kept), int(docs["bytes"][kept].sum()))
        pairs = verified_pairs((files.band_column(band, kept) for band in range(bands)),
                               lambda local: files.signature_rows(kept[local]), config.near_dup_threshold)
        kept = kept[first_of_each_cluster(len(kept), pairs)]
        log.add("near dedup", len(kept), int(docs["bytes"][kept].sum()))
    if not len(kept):
        drops = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        problems = "".join(f"; {line}" for s in stats for line in s.problems())
        raise ScratchLMError(f"no documents left after filtering and dedup (read "
                             f"{sum(s.documents for s in stats)}; drops: {drops}{problems})")

    splits = _assign_splits(kept, files, sources, config, first)
    for name in ("train", "val"):
        log.add(f"split {name}", len(splits[name]), sum(_size(piece, docs) for piece in splits[name]))

    eot_id = first["eot_id"]
    with atomic_directory(out_dir, overwrite=True, what="data directory", commit_last=(MANIFEST,),
                          replaces=_previous_outputs(out_dir)) as tmp:
        try:
            split_info = _write_shards(splits, files, tmp, dtype, eot_id, config, progress)
        finally:
            files.close()
        log.add("write shards", sum(i["documents"] for i in split_info.values()),
                sum(i["bytes"] for i in split_info.values()))
        manifest = _manifest(first, config, dtype, stats, sources, dropped, records, log.rows, split_info,
                             bands, rows, time.perf_counter() - started + log.rows[1]["seconds"])
        atomic_write_json(tmp / MANIFEST, manifest)
    if not keep_tasks:
        shutil.rmtree(out_dir / TASKS_DIR, ignore_errors=True)
    return manifest


# A piece of a split: a document index, or text of the document the position split cut.
Piece = int | tuple[int, np.ndarray, int, int]  # (document, token ids, bytes, characters)


def _size(piece: Piece, docs: np.ndarray) -> int:
    return int(docs["bytes"][piece]) if isinstance(piece, (int, np.integer)) else piece[2]


def _assign_splits(kept: np.ndarray, files: _TaskFiles, sources: list[dict], config: PrepareConfig,
                   first: dict[str, Any]) -> dict[str, list[Piece]]:
    docs = files.docs
    if config.split_by_position:
        return _split_by_position(kept, files, config, first)
    if config.val_inputs:
        is_val = np.array([sources[s]["role"] == "val" for s in docs["source"][kept]], dtype=bool)
    else:
        is_val = split_by_fraction(docs["fraction"][kept], config.val_fraction)
    splits: dict[str, list[Piece]] = {"train": [int(i) for i in kept[~is_val]], "val": [int(i) for i in kept[is_val]]}
    for name, part in splits.items():
        if not part:
            raise ScratchLMError(f"no {name} documents left after filtering and dedup")
    return splits


def _split_by_position(kept: np.ndarray, files: _TaskFiles, config: PrepareConfig, first: dict[str, Any]
                       ) -> dict[str, list[Piece]]:
    """Train: everything before the cut; val: after it. The document holding the cut is decoded
    (byte-level BPE gives the cleaned text back exactly), cut at a line break, and each part
    encoded again."""
    from scratchlm.tokenizer import Tokenizer

    doc, offset = position_cut(files.docs["chars"][kept], config.val_fraction)
    tokenizer = Tokenizer.load(first["tokenizer_dir"])
    if tokenizer.fingerprint() != first["tokenizer_hash"]:
        raise ScratchLMError(f"the tokenizer at {first['tokenizer_dir']} changed since the tasks ran")
    cut = int(kept[doc])
    head, tail = cut_at_line(tokenizer.decode(files.tokens(cut).tolist()), offset)
    splits: dict[str, list[Piece]] = {"train": [int(i) for i in kept[:doc]], "val": [int(i) for i in kept[doc + 1:]]}
    for name, text, at in (("train", head, len(splits["train"])), ("val", tail, 0)):
        if text:
            ids = np.asarray(tokenizer.encode_ordinary(text), dtype=np.uint32)
            splits[name].insert(at, (cut, ids, len(text.encode("utf-8")), len(text)))
    for name, part in splits.items():
        if not part:
            raise ScratchLMError(f"split by position left an empty {name} split ({int(files.docs['chars'][kept].sum())} "
                                 f"characters, val_fraction {config.val_fraction})")
    return splits


def _write_shards(splits: dict[str, list[Piece]], files: _TaskFiles, out: Path, dtype: np.dtype, eot_id: int,
                  config: PrepareConfig, progress: bool) -> dict[str, Any]:
    info = {}
    total = sum(_size(p, files.docs) for part in splits.values() for p in part)
    with tqdm(total=total, desc="write shards", unit="B", unit_scale=True, disable=not progress) as bar:
        for name, part in splits.items():
            writer = ShardWriter(out, name, dtype, eot_id, config.shard_tokens)
            for piece in part:
                writer.add(files.tokens(piece) if isinstance(piece, int) else piece[1])
                bar.update(_size(piece, files.docs))
            shards = writer.close()
            info[name] = {"documents": len(part), "bytes": sum(_size(p, files.docs) for p in part),
                          "tokens": sum(s["tokens"] for s in shards),  # including one EOT per document
                          "shards": shards}
    return info


def _merge_sources(records: list[dict], sources: list[dict], config: PrepareConfig) -> list[SourceStats]:
    """Per input, the tasks' counts added up (each document was read by exactly one task)."""
    merged = [SourceStats(input=s["input"], files=s["files"]) for s in sources]
    seen_profile = [False] * len(sources)
    for record in records:
        for key, part in record["sources"].items():
            stats = merged[int(key)]
            stats.documents += part["documents"]
            stats.bytes += part["bytes"]
            stats.malformed += part["malformed"]
            stats.malformed_examples.extend(part["malformed_examples"])
            del stats.malformed_examples[SHOWN_PROBLEMS:]
            stats.invalid_utf8_bytes += part["invalid_utf8_bytes"]
            stats.invalid_utf8_files += [f for f in part["invalid_utf8_files"] if f not in stats.invalid_utf8_files]
            stats.binary_files += [f for f in part["binary_files"] if f not in stats.binary_files]
            if part["documents"]:
                first = not seen_profile[int(key)]
                stats.profile = part["profile"] if first or stats.profile == part["profile"] else "mixed"
                seen_profile[int(key)] = True
    for stats in merged:
        stats.profile = config.profile or stats.profile
    return merged


class _StageLog:
    """Documents, bytes and wall time after each stage, for the manifest and the closing table."""

    def __init__(self, started: float) -> None:
        self.rows: list[dict] = []
        self._last = started

    def add(self, name: str, documents: int, size: int, seconds: float | None = None) -> None:
        now = time.perf_counter()
        self.rows.append({"stage": name, "documents": int(documents), "bytes": int(size),
                          "seconds": round(seconds if seconds is not None else now - self._last, 3)})
        self._last = now


def remove_data_directory(out_dir: Path) -> None:
    """Remove what `data prepare` wrote into `out_dir` (manifest, the shards it names, tasks),
    and nothing else."""
    remove_outputs(out_dir, [*_previous_outputs(out_dir), TASKS_DIR])


def _previous_outputs(out_dir: Path) -> list[str]:
    """Files a previous `prepare` wrote into `out_dir` (named in its manifest), to remove when
    the new output does not replace them; an unreadable manifest names none."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    masks = [mask_name(name) for name in shards] if manifest.get("loss_mask") else []
    return [MANIFEST, *shards, *(index_name(name) for name in shards), *masks]


def _manifest(first: dict, config: PrepareConfig, dtype: np.dtype, stats: list[SourceStats], sources: list[dict],
              dropped: dict, records: list[dict], stages: list[dict], split_info: dict, bands: int, rows: int,
              seconds: float) -> dict:
    pii: dict[str, int] = {}
    for record in records:
        for kind, n in record["pii_replacements"].items():
            pii[kind] = pii.get(kind, 0) + n

    def source_entry(s: SourceStats, role: str) -> dict:
        return {"input": s.input, "role": role, "files": s.files, "documents": s.documents, "bytes": s.bytes,
                "profile": s.profile, "malformed": s.malformed, "malformed_examples": s.malformed_examples,
                "invalid_utf8_bytes": s.invalid_utf8_bytes, "problems": s.problems()}

    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": first["tokenizer_hash"],
        "vocab_size": first["vocab_size"],
        "eot_id": first["eot_id"],
        "dtype": dtype.name,
        "sources": [source_entry(s, source["role"]) for s, source in zip(stats, sources)],
        "filters": {
            name: {"enabled": name in ALWAYS_ON or (config.filter and name not in config.disabled_filters),
                   "profiles": list(PROFILES) if name in ALWAYS_ON else
                               [p for p, names in PROFILES.items() if name in names],
                   "dropped": dropped[name]}
            for name in DROP_REASONS
        },
        "dedup": {
            "enabled": config.dedup, "near_dup_threshold": config.near_dup_threshold,
            "minhash_permutations": config.minhash_permutations, "minhash_ngram": config.minhash_ngram,
            "lsh_bands_rows": [bands, rows],
        },
        "pii_replacements": pii,
        "stages": stages,
        "splits": split_info,
        "tasks": first["num_tasks"],
        "config": first["settings"],
        "seconds": round(seconds, 3),
    }

