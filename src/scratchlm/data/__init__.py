"""The data stage: raw corpora -> cleaned, filtered, deduplicated, tokenized shards -> batches.

Names are imported on first use: the loader needs torch, preparation numpy and tqdm, and
neither should slow `scratchlm --help` (or `data prepare`'s worker processes, torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PrepareConfig": "scratchlm.data.config",
    "finalize_data": "scratchlm.data.finalize",
    "format_stats_table": "scratchlm.data.prepare",
    "prepare_data": "scratchlm.data.prepare",
    "prepare_task": "scratchlm.data.prepare",
    "iter_documents": "scratchlm.data.shards",
    "read_manifest": "scratchlm.data.shards",
    "TokenLoader": "scratchlm.data.loader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
