"""`prepare_data`: raw inputs -> cleaned, filtered, deduplicated, split, tokenized shards.

Stages, in order (each one's documents and bytes in/out end up in the manifest and the
closing table):

  read      scratchlm.sources (the reader every command shares): files / JSON / Parquet /
            stdlib into documents, invalid UTF-8 and malformed records counted
  filter    clean.py + filters.py in worker processes: drop binary data, normalise, drop by the
            first failing filter, optionally scrub PII, and compute the exact-dedup key and
            MinHash signature
  tokenize  worker processes encode batches of documents as ordinary text (a special token's
            string in a document is text, never a boundary); the writer appends the EOT
  dedup     dedup.py in the parent: exact keys, then LSH over the signatures
  split     split.py: by hash, by position, or the explicit validation inputs

Workers return results in submission order (`Pool.imap`), so the output is byte-identical for
any number of workers. Validation inputs are read first, so when a training document
duplicates a validation one it is the training copy that dedup removes (no leakage).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from scratchlm.data.clean import clean_text
from scratchlm.data.dedup import MinHasher, choose_bands, exact_key, near_duplicate_keep_mask
from scratchlm.data.filters import (
    FILTERS, PROFILES, Blocklists, FilterConfig, check_filter_names, first_failing_filter, scrub_pii,
)
from scratchlm.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, index_name, shard_dtype
from scratchlm.data.split import split_by_hash, split_by_position
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json, check_output_directory
from scratchlm.sources import DOC_MODES, Document, SourceStats, check_inputs, iter_documents_from, looks_binary


@dataclass
class PrepareConfig:
    # --- reading
    text_field: str = "text"  # JSON/JSONL/Parquet field holding the text
    doc_mode: str = "auto"  # how plain text files become documents (sources.split_text)
    min_doc_chars: int = 1000  # doc_mode "blank": merge blocks until a document has this many
    strict_json: bool = False  # malformed JSONL records are fatal instead of skipped
    profile: str | None = None  # force "prose" or "code" filters for every input (None: per file)
    # --- filtering
    filter: bool = True  # master switch for all quality/safety filters
    disabled_filters: tuple[str, ...] = ()
    filters: FilterConfig = field(default_factory=FilterConfig)
    blocklist_words: str | None = None  # file: one word per line
    blocklist_urls: str | None = None  # file: one domain or URL per line
    scrub_pii: bool = False
    # --- dedup
    dedup: bool = True  # exact and near-duplicate removal
    near_dup_threshold: float = 0.8  # estimated Jaccard of word 5-gram sets
    minhash_permutations: int = 128
    minhash_ngram: int = 5
    # --- split
    val_inputs: tuple[str, ...] = ()  # explicit validation inputs replace the split
    val_fraction: float = 0.01
    split_by_position: bool = False  # val = the last val_fraction of the text (one long document)
    # --- tokenize / write
    workers: int | None = None  # processes; None = all CPUs
    batch_documents: int = 64  # documents per worker task
    shard_tokens: int = 50_000_000  # a shard is closed once it reaches this many tokens
    progress: bool = True  # tqdm bars on stderr

    def validate(self) -> None:
        if self.doc_mode not in DOC_MODES:
            raise ScratchLMError(f"doc_mode must be one of {', '.join(DOC_MODES)}, got {self.doc_mode!r}")
        if self.profile not in (None, *PROFILES):
            raise ScratchLMError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        check_filter_names(self.disabled_filters)
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ScratchLMError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ScratchLMError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.split_by_position and self.val_inputs:
            raise ScratchLMError("split_by_position and val_inputs exclude each other")
        for name in ("workers", "batch_documents", "shard_tokens", "minhash_permutations", "minhash_ngram"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ScratchLMError(f"{name} must be at least 1, got {value}")


# Why a document can be dropped: binary data (judged before cleaning), then the filters.
# Binary data and empty documents are dropped whatever the filter settings.
DROP_REASONS = ("binary", *FILTERS)
ALWAYS_ON = ("binary", "empty")


# --------------------------------------------------------------------------- worker side
@dataclass
class _WorkerContext:
    """Everything a worker needs, handed over once per process rather than once per task.

    With the fork start method (Linux) the children inherit it, tokenizer included, without
    pickling; the parent warms the tokenizer's encoder first so no worker rebuilds it.
    """

    config: PrepareConfig
    blocklists: Blocklists
    tokenizer: object  # scratchlm.tokenizer.Tokenizer (imported lazily: the tokenizer stage)


_CONTEXT: _WorkerContext | None = None
_MINHASHER: MinHasher | None = None


def _init_worker(context: _WorkerContext) -> None:
    global _CONTEXT, _MINHASHER
    _CONTEXT = context
    _MINHASHER = MinHasher(context.config.minhash_permutations, context.config.minhash_ngram)


@dataclass
class _Processed:
    text: str | None  # None when dropped
    dropped_by: str | None
    pii: dict[str, int]
    key: bytes
    signature: np.ndarray | None


def _process_batch(batch: list[tuple[str, str, str | None]]) -> list[_Processed]:
    """Clean, filter, scrub and fingerprint a batch of (text, profile, url)."""
    config = _CONTEXT.config
    disabled = frozenset(config.disabled_filters)
    results = []
    for text, profile, url in batch:
        reason = None
        # Always applied, filters or not. Binary data is judged before cleaning, which would
        # delete its control characters and hide what it is; an empty text has nothing to train on.
        if looks_binary(text):
            reason = "binary"
        else:
            text = clean_text(text, profile)
        if reason is None and not text:
            reason = "empty"
        elif reason is None and config.filter:
            reason = first_failing_filter(text, profile, config.filters, _CONTEXT.blocklists, disabled, url)
        if reason is not None:
            results.append(_Processed(None, reason, {}, b"", None))
            continue
        pii = {}
        if config.scrub_pii:
            text, pii = scrub_pii(text)
        signature = _MINHASHER.signature(text) if config.dedup else None
        results.append(_Processed(text, None, pii, exact_key(text), signature))
    return results


def _tokenize_batch(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(_CONTEXT.tokenizer.encode_ordinary(text), dtype=np.uint32) for text in texts]


# --------------------------------------------------------------------------- parent side
def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Runner:
    """Maps a worker function over batches in order: in-process for 1 worker, else a Pool.

    A context manager: on success the workers finish and are joined; on any error (Ctrl-C
    included) they are terminated at once rather than left to finish queued work.
    """

    def __init__(self, workers: int, context: _WorkerContext):
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context().Pool(workers, _init_worker, (context,))
        else:
            _init_worker(context)

    def imap(self, fn: Callable, batches: Iterable[list]) -> Iterator:
        return self.pool.imap(fn, batches) if self.pool else map(fn, batches)

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


class _StageLog:
    """Documents, bytes and wall time after each stage, for the manifest and the closing table."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._last = time.perf_counter()

    def add(self, name: str, texts: list[str]) -> None:
        now = time.perf_counter()
        self.rows.append({"stage": name, "documents": len(texts), "bytes": sum(_utf8_len(t) for t in texts),
                          "seconds": round(now - self._last, 3)})
        self._last = now


