"""The model stage: a configurable decoder-only transformer (GPT-2 and Llama families).

Configs, presets, accounting and planning need no torch; the transformer and model
directories are imported on first use, so `scratchlm --help` and `scratchlm plan` start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from scratchlm.model.accounting import (
    GPU_PEAK_FLOPS,
    count_params,
    estimate_training_memory,
    flops_per_token,
    peak_flops_for_device,
)
from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.plan import Plan, plan

_LAZY = {
    "KVCache": "scratchlm.model.transformer",
    "Transformer": "scratchlm.model.transformer",
    "LoraConfig": "scratchlm.model.lora",
    "apply_lora": "scratchlm.model.lora",
    "merge_lora": "scratchlm.model.lora",
    "load_config": "scratchlm.model.directory",
    "load_model": "scratchlm.model.directory",
    "merge_adapter": "scratchlm.model.directory",
    "save_adapter": "scratchlm.model.directory",
    "save_model": "scratchlm.model.directory",
}

__all__ = [
    "GPU_PEAK_FLOPS", "PRESETS", "KVCache", "LoraConfig", "ModelConfig", "Plan", "Transformer",
    "apply_lora", "count_params", "estimate_training_memory", "flops_per_token", "load_config",
    "load_model", "merge_adapter", "merge_lora", "peak_flops_for_device", "plan", "save_adapter",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
