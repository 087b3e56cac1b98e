"""Counting: parameters, training FLOPs per token, training memory, and GPU peak throughput.

Everything here is computed from a ModelConfig alone (no model is built), so sizing a 1B
model is instant. Tests check the counts against an instantiated Transformer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendors' data sheets.
# MFU = achieved model FLOP/s / this peak (Chowdhery et al. 2022, PaLM, appendix B).
GPU_PEAK_FLOPS: dict[str, float] = {
    "H100": 989.4e12,      # H100 SXM5
    "H100-PCIE": 756.5e12,
    "H200": 989.4e12,      # same compute die as H100 SXM, more and faster memory
    "A100": 312e12,        # 40 GB and 80 GB alike
    "L4": 121e12,
    "RTX4090": 165.2e12,   # with fp32 accumulation
    "B200": 2250e12,
    "MI300X": 1307.4e12,
}
GPU_MEMORY_BYTES: dict[str, float] = {
    "H100": 80 * 2**30, "H100-PCIE": 80 * 2**30, "H200": 141 * 2**30, "A100": 80 * 2**30,
    "L4": 24 * 2**30, "RTX4090": 24 * 2**30, "B200": 180 * 2**30, "MI300X": 192 * 2**30,
}
# How torch.cuda.get_device_name() spells them (e.g. "NVIDIA H100 80GB HBM3"), most specific first.
_DEVICE_NAME_PATTERNS = [
    (r"H200", "H200"), (r"H100.*PCIE", "H100-PCIE"), (r"H100", "H100"), (r"A100", "A100"),
    (r"\bL4\b", "L4"), (r"4090", "RTX4090"), (r"B200", "B200"), (r"MI300X", "MI300X"),
]


def gpu_key(name: str) -> str:
    """Our table key for a user-given GPU name ("h100", "A100") or a CUDA device name."""
    upper = name.upper()
    if upper in GPU_PEAK_FLOPS:
        return upper
    for pattern, key in _DEVICE_NAME_PATTERNS:
        if re.search(pattern, upper):
            return key
    raise ScratchLMError(f"unknown GPU {name!r}; known: {', '.join(GPU_PEAK_FLOPS)}")


def peak_flops_for_device(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device name, or None when the GPU is not in the table."""
    try:
        return GPU_PEAK_FLOPS[gpu_key(device_name)]
    except ScratchLMError:
        return None


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    total: int            # every parameter, tied weights once
    non_embedding: int    # blocks + final norm: Kaplan et al.'s N
    embedding: int        # token (+ position) embeddings, + the LM head when untied
    per_block: int


def _norm_params(config: ModelConfig, dim: int) -> int:
    return dim * (2 if config.norm == "layernorm" and config.bias else 1)