def _read_inputs(specs: Iterable[str], config: PrepareConfig, bar: tqdm) -> tuple[list[Document], list[SourceStats]]:
    docs, all_stats = [], []
    for spec in specs:
        stats = SourceStats(input=spec)
        for doc in iter_documents_from(spec, text_field=config.text_field, doc_mode=config.doc_mode,
                                       min_doc_chars=config.min_doc_chars, strict_json=config.strict_json,
                                       stats=stats):
            if config.profile is not None:
                doc.profile = config.profile
            docs.append(doc)
            bar.update(1)
        all_stats.append(stats)
    return docs, all_stats


def _filter_documents(docs: list[Document], runner: _Runner, config: PrepareConfig) -> tuple[list[_Processed], dict]:
    """Run the worker-side processing; returns per-document results and filter drop counts."""
    work = ((d.text, d.profile, d.url) for d in docs)
    results: list[_Processed] = []
    with tqdm(total=len(docs), desc="clean+filter", unit="doc", disable=not config.progress) as bar:
        for batch in runner.imap(_process_batch, _batches(work, config.batch_documents)):
            results.extend(batch)
            bar.update(len(batch))
    dropped = {name: 0 for name in DROP_REASONS}
    for r in results:
        if r.dropped_by:
            dropped[r.dropped_by] += 1
    return results, dropped


