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


# A shape whose parameter count is off from the request by more than this share is not "about"
# that size, so planning refuses rather than silently estimating memory for another model (a
# 1M request used to get a 3.27M shape). 25% keeps the estimate within a quarter, and with the
# fallback grid below every size from the smallest shape up to 1T is within it at vocabularies
# of 2,048 to 50,257 tokens (checked on a log grid; at 256 tokens a narrow band around 96K just
# above the smallest shape is not), so in practice it rejects only sizes below what the
# vocabulary's embedding alone costs, or beyond the largest shape (826B).
SHAPE_TOLERANCE = 0.25


def _llama_shape(n_layers: int, d_model: int, n_heads: int, vocab_size: int, seq_len: int) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=vocab_size, context_length=seq_len,
                                   d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                   n_kv_heads=n_heads, d_ff=None)


def _shape_name(config: ModelConfig) -> str:
    return f"{config.n_layers} layer{'' if config.n_layers == 1 else 's'}, d_model {config.d_model}"


def model_shape_for(n_params: float, vocab_size: int, seq_len: int) -> ModelConfig:
    """A Llama-style shape with about `n_params` parameters (within SHAPE_TOLERANCE).

    Preferred: head dimension 64 and d_model = 64 * n_layers, an aspect ratio inside the flat
    optimum Kaplan et al. 2020 (fig. 5) found, and that of GPT-2 small (768 / 12). That line is
    coarse for small models: each step adds a layer *and* 64 to the width, so at a 50,257-token
    vocabulary 1 -> 2 layers goes 3.27M -> 6.86M (mostly embedding), and at small vocabularies
    the blocks' cubic growth makes the first steps 2.5-6.6x. When no shape on the line is near
    enough, a fallback grid of small shapes is searched: 1-16 layers, widths 64-1024 in steps of
    32 with heads of 32 (as the `tiny` preset), aspect ratio 16-256 (a band around 64, inside the
    wide range of shapes over which Kaplan et al. found the loss changes by only a few percent).
    The line is tried first so that sizes it fits keep their GPT-2-like shapes.

    Raises ScratchLMError when no shape is within the tolerance: the request is below what the
    vocabulary's embedding alone costs, or (rarely) falls in a gap of the grid.
    """
    def off_by(config: ModelConfig) -> float:
        return abs(count_params(config).total - n_params)

    line = [_llama_shape(n, 64 * n, n, vocab_size, seq_len) for n in range(1, 257)]
    best = min(line, key=off_by)
    if off_by(best) > SHAPE_TOLERANCE * n_params:
        small = [_llama_shape(n, d, d // 32, vocab_size, seq_len)
                 for n in range(1, 17) for d in range(64, 1025, 32) if 16 <= d / n <= 256]
        best = min([best, *small], key=off_by)
    if off_by(best) <= SHAPE_TOLERANCE * n_params:
        return best
    from scratchlm.model.report import human  # here: report imports this module at its top

    smallest = line[0]
    smallest_counts = count_params(smallest)
    prefix = f"no model shape near {human(n_params)} parameters with a {vocab_size:,}-token vocabulary"
    if n_params < smallest_counts.total:
        mostly = ", mostly embedding" if smallest_counts.embedding > smallest_counts.total / 2 else ""
        raise ScratchLMError(f"{prefix}: the smallest ({_shape_name(smallest)}) has "
                             f"{human(smallest_counts.total)}{mostly}; lower --vocab-size")
    raise ScratchLMError(f"{prefix}: the closest ({_shape_name(best)}) has "
                         f"{human(count_params(best).total)}")


def plan(*, flops: float | None = None, gpu_hours: float | None = None,
         params: float | None = None, gpu: str = "H100", mfu: float = 0.4, gpus: int = 1,
         seq_len: int = 2048, micro_batch: int = 8, vocab_size: int = 50257,
         activation_checkpointing: bool = False) -> Plan:
    """Plan from exactly one of: a FLOP budget, GPU-hours on `gpu` at `mfu`, or a model size
    (then the budget is that of training it on 20 tokens per parameter)."""
    if sum(x is not None for x in (flops, gpu_hours, params)) != 1:
        raise ScratchLMError("give exactly one of --flops, --gpu-hours, --params")
    # Messages name the CLI options: `scratchlm plan` passes its values straight through.
    if not 0 < mfu <= 1:
        raise ScratchLMError(f"--mfu must be in (0, 1], got {mfu:g}")
    for option, count in (("--gpus", gpus), ("--seq-len", seq_len), ("--micro-batch", micro_batch),
                          ("--vocab-size", vocab_size)):
        if count < 1:
            raise ScratchLMError(f"{option} must be >= 1, got {count}")
    for option, value in (("--flops", flops), ("--gpu-hours", gpu_hours), ("--params", params)):
        if value is not None and not value > 0:
            raise ScratchLMError(f"{option} must be > 0, got {value:g}")
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
