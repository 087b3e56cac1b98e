"""Evaluation: bits per byte beside gzip and xz, and the standard benchmarks scored as
lm-evaluation-harness scores them (`scratchlm eval`).

Names are imported on first use, so `scratchlm --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BitsPerByte": "scratchlm.eval.bpb",
    "evaluate_bits_per_byte": "scratchlm.eval.bpb",
    "CompressionResult": "scratchlm.eval.compression",
    "compression_bits_per_byte": "scratchlm.eval.compression",
    "Score": "scratchlm.eval.scoring",
    "loglikelihoods": "scratchlm.eval.scoring",
    "TASKS": "scratchlm.eval.suite",
    "evaluate": "scratchlm.eval.suite",
    "results_table": "scratchlm.eval.suite",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
