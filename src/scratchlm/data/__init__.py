"""The data stage: raw corpora -> cleaned, filtered, deduplicated, tokenized shards -> batches."""

from scratchlm.data.loader import TokenLoader
from scratchlm.data.prepare import PrepareConfig, format_stats_table, prepare_data
from scratchlm.data.shards import iter_documents, read_manifest

__all__ = ["PrepareConfig", "TokenLoader", "format_stats_table", "iter_documents", "prepare_data", "read_manifest"]
