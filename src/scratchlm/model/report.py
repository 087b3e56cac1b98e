"""Plain-text tables for `scratchlm model info` and `scratchlm plan`, and number parsing."""

from __future__ import annotations

import re

from scratchlm.errors import ScratchLMError
from scratchlm.model.accounting import count_params, estimate_training_memory, flops_per_token
from scratchlm.model.config import ModelConfig
from scratchlm.model.plan import Plan

_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_quantity(text: str, what: str) -> float:
    """"5.88e23", "124M", "1.4T", "70B" -> float.

    A sign is read too, so that "-5" reaches the caller's range check ("must be > 0") instead of
    being reported as unreadable."""
    match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*", text, re.IGNORECASE)
    if not match:
        raise ScratchLMError(f"{what}: cannot read {text!r} as a number (e.g. 5.9e23, 124M, 1.4T)")
    return float(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def gib(n_bytes: float) -> str:
    if 0 < n_bytes < 2**30:
        return f"{n_bytes / 2**20:,.1f} MiB"
    return f"{n_bytes / 2**30:,.1f} GiB"


def significant(x: float) -> str:
    """Three significant figures, with thousands separators rather than an exponent for large
    values: 0.00267, 2.67, 267, 2,670, 2,670,000 (tiny budgets no longer print as 0)."""
    if abs(x) >= 100:
        return f"{float(f'{x:.3g}'):,.0f}"
    return f"{x:.3g}"


def duration(seconds: float) -> str:
    for scale, unit in ((365 * 86400, "years"), (86400, "days"), (3600, "hours"), (60, "minutes")):
        if seconds >= scale:
            return f"{seconds / scale:,.1f} {unit}"
    return f"{significant(seconds)} seconds"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def model_info(config: ModelConfig, title: str, batch_size: int = 1) -> str:
    counts = count_params(config)
    architecture = [(name, str(value)) for name, value in config.to_dict().items()]
    architecture.insert(architecture.index(("n_kv_heads", str(config.n_kv_heads))) + 1,
                        ("head_dim", str(config.head_dim)))
    seq = config.context_length
    memory = estimate_training_memory(config, batch_size, seq)
    sizes = [
        ("parameters", f"{counts.total:,} ({human(counts.total)})"),
        ("non-embedding", f"{counts.non_embedding:,} ({human(counts.non_embedding)})"),
        ("embedding", f"{counts.embedding:,}"),
        ("per block", f"{counts.per_block:,}"),
        (f"training FLOPs/token @{seq}", f"{flops_per_token(config, seq):,.0f} "
                                         f"({human(flops_per_token(config, seq), 'FLOP')})"),
        (f"training memory, batch {batch_size}x{seq}",
         f"{gib(memory['total'])} (weights {gib(memory['weights'])}, grads {gib(memory['gradients'])}, "
         f"AdamW {gib(memory['optimizer'])}, activations {gib(memory['activations'])})"),
    ]
    return f"{title}\n{_rows(architecture)}\n\n{_rows(sizes)}"


def plan_table(p: Plan) -> str:
    budget = [
        ("compute", f"{p.compute_flops:.3g} FLOPs"),
        ("Chinchilla (20 tokens/param)", f"N = {human(p.chinchilla_params)} params, "
                                         f"D = {human(p.chinchilla_tokens)} tokens, "
                                         f"fitted loss {p.chinchilla_loss:.3f}"),
        ("Hoffmann et al. fitted law", f"N = {human(p.fitted_params)} params, "
                                       f"D = {human(p.fitted_tokens)} tokens, "
                                       f"loss {p.fitted_loss:.3f}"),
        ("training time", f"{duration(p.training_seconds)} on {p.gpus} x {p.gpu} at "
                          f"{p.mfu:.0%} MFU ({significant(p.training_seconds * p.gpus / 3600)} GPU-hours)"),
    ]
    s = p.model_shape
    shape = (f"{_count(s.n_layers, 'layer')} x d_model {s.d_model}, {_count(s.n_heads, 'head')}, "
             f"d_ff {s.d_ff}, vocab {s.vocab_size} ({human(count_params(s).total)} params)")
    header = (f"memory per GPU (micro-batch {p.micro_batch} x {p.seq_len}, "
              f"{'with' if p.activation_checkpointing else 'no'} activation checkpointing; "
              f"{p.gpu} has {gib(p.gpu_memory_bytes)}):")
    components = ("weights", "gradients", "optimizer", "fsdp_gathered", "activations", "total")
    lines = [f"  {'':<14}{'DDP':>14}{f'FSDP x{p.gpus}':>14}"]
    for name in components:
        lines.append(f"  {name:<14}{gib(p.memory_ddp[name]):>14}{gib(p.memory_fsdp[name]):>14}")
    fits = [f"{label} {'fits' if m['total'] <= p.gpu_memory_bytes else 'does NOT fit'}"
            for label, m in (("DDP", p.memory_ddp), ("FSDP", p.memory_fsdp))]
    return "\n".join([_rows(budget), "", f"model shape for memory: {shape}", header, *lines,
                      f"  ({', '.join(fits)})"])
