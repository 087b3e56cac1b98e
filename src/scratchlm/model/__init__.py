"""The model stage: a configurable decoder-only transformer (GPT-2 and Llama families)."""

from scratchlm.model.accounting import (
    GPU_PEAK_FLOPS,
    count_params,
    estimate_training_memory,
    flops_per_token,
    peak_flops_for_device,
)
from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.directory import load_config, load_model, save_model
from scratchlm.model.plan import Plan, plan
from scratchlm.model.transformer import KVCache, Transformer

__all__ = [
    "GPU_PEAK_FLOPS", "PRESETS", "KVCache", "ModelConfig", "Plan", "Transformer", "count_params",
    "estimate_training_memory", "flops_per_token", "load_config", "load_model",
    "peak_flops_for_device", "plan", "save_model",
]
