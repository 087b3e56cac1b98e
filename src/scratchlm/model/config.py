"""ModelConfig: every architectural choice of the transformer, validated at construction.

One dataclass covers both families we build:
- GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
- Llama-style: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
Presets are plain keyword dicts so `from_preset(name, **overrides)` can change any field
(typically vocab_size, to match the tokenizer actually trained).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scratchlm.errors import ScratchLMError

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")

_GPT2 = dict(
    vocab_size=50257, context_length=1024, norm="layernorm", norm_eps=1e-5, position="learned",
    mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False, dropout=0.0,
)
# Llama-style presets tie the embeddings too (as SmolLM and Llama 3.2 1B do): at these sizes
# the vocabulary matrix is a large share of the parameters and tying costs little quality.
_LLAMA = dict(
    norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0, mlp="swiglu",
    bias=False, tie_embeddings=True, qk_norm=False, dropout=0.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072),
    "gpt2-350m": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=4096),
    # ~1M parameters: fast enough for unit tests and CPU demos.
    "tiny": dict(_LLAMA, vocab_size=2048, context_length=256, d_model=128, n_layers=4,
                 n_heads=4, n_kv_heads=2, d_ff=384),
    # ~15M parameters: TinyStories-class.
    "small": dict(_LLAMA, vocab_size=8192, context_length=512, d_model=384, n_layers=8,
                  n_heads=6, n_kv_heads=2, d_ff=1024),
    "llama-124m": dict(_LLAMA, vocab_size=50257, context_length=1024, d_model=768, n_layers=12,
                       n_heads=12, n_kv_heads=4, d_ff=2304),
    "llama-350m": dict(_LLAMA, vocab_size=50257, context_length=2048, d_model=1024, n_layers=24,
                       n_heads=16, n_kv_heads=4, d_ff=2816),
    "llama-1b": dict(_LLAMA, vocab_size=50257, context_length=2048, d_model=2048, n_layers=16,
                     n_heads=32, n_kv_heads=8, d_ff=8192),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    d_ff: int | None = None  # None: 4*d_model (gelu) or 8/3*d_model rounded up to 64 (swiglu)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    qk_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Fill the derived defaults first so every later check sees concrete numbers.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", _default_d_ff(self.d_model, self.mlp))
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads",
                     "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, f"must be a positive integer, got {value!r}")
        for name, allowed in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                _fail(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            _fail("d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            _fail("n_heads", f"{self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            _fail("d_model", f"RoPE needs an even head dimension, got {self.head_dim}")
        if not self.norm_eps > 0:
            _fail("norm_eps", f"must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            _fail("rope_theta", f"must be > 0, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ScratchLMError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> ModelConfig:
        """Build from a JSON/YAML mapping, naming any unknown field instead of a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ScratchLMError(f"{source}: unknown model field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in values)
        if missing:
            raise ScratchLMError(f"{source}: missing model field(s) {', '.join(missing)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the shapes alone (equals Transformer.num_params)."""
        from scratchlm.model.accounting import count_params

        counts = count_params(self)
        return counts.non_embedding if non_embedding else counts.total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward); see accounting.flops_per_token."""
        from scratchlm.model.accounting import flops_per_token

        return flops_per_token(self, seq_len if seq_len is not None else self.context_length)


def _default_d_ff(d_model: int, mlp: str) -> int:
    if mlp == "swiglu":
        # SwiGLU has three matrices instead of two; 8/3*d keeps the parameter count of a
        # 4*d GELU MLP (Shazeer 2020), rounded up to a multiple of 64 for matmul efficiency.
        return -(-(8 * d_model // 3) // 64) * 64
    return 4 * d_model


def _fail(field: str, problem: str) -> None:
    raise ScratchLMError(f"model config field {field}: {problem}")
