"""The transformer's parts as small modules: norms, RoPE, attention, MLPs and the block.

Shapes: B batch, T new tokens, S keys attended to (T plus any cached prefix), H query heads,
K key/value heads, D head dimension, C model width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.model.config import ModelConfig

if TYPE_CHECKING:
    from scratchlm.model.transformer import KVCache

# `enable_gqa` lets SDPA read each key/value head for a whole group of query heads without
# copying them; it arrived in torch 2.5 and the package still supports torch 2.4.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# --------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == self.weight.dtype == torch.float32:
            # On CPU, F.rms_norm is the formula below bit for bit (tested) in one operator
            # call instead of six, and decoding one token is dominated by per-call overhead.
            # Not on GPUs: there it is a fused kernel that sums in another order.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # fp32 statistics: squaring bf16 activations loses too much precision.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# --------------------------------------------------------------------------- RoPE
def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim) in the rotate-half layout used by HF Llama.

    Dimension pair (i, i + D/2) rotates at frequency theta^(-2i/D); both halves of the table
    repeat the same angles so `x * cos + rotate_half(x) * sin` applies the rotation.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by the angles of its positions; cos/sin broadcast as (B|1, 1, T, D)."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


# --------------------------------------------------------------------------- attention
def expand_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, H, S, D): each key/value head serves H/K consecutive query heads."""
    n_kv = x.shape[1]
    return x if n_kv == n_heads else x.repeat_interleave(n_heads // n_kv, dim=1)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V written out, for tests only.

    q (B, H, T, D); k, v (B, K, S, D). `mask` (broadcastable to (B, H, T, S), True = may attend);
    None means causal with the T queries being the last T of the S positions.
    """
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        t, s = q.shape[-2], k.shape[-2]
        query_pos = torch.arange(s - t, s, device=q.device)[:, None]
        mask = torch.arange(s, device=q.device)[None, :] <= query_pos
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def document_attention(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, mask) for rows that pack several documents, from per-token segment ids (B, T).

    A segment is a run of equal ids. Each token attends causally within its own segment only,
    and positions restart at 0 where a segment starts, so every document in a packed row is
    computed exactly as if it ran alone. mask is (B, 1, T, T), True = may attend.
    """
    b, t = segment_ids.shape
    index = torch.arange(t, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = index[None, :, None] >= index[None, None, :]
    return index - segment_start, (same_segment & causal)[:, None]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    is_causal: bool, dropout_p: float = 0.0,
) -> torch.Tensor:
    """PyTorch's fused attention (flash / memory-efficient kernels on GPU), GQA-aware."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout_p, enable_gqa=True)
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index  # which slot of a KV cache this layer owns
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        # One fused projection for Q, K and V: a single larger matmul beats three small ones.
        qkv_dim = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_dim, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        # QK-norm (as in OLMo 2 / Qwen 3) normalises each head's queries and keys before RoPE,
        # which keeps attention logits bounded at high learning rates.
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C). `mask` (B, 1, T, T), True = may attend, replaces the plain causal
        pattern (packed documents that must not see each other); with a KV cache the cache
        decides. x (B, C) is one new token per sequence, decoded with `kv_cache` (`_decode`)."""
        if x.dim() == 2:
            return self._decode(x, rope, kv_cache)
        b, t, c = x.shape
        q, k, v = self._heads(x, rope)
        if kv_cache is None:
            # Plain causal (no mask) lets SDPA pick its fused causal kernels.
            is_causal = mask is None
        else:
            k, v = kv_cache.store(self.layer_index, k, v)
            mask, is_causal = kv_cache.mask, kv_cache.is_causal
        y = sdpa_attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, c))

    def _decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache) -> torch.Tensor:
        """One new token per sequence, x (B, C): nothing to transpose, and no causal pattern
        (the token sees every cached key; the cache's mask, (B, 1, 1, S), if any, hides what
        lies beyond each row's length). The query heads that share a key/value head become
        that head's queries (B, K, H/K, D), so each cached key and value is read once per
        group, not once per query head."""
        q, k, v = self._heads(x, rope)
        k, v = kv_cache.store(self.layer_index, k, v)
        grouped = q.reshape(x.shape[0], self.n_kv_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(grouped, k, v, attn_mask=kv_cache.mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.reshape(x.shape))

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, heads, T, D), QK-norm and RoPE applied, for x (B, T, C)
        or, with T = 1, for x (B, C)."""
        if x.dim() == 2:
            heads = self.qkv(x).view(x.shape[0], -1, 1, self.head_dim)
        else:  # (B, T, H + 2K, D) -> (B, H + 2K, T, D)
            heads = self.qkv(x).view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)
        qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if rope is not None:
            # Queries and keys rotate alike: one pass over both halves the operator calls.
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
        return q, k, v


# --------------------------------------------------------------------------- MLPs
class GeluMLP(nn.Module):
    """GPT-2's MLP: Linear -> GELU (tanh approximation, as GPT-2 was trained) -> Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


# --------------------------------------------------------------------------- block
def make_dropout(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0 (the presets): an identity costs less per call, and a
    decoding step makes 2 * n_layers + 1 of them."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config, config.d_model)
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config, config.d_model)
        self.mlp = SwiGLUMLP(config) if config.mlp == "swiglu" else GeluMLP(config)
        self.dropout = make_dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, kv_cache, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