def _linear_params(config: ModelConfig, fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + (fan_out if config.bias else 0)


def count_params(config: ModelConfig) -> ParamCounts:
    d, f = config.d_model, config.d_ff
    qkv_dim = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    attention = _linear_params(config, d, qkv_dim) + _linear_params(config, d, d)
    if config.qk_norm:
        attention += 2 * _norm_params(config, config.head_dim)
    n_mlp_in = 2 if config.mlp == "swiglu" else 1
    mlp = n_mlp_in * _linear_params(config, d, f) + _linear_params(config, f, d)
    per_block = attention + mlp + 2 * _norm_params(config, d)
    non_embedding = config.n_layers * per_block + _norm_params(config, d)
    embedding = config.vocab_size * d
    if config.position == "learned":
        embedding += config.context_length * d
    if not config.tie_embeddings:
        embedding += config.vocab_size * d
    return ParamCounts(non_embedding + embedding, non_embedding, embedding, per_block)


# --------------------------------------------------------------------------- FLOPs
def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 * (N + V * d)  +  12 * L * d_attn * seq_len

    The first term is Kaplan et al. 2020 (section 2.1): each parameter used in a matmul costs
    2 FLOPs per token forward and 4 backward. N is the non-embedding count; V * d adds the
    LM head matmul (real compute even when its weights are tied to the embedding lookup,
    which itself is free). The second term is attention's two sequence-length matmuls
    (Q K^T and scores V), counted over the full T x T square as in PaLM (Chowdhery et al. 2022,
    appendix B: 6N + 12 L H Q T) so MFU figures are comparable with published ones, although
    causal masking lets fused kernels skip about half of it. Norms, softmax and the
    elementwise ops are ignored (well under 1% at these sizes).
    """
    counts = count_params(config)
    matmul_params = counts.non_embedding + config.vocab_size * config.d_model
    d_attn = config.n_heads * config.head_dim
    return 6.0 * matmul_params + 12.0 * config.n_layers * d_attn * seq_len


# --------------------------------------------------------------------------- memory
def _activation_elements_per_token(config: ModelConfig) -> int:
    """Values one block saves for the backward pass, per token.

    Itemised after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", section 4.1) for fused attention, which stores its output and
    log-sum-exp instead of the T x T scores: two norm inputs and outputs (4 d), Q/K/V
    ((H + 2K) D) plus their rotated copies with RoPE ((H + K) D), the attention output
    (H D), and the MLP hidden values (2 f for GELU: pre- and post-activation; 4 f for SwiGLU:
    gate, up, silu(gate) and their product). Dropout masks are left out.
    """
    d, f, hd = config.d_model, config.d_ff, config.head_dim
    qkv = (config.n_heads + 2 * config.n_kv_heads) * hd
    rope = (config.n_heads + config.n_kv_heads) * hd if config.position == "rope" else 0
    mlp_hidden = (4 if config.mlp == "swiglu" else 2) * f
    return 4 * d + qkv + rope + config.n_heads * hd + mlp_hidden


def estimate_training_memory(
    config: ModelConfig, batch_size: int, seq_len: int, *, world_size: int = 1,
    sharding: str = "ddp", activation_checkpointing: bool = False,
    master_bytes: int = 4, optimizer_states: int = 2, activation_bytes: int = 2,
) -> dict[str, float]:
    """Approximate peak training memory per device, in bytes, by component.

    Mixed precision as the training stage runs it: fp32 weights and gradients
    (`master_bytes`), AdamW's two fp32 moments (`optimizer_states`), bf16 activations
    (`activation_bytes`), fp32 logits. `batch_size` is the micro-batch per device.
    "ddp" replicates weights/gradients/optimizer on every device; "fsdp" (ZeRO-3) shards all
    three over `world_size` and additionally holds about two blocks unsharded at a time
    (the one computing and the one prefetched: bf16 weights plus fp32 gradients). Activation checkpointing keeps only each
    block's input and recomputes one block at a time during backward.
    """
    if sharding not in ("ddp", "fsdp"):
        raise ScratchLMError(f"sharding must be ddp or fsdp, got {sharding!r}")
    counts = count_params(config)
    shards = world_size if sharding == "fsdp" else 1
    weights = counts.total * master_bytes / shards
    gradients = counts.total * master_bytes / shards
    optimizer = counts.total * master_bytes * optimizer_states / shards
    gathered = (2 * counts.per_block * (activation_bytes + master_bytes)
                if sharding == "fsdp" and shards > 1 else 0.0)
    tokens = batch_size * seq_len
    per_block = _activation_elements_per_token(config) * tokens * activation_bytes
    if activation_checkpointing:
        blocks = config.n_layers * config.d_model * tokens * activation_bytes + per_block
    else:
        blocks = config.n_layers * per_block
    # The fp32 logits and the cross-entropy's saved softmax dominate for small models.
    logits = 2 * tokens * config.vocab_size * 4
    activations = blocks + logits + config.d_model * tokens * activation_bytes
    total = weights + gradients + optimizer + gathered + activations
    return dict(weights=weights, gradients=gradients, optimizer=optimizer,
                fsdp_gathered=gathered, activations=activations, total=total)
