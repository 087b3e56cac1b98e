"""PrepareConfig: every setting of `data prepare`, validated, and rebuilt from a task's record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from scratchlm.data.filters import PROFILES, FilterConfig, check_filter_names
from scratchlm.errors import ScratchLMError
from scratchlm.sources import DOC_MODES


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
    workers: int | None = None  # processes running tasks; None = all CPUs
    batch_documents: int = 64  # documents processed at a time inside a task
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

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PrepareConfig:
        """The config a task recorded (JSON turned its tuples into lists)."""
        values = _fields_from_json(cls, settings)
        values["filters"] = FilterConfig(**_fields_from_json(FilterConfig, settings.get("filters", {})))
        return cls(**values)


def _fields_from_json(kind: type, values: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    return {name: tuple(value) if str(fields[name].type).startswith("tuple") else value
            for name, value in values.items() if name in fields}
