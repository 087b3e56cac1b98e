"""Compute-optimal planning: how big a model, how many tokens, how long, how much memory.

Given a compute budget C (FLOPs, or GPU-hours at an assumed MFU) or a model size N:
- the Chinchilla rule of thumb, D = 20 N tokens with C = 6 N D (Hoffmann et al. 2022);
- the minimum of Hoffmann et al.'s fitted loss (their approach 3, eq. 10)
      L(N, D) = E + A / N^alpha + B / D^beta,  E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
  under C = 6 N D, which has the closed form (their eq. 4)
      N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
      G = (alpha A / (beta B))^(1/(alpha+beta));
- the training time on the named GPUs at the MFU;
- memory per GPU for plain data parallel (DDP) versus FSDP over the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.errors import ScratchLMError
from scratchlm.model.accounting import (
    GPU_MEMORY_BYTES,
    GPU_PEAK_FLOPS,
    count_params,
    estimate_training_memory,
    gpu_key,
)
from scratchlm.model.config import ModelConfig

TOKENS_PER_PARAM = 20.0
CHINCHILLA_FIT = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclass(frozen=True)
class Plan:
    compute_flops: float
    chinchilla_params: float
    chinchilla_tokens: float
    chinchilla_loss: float          # the fitted law evaluated at the 20-tokens-per-param point
    fitted_params: float
    fitted_tokens: float
    fitted_loss: float
    gpu: str
    gpus: int
    mfu: float
    training_seconds: float         # C on `gpus` GPUs at `mfu`
    model_shape: ModelConfig        # a Llama-style shape of about chinchilla_params, for memory
    seq_len: int
    micro_batch: int
    activation_checkpointing: bool
    memory_ddp: dict[str, float]    # bytes per GPU by component (estimate_training_memory)
    memory_fsdp: dict[str, float]
    gpu_memory_bytes: float


def fitted_loss(n_params: float, n_tokens: float) -> float:
    f = CHINCHILLA_FIT
    return f["E"] + f["A"] / n_params ** f["alpha"] + f["B"] / n_tokens ** f["beta"]


def fitted_optimum(compute_flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising the fitted loss under C = 6 N D (closed form above)."""
    f = CHINCHILLA_FIT
    a, b = f["alpha"], f["beta"]
    g = (a * f["A"] / (b * f["B"])) ** (1 / (a + b))
    n_opt = g * (compute_flops / 6) ** (b / (a + b))
    return n_opt, compute_flops / (6 * n_opt)


def model_shape_for(n_params: float, vocab_size: int, seq_len: int) -> ModelConfig:
    """A Llama-style shape with about `n_params` parameters: head dimension 64 and
    d_model = 64 * n_layers, an aspect ratio inside the flat optimum Kaplan et al. 2020 (fig. 5)
    found, and that of GPT-2 small (768 / 12)."""
    def shape(n_layers: int) -> ModelConfig:
        return ModelConfig.from_preset("tiny", vocab_size=vocab_size, context_length=seq_len,
                                       d_model=64 * n_layers, n_layers=n_layers,
                                       n_heads=n_layers, n_kv_heads=n_layers, d_ff=None)
    return min((shape(n) for n in range(1, 257)),
               key=lambda c: abs(count_params(c).total - n_params))


def plan(*, flops: float | None = None, gpu_hours: float | None = None,
         params: float | None = None, gpu: str = "H100", mfu: float = 0.4, gpus: int = 1,
         seq_len: int = 2048, micro_batch: int = 8, vocab_size: int = 50257,
         activation_checkpointing: bool = False) -> Plan:
    """Plan from exactly one of: a FLOP budget, GPU-hours on `gpu` at `mfu`, or a model size
    (then the budget is that of training it on 20 tokens per parameter)."""
    if sum(x is not None for x in (flops, gpu_hours, params)) != 1:
        raise ScratchLMError("give exactly one of --flops, --gpu-hours, --params")
    if not 0 < mfu <= 1:
        raise ScratchLMError(f"mfu must be in (0, 1], got {mfu}")
    if gpus < 1:
        raise ScratchLMError(f"gpus must be >= 1, got {gpus}")
    for name, value in (("flops", flops), ("gpu_hours", gpu_hours), ("params", params)):
        if value is not None and not value > 0:
            raise ScratchLMError(f"{name} must be > 0, got {value}")
    key = gpu_key(gpu)
    peak = GPU_PEAK_FLOPS[key]
    if flops is not None:
        compute = flops
    elif gpu_hours is not None:
        compute = gpu_hours * 3600 * peak * mfu
    else:
        compute = 6 * params * TOKENS_PER_PARAM * params
    # C = 6 N D with D = 20 N  =>  N = sqrt(C / 120).
    n_chin = (compute / (6 * TOKENS_PER_PARAM)) ** 0.5
    d_chin = TOKENS_PER_PARAM * n_chin
    n_fit, d_fit = fitted_optimum(compute)
    shape = model_shape_for(n_chin, vocab_size, seq_len)
    memory = {sharding: estimate_training_memory(
                  shape, micro_batch, seq_len, world_size=gpus, sharding=sharding,
                  activation_checkpointing=activation_checkpointing)
              for sharding in ("ddp", "fsdp")}
    return Plan(
        compute_flops=compute, chinchilla_params=n_chin, chinchilla_tokens=d_chin,
        chinchilla_loss=fitted_loss(n_chin, d_chin), fitted_params=n_fit, fitted_tokens=d_fit,
        fitted_loss=fitted_loss(n_fit, d_fit), gpu=key, gpus=gpus, mfu=mfu,
        training_seconds=compute / (gpus * peak * mfu), model_shape=shape, seq_len=seq_len,
        micro_batch=micro_batch, activation_checkpointing=activation_checkpointing,
        memory_ddp=memory["ddp"], memory_fsdp=memory["fsdp"],
        gpu_memory_bytes=GPU_MEMORY_BYTES[key],
    )
