"""The data stage: raw corpora -> cleaned, filtered, deduplicated, tokenized shards -> batches."""

from __future__ import annotations

from typing import Any

from scratchlm.data.prepare import PrepareConfig, format_stats_table, prepare_data
from scratchlm.data.shards import iter_documents, read_manifest

__all__ = ["PrepareConfig", "TokenLoader", "format_stats_table", "iter_documents", "prepare_data", "read_manifest"]


def __getattr__(name: str) -> Any:
    # TokenLoader needs torch; importing it lazily keeps `scratchlm data prepare` (and its
    # worker processes) free of torch's ~1 s import.
    if name == "TokenLoader":
        from scratchlm.data.loader import TokenLoader

        return TokenLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