def _exact_dedup(indices: list[int], results: list[_Processed]) -> list[int]:
    """Indices whose normalised text was not seen before (the first occurrence is kept)."""
    seen: set[bytes] = set()
    kept = []
    for i in indices:
        if results[i].key not in seen:
            seen.add(results[i].key)
            kept.append(i)
    return kept


def _near_dedup(indices: list[int], results: list[_Processed], threshold: float) -> list[int]:
    if not indices:
        return indices
    keep = near_duplicate_keep_mask(np.stack([results[i].signature for i in indices]), threshold)
    return [i for i, k in zip(indices, keep) if k]


def _assign_splits(texts: list[str], from_val_input: list[bool], config: PrepareConfig) -> dict[str, list[str]]:
    if config.val_inputs:
        is_val = from_val_input
    elif config.split_by_position:
        train, val = split_by_position(texts, config.val_fraction)
        return {"train": train, "val": val}
    else:
        is_val = split_by_hash(texts, config.val_fraction)
    splits = {"train": [t for t, v in zip(texts, is_val) if not v], "val": [t for t, v in zip(texts, is_val) if v]}
    for name, part in splits.items():
        if not part:
            raise ScratchLMError(f"no {name} documents left after filtering and dedup")
    return splits


def _tokenize_and_write(
    splits: dict[str, list[str]], runner: _Runner, out_dir: Path, config: PrepareConfig,
    dtype: np.dtype, eot_id: int,
) -> dict:
    total_bytes = sum(_utf8_len(t) for texts in splits.values() for t in texts)
    info = {}
    with tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, disable=not config.progress) as bar:
        for split, texts in splits.items():
            writer = ShardWriter(out_dir, split, dtype, eot_id, config.shard_tokens)
            for batch_texts, batch_ids in zip(_batches(texts, config.batch_documents),
                                              runner.imap(_tokenize_batch, _batches(texts, config.batch_documents))):
                for ids in batch_ids:
                    writer.add(ids)
                bar.update(sum(_utf8_len(t) for t in batch_texts))
            shards = writer.close()
            info[split] = {
                "documents": len(texts),
                "bytes": sum(_utf8_len(t) for t in texts),
                "tokens": sum(s["tokens"] for s in shards),  # including one EOT per document
                "shards": shards,
            }
    return info


def prepare_data(
    inputs: list[str] | tuple[str, ...], tokenizer_dir: str | Path, out_dir: str | Path, *,
    config: PrepareConfig | None = None, overwrite: bool = False,
) -> dict:
    """Build a data directory from `inputs`; returns the manifest (also written as manifest.json)."""
    config = config or PrepareConfig()
    config.validate()
    out_dir = check_output_directory(out_dir, overwrite, "data directory")
    check_inputs(inputs)
    if config.val_inputs:
        check_inputs(config.val_inputs)

    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.eot_id is None:
        raise ScratchLMError(f"tokenizer {tokenizer_dir} has no <|endoftext|> token to separate documents")
    dtype = shard_dtype(tokenizer.vocab_size)
    blocklists = Blocklists.load(config.blocklist_words, config.blocklist_urls)
    workers = config.workers or os.cpu_count() or 1
    started = time.perf_counter()
    log = _StageLog()

    with tqdm(desc="read", unit="doc", disable=not config.progress) as bar:
        val_docs, val_sources = _read_inputs(config.val_inputs, config, bar)
        train_docs, train_sources = _read_inputs(inputs, config, bar)
    docs = val_docs + train_docs
    n_read, n_val_docs = len(docs), len(val_docs)
    del val_docs, train_docs  # only the cleaned texts are kept from here on (memory)
    log.add("read", [d.text for d in docs])

    tokenizer.encode("warm up")  # builds the encoder once, before workers are forked
    with _Runner(workers, _WorkerContext(config, blocklists, tokenizer)) as runner:
        results, dropped = _filter_documents(docs, runner, config)
        del docs
        survivors = [i for i, r in enumerate(results) if r.text is not None]
        log.add("clean+filter", [results[i].text for i in survivors])
        if config.dedup:
            survivors = _exact_dedup(survivors, results)
            log.add("exact dedup", [results[i].text for i in survivors])
            survivors = _near_dedup(survivors, results, config.near_dup_threshold)
            log.add("near dedup", [results[i].text for i in survivors])
        if not survivors:
            raise ScratchLMError(f"no documents left after filtering and dedup (read {n_read}; "
                                 f"drops: {', '.join(f'{k}={v}' for k, v in dropped.items() if v) or 'none'})")

        splits = _assign_splits([results[i].text for i in survivors], [i < n_val_docs for i in survivors], config)
        for name, part in splits.items():
            log.add(f"split {name}", part)

        with atomic_directory(out_dir, overwrite, "data directory", commit_last=(MANIFEST,),
                              replaces=_previous_outputs(out_dir)) as tmp_dir:
            split_info = _tokenize_and_write(splits, runner, tmp_dir, config, dtype, tokenizer.eot_id)
            log.add("tokenize+write", [t for part in splits.values() for t in part])
            manifest = _manifest(tokenizer, dtype, config, train_sources, val_sources, dropped,
                                 results, survivors, log.rows, split_info, time.perf_counter() - started)
            atomic_write_json(tmp_dir / MANIFEST, manifest)
    return manifest


