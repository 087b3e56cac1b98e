"""LoRA: low-rank adapters beside frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A wrapped projection computes  y = W x + b + (alpha / rank) * B A dropout(x)  with W, b frozen,
A (rank, in) and B (out, rank) trained. B starts at zero, so a freshly wrapped model computes
exactly what the base did; A starts as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), as in
the paper's code and peft. Only A and B need gradients and optimizer state: for rank 8 on a
768-wide model that is about 1% of the parameters.

Targets name the projections the way Llama does: q, k, v, o (attention), gate, up, down (MLP).
Our attention computes q, k and v with one fused matrix `attn.qkv`; each of q, k, v gets its
own adapter on its slice of the output rows, so any subset ("q,v", the paper's choice) works
and the adapters match a Llama checkpoint's q_proj/k_proj/v_proj one to one. In a GELU MLP
`up` is `mlp.fc`, `down` is `mlp.proj` and there is no gate.

Adapter tensors are named after the projection and the target,
`blocks.{i}.attn.qkv.lora.q.A`, `blocks.{i}.mlp.proj.lora.down.B`, ..., while the base weights
keep their names (`blocks.{i}.attn.qkv.weight`): a LoRA model loads a plain state dict's
weights unchanged, and the adapters are the keys with a `.lora.` segment.

Apply LoRA before activation checkpointing, compilation and DDP wrap the blocks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import Transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_ADAPTER_SEGMENT = ".lora."


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Every projection: QLoRA (Dettmers et al. 2023) found adapting all linear layers is what
    # closes the gap to full fine-tuning; ("q", "v") is the original paper's cheaper choice.
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            _fail("rank", f"must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            _fail("alpha", f"must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            _fail("targets", f"must be a list of names from {', '.join(TARGETS)}, got {self.targets!r}")
        targets = [t.strip() for t in targets if t.strip()]
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            _fail("targets", f"unknown target(s) {', '.join(unknown)} (valid: {', '.join(TARGETS)})")
        if not targets:
            _fail("targets", f"needs at least one of {', '.join(TARGETS)}")
        # Canonical order, no repeats: equal configs compare and serialise equal.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scale(self) -> float:
        """alpha / rank: what the adapters' output is multiplied by. Fixing alpha while
        trying ranks keeps the update's size, so the learning rate need not be retuned."""
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "lora config") -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ScratchLMError(f"{source}: unknown lora field(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except ScratchLMError as exc:
            raise ScratchLMError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def _fail(field: str, problem: str) -> None:
    raise ScratchLMError(f"lora config field {field}: {problem}")


# --------------------------------------------------------------------------- modules
class LoraAdapter(nn.Module):
    """B(A(x)) for one slice of a projection's output: A (rank, in), B (out, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, in_features={self.A.shape[1]}, out_features={self.B.shape[0]}"


class LoraLinear(nn.Module):
    """A frozen linear layer plus adapters on slices of its output rows.

    `slices` splits the output rows into named parts in order: (("q", n_q), ("k", n_kv),
    ("v", n_kv)) for the fused attention projection, one part for the others. The parts among
    the config's targets get an adapter; the others pass through unchanged. The base weight and bias are
    the original layer's own Parameters under the same names, so state-dict keys do not change.
    """

    def __init__(self, base: nn.Linear, slices: tuple[tuple[str, int], ...], config: LoraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = slices
        self.scale = config.scale
        # One dropout mask per input, shared by the adapters that read it: q, k and v see the
        # same x. (peft, with three projections, draws three masks; each adapter's input is
        # dropped with the same probability either way.)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora = nn.ModuleDict({name: LoraAdapter(self.in_features, size, config.rank, **factory)
                                   for name, size in slices if name in config.targets})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        dropped = self.dropout(x)
        if len(self.slices) == 1:
            (name, _), = self.slices
            return y + self.scale * self.lora[name](dropped)
        pieces = y.split([size for _, size in self.slices], dim=-1)
        return torch.cat([piece + self.scale * self.lora[name](dropped) if name in self.lora else piece
                          for piece, (name, _) in zip(pieces, self.slices)], dim=-1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, each adapter's product added into its own rows; computed in
        fp32 so merging bf16 weights rounds once, at the end."""
        merged = self.weight.float().clone()
        row = 0
        for name, size in self.slices:
            if name in self.lora:
                adapter = self.lora[name]
                merged[row:row + size] += self.scale * (adapter.B.float() @ adapter.A.float())
            row += size
        return merged.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scale={self.scale:g}")


def _projections(config: ModelConfig) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """(module path inside a block, its named output slices) of every projection LoRA can adapt."""
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = (("attn.qkv", (("q", q_rows), ("k", kv_rows), ("v", kv_rows))),
                 ("attn.out", (("o", config.d_model),)))
    if config.mlp == "swiglu":
        return attention + (("mlp.gate", (("gate", config.d_ff),)), ("mlp.up", (("up", config.d_ff),)),
                            ("mlp.proj", (("down", config.d_model),)))
    return attention + (("mlp.fc", (("up", config.d_ff),)), ("mlp.proj", (("down", config.d_model),)))


def _check_targets(model_config: ModelConfig, lora_config: LoraConfig) -> None:
    available = {name for _, slices in _projections(model_config) for name, _ in slices}
    missing = [t for t in lora_config.targets if t not in available]
    if missing:
        raise ScratchLMError(f"lora config field targets: {', '.join(missing)} does not exist in a "
                             f"{model_config.mlp} MLP (valid: {', '.join(t for t in TARGETS if t in available)})")


# --------------------------------------------------------------------------- applying
def apply_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Freeze every parameter of `model` and wrap the target projections with adapters, in
    place; returns `model`. Only the adapters' A and B then require gradients."""
    _check_targets(model.config, config)
    if has_lora(model):
        raise ScratchLMError("the model already has LoRA adapters (merge them first: merge_lora)")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in model.blocks:
        for path, slices in _projections(model.config):
            if not any(name in config.targets for name, _ in slices):
                continue
            parent_path, attribute = path.split(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, attribute, LoraLinear(getattr(parent, attribute), slices, config))
    return model


def has_lora(model: nn.Module) -> bool:
    return next(_lora_layers(model), None) is not None


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return ((name, module) for name, module in model.named_modules() if isinstance(module, LoraLinear))


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key names an adapter tensor (rather than a base weight)."""
    return _ADAPTER_SEGMENT in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their state-dict names (the wrappers that activation
    checkpointing adds strip their prefix there)."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_key(name)}


def adapter_shapes(model_config: ModelConfig, lora_config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Name -> shape of every adapter tensor that `apply_lora(Transformer(model_config),
    lora_config)` creates."""
    _check_targets(model_config, lora_config)
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(model_config.n_layers):
        for path, slices in _projections(model_config):
            in_features = model_config.d_ff if path == "mlp.proj" else model_config.d_model
            for name, rows in slices:
                if name in lora_config.targets:
                    prefix = f"blocks.{i}.{path}.lora.{name}"
                    shapes[f"{prefix}.A"] = (lora_config.rank, in_features)
                    shapes[f"{prefix}.B"] = (rows, lora_config.rank)
    return shapes


def check_adapter_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                          source: str, against: str = "the model") -> None:
    """One-line error unless `tensors` (from `source`) has exactly the `expected` names and
    shapes (those of `against`)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        def shown(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "") or "-"

        raise ScratchLMError(f"{source}: the adapter tensors do not match {against} "
                             f"(missing: {shown(missing)}; unexpected: {shown(unexpected)})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ScratchLMError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                 f"{against} needs {tuple(expected[name])}")


def check_lora_model(model: nn.Module, config: LoraConfig) -> None:
    """One-line error unless the model's adapters are the ones `config` describes: the same
    names and shapes (rank, targets) and the same scale (alpha / rank)."""
    against = f"the lora config (rank {config.rank}, targets {','.join(config.targets)})"
    check_adapter_tensors(lora_state_dict(model), adapter_shapes(model.config, config), "the model", against)
    scales = {layer.scale for _, layer in _lora_layers(model)}
    if scales != {config.scale}:
        raise ScratchLMError(f"the model: its adapters are scaled by {', '.join(f'{s:g}' for s in sorted(scales))}, "
                             f"the lora config says alpha / rank = {config.scale:g}")


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                         source: str = "adapter weights") -> None:
    """Copy adapter tensors into a LoRA model (in place), after checking that their names and
    shapes are exactly the model's adapters."""
    expected = {name: tuple(tensor.shape) for name, tensor in lora_state_dict(model).items()}
    if not expected:
        raise ScratchLMError(f"{source}: the model has no LoRA adapters to load them into (apply_lora first)")
    check_adapter_tensors(tensors, expected, source)
    # Through load_state_dict rather than by module path: wrapped blocks (activation
    # checkpointing) map the plain names back to their own. Not strict: the base weights
    # are deliberately absent.
    model.load_state_dict(tensors, strict=False)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold the adapters into the base weights, in place (as peft's merge_and_unload): every
    LoraLinear becomes a plain nn.Linear holding W + scale * B @ A, and every parameter
    requires gradients again, as in any plain Transformer. Returns `model`."""
    layers = list(_lora_layers(model))
    if not layers:
        raise ScratchLMError("the model has no LoRA adapters to merge")
    for name, layer in layers:
        # Built on the meta device (nothing allocated): its weight and bias are replaced.
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        merged.weight = nn.Parameter(layer.merged_weight())
        if layer.bias is not None:
            merged.bias = layer.bias
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, merged)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- reporting
@dataclass(frozen=True)
class TrainableParams:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def memory_saved_bytes(self, bytes_per_param: int = 12) -> int:
        """Training memory the frozen parameters do not need: by default an fp32 gradient and
        AdamW's two fp32 moments each (4 + 8 bytes; their weights are still held)."""
        return (self.total - self.trainable) * bytes_per_param

    def describe(self) -> str:
        return (f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.2f}%); "
                f"frozen weights need no gradients or optimizer state "
                f"(~{self.memory_saved_bytes() / 2**30:.2f} GiB saved)")


def count_trainable(model: nn.Module) -> TrainableParams:
    """Parameters that require gradients, and all of them (a tied head counted once)."""
    parameters = list(model.parameters())  # deduplicated: a tied weight appears once
    return TrainableParams(trainable=sum(p.numel() for p in parameters if p.requires_grad),
                           total=sum(p.numel() for p in parameters))