def _previous_outputs(out_dir: Path) -> list[str]:
    """Files a previous `prepare` wrote into `out_dir` (named in its manifest), to remove when
    the new output does not replace them; an unreadable manifest names none."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [MANIFEST, *shards, *(index_name(name) for name in shards)]


def _manifest(tokenizer, dtype: np.dtype, config: PrepareConfig, train_sources: list[SourceStats],
              val_sources: list[SourceStats], dropped: dict, results: list[_Processed], survivors: list[int],
              stages: list[dict], split_info: dict, seconds: float) -> dict:
    pii = {}
    for i in survivors:
        for kind, n in results[i].pii.items():
            pii[kind] = pii.get(kind, 0) + n

    def source_entry(stats: SourceStats, role: str) -> dict:
        return {"input": stats.input, "role": role, "files": stats.files, "documents": stats.documents,
                "bytes": stats.bytes, "profile": config.profile or stats.profile,
                "malformed": stats.malformed, "malformed_examples": stats.malformed_examples,
                "invalid_utf8_bytes": stats.invalid_utf8_bytes, "problems": stats.problems()}

    # Through JSON once, so the returned manifest equals what read_manifest gives (tuples -> lists).
    config_dict = json.loads(json.dumps(dataclasses.asdict(config)))
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "sources": [source_entry(s, "val") for s in val_sources] + [source_entry(s, "train") for s in train_sources],
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
            "lsh_bands_rows": list(choose_bands(config.minhash_permutations, config.near_dup_threshold)),
        },
        "pii_replacements": pii,
        "stages": stages,
        "splits": split_info,
        "config": config_dict,
        "seconds": round(seconds, 3),
    }


def format_stats_table(manifest: dict) -> str:
    """The closing summary: documents and bytes after each stage, drops per filter, tokens."""
    lines = [f"{'stage':<16}{'documents':>12}{'MB':>11}{'seconds':>10}"]
    for row in manifest["stages"]:
        lines.append(f"{row['stage']:<16}{row['documents']:>12,}{row['bytes'] / 1e6:>11.3f}{row['seconds']:>10.2f}")
    drops = [(name, f["dropped"]) for name, f in manifest["filters"].items() if f["dropped"]]
    if drops:
        lines.append("dropped by filter: " + ", ".join(f"{name} {n:,}" for name, n in drops))
    for source in manifest["sources"]:
        lines.extend(source.get("problems", []))
    if manifest["pii_replacements"]:
        lines.append("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in manifest["pii_replacements"].items()))
    for split, info in manifest["splits"].items():
        ratio = info["bytes"] / max(1, info["tokens"] - info["documents"])
        lines.append(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shard(s), "
                     f"{ratio:.2f} bytes/token")
    lines.append(f"{manifest['seconds']:.1f} s")
    return "\n".join(lines)
