"""The decoder-only transformer and its KV cache.

    model(idx)                  -> fp32 logits (B, T, vocab)
    model(idx, targets)         -> mean cross-entropy (targets == -1 are ignored)
    model(idx, segment_ids=s)   -> documents packed in a row attend only within themselves
    model(idx, kv_cache=cache)  -> logits of the new tokens; the cache remembers them
    model.generate(idx, ...)    -> iterator over sampled token ids (uses the cache)

Parallelism, compilation and activation checkpointing stay outside: the training stage
wraps each element of `model.blocks` (`checkpoint_wrapper`, compile, FSDP2 `fully_shard`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig
from scratchlm.model.layers import Block, RMSNorm, document_attention, make_dropout, make_norm, rope_tables
from scratchlm.model.sampling import check_sampling_args, sample_next_token


class KVCache:
    """Keys and values of every layer for up to `max_len` positions of each sequence.

    `lengths[b]` counts the tokens already cached for sequence b, so sequences in a batch may
    sit at different positions (set `lengths` after a right-padded prefill). A forward pass
    with the cache writes the new tokens' keys/values at positions lengths[b] ..
    lengths[b] + T - 1, lets query i of sequence b see keys 0 .. lengths[b] + i, then advances
    `lengths` by T.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        # Kept on the CPU: deciding masks and slice ends from it never waits on the GPU.
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self._positions: torch.Tensor | None = None  # (B, T) of the pass in progress
        self._slots: torch.Tensor | None = None  # (B, K, T, D): the position each new key/value goes to
        self._end = 0  # keys 0 .. _end - 1 take part in the pass in progress
        self.mask: torch.Tensor | None = None
        self.is_causal = False

    def begin(self, new_tokens: int) -> torch.Tensor:
        """Prepare a pass over `new_tokens` tokens per sequence; returns their positions (B, T)."""
        lengths = self.lengths.tolist()  # decided in Python: one conversion, not an op per test
        positions = self.lengths[:, None] + torch.arange(new_tokens)
        self._end = max(lengths) + new_tokens
        if self._end > self.max_len:
            raise ScratchLMError(f"KV cache holds {self.max_len} positions; this pass needs {self._end}")
        uniform = min(lengths) == max(lengths)
        # Pick the cheapest correct attention pattern: a fresh prefill is plain causal (fused
        # kernels), one new token at a shared position sees every cached key (no mask);
        # anything else (a prefix plus several tokens, ragged lengths) gets an explicit mask.
        self.is_causal = uniform and lengths[0] == 0
        if self.is_causal or (uniform and new_tokens == 1):
            self.mask = None
        else:
            key_positions = torch.arange(self._end)
            mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
            self.mask = mask.to(self.keys.device)
        self._positions = positions.to(self.keys.device)
        _, batch, heads, _, head_dim = self.keys.shape
        self._slots = self._positions.view(batch, 1, new_tokens, 1).expand(batch, heads, new_tokens, head_dim)
        return self._positions

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values (B, K, T, D) for `layer`; return all visible ones."""
        keys, values = self.keys[layer], self.values[layer]
        # One scatter along the position axis per tensor (each row at its own positions):
        # an order of magnitude cheaper per call than advanced-index assignment.
        keys.scatter_(2, self._slots, k.to(keys.dtype))
        values.scatter_(2, self._slots, v.to(values.dtype))
        end = self._end
        return keys[:, :, :end].type_as(k), values[:, :, :end].type_as(v)

    def advance(self, new_tokens: int) -> None:
        self.lengths += new_tokens
        self._positions, self._slots, self.mask = None, None, None

    def reset(self) -> None:
        self.lengths.zero_()

    def select(self, rows: list[int]) -> KVCache:
        """A new cache holding sequences `rows` of this one, in that order (a row may repeat):
        e.g. one cached prompt continued several ways, each scored without recomputing it."""
        index = torch.tensor(rows, dtype=torch.long)
        return self._from_tensors(self.keys.index_select(1, index.to(self.keys.device)),
                                  self.values.index_select(1, index.to(self.values.device)),
                                  self.lengths[index].clone())

    def rows(self, start: int, stop: int) -> KVCache:
        """Sequences start .. stop - 1 as a cache of their own that shares this one's memory:
        a pass through it writes keys, values and lengths into this cache. A server keeps
        its running sequences in the first rows of one large cache and runs just those."""
        return self._from_tensors(self.keys[:, start:stop], self.values[:, start:stop],
                                  self.lengths[start:stop])

    def _from_tensors(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> KVCache:
        cache = KVCache.__new__(KVCache)
        cache.keys, cache.values, cache.lengths, cache.max_len = keys, values, lengths, self.max_len
        cache._positions, cache._slots, cache._end, cache.mask, cache.is_causal = None, None, 0, None, False
        return cache

    def copy_row(self, source: int, target: int) -> None:
        """Make sequence `target` a copy of sequence `source` (its cached positions only)."""
        n = int(self.lengths[source])
        self.keys[:, target, :, :n] = self.keys[:, source, :, :n]
        self.values[:, target, :, :n] = self.values[:, source, :, :n]
        self.lengths[target] = n


def fill_(param: torch.Tensor, init: Callable[..., Any], **kwargs: Any) -> None:
    """`init(param, **kwargs)` (an nn.init function), in place. A sharded (FSDP2 DTensor)
    parameter is filled whole on the CPU and keeps its own shard: the random draws are then
    those of an unsharded model on the CPU, whatever the sharding, and only one full tensor
    exists at a time (train.distributed.materialize)."""
    if not is_dtensor(param):
        init(param, **kwargs)
        return
    from torch.distributed.tensor import distribute_tensor

    full = torch.empty(param.shape, dtype=param.dtype)
    init(full, **kwargs)
    shard = distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                              src_data_rank=None)  # every process drew the same tensor: no broadcast
    param.to_local().copy_(shard.to_local())


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter)."""
    if not torch.distributed.is_available():  # builds without torch.distributed have no DTensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (nn.Embedding(config.context_length, config.d_model)
                        if config.position == "learned" else None)
        self.dropout = make_dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # RoPE angles are computed once; non-persistent, so they never enter checkpoints.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Weights ~ N(0, 0.02); the projections that write into the residual stream
        (attention `out`, MLP `proj`) get 0.02 / sqrt(2 * n_layers), as in GPT-2: each block
        adds two such outputs to the stream, so this keeps its variance independent of depth.
        Also (re)ties the embeddings and (re)builds the RoPE tables, so `to_empty(device=...)`
        (which unties them) + `init_weights()` works for a model created on the meta device."""
        if self.config.tie_embeddings:
            # The LM head reuses the embedding matrix (Press & Wolf 2017): one fewer V x d matrix.
            self.lm_head.weight = self.tok_emb.weight
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("attn.out", "mlp.proj"))
                fill_(module.weight, nn.init.normal_, mean=0.0, std=residual_std if residual else 0.02)
                if module.bias is not None:
                    fill_(module.bias, nn.init.zeros_)
            elif isinstance(module, nn.Embedding):
                fill_(module.weight, nn.init.normal_, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                fill_(module.weight, nn.init.ones_)
                if getattr(module, "bias", None) is not None:
                    fill_(module.bias, nn.init.zeros_)
        if self.config.position == "rope":
            device = self.tok_emb.weight.device
            cos, sin = rope_tables(self.config.head_dim, self.config.context_length,
                                   self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    # ----------------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`segment_ids` (B, T): tokens with different ids (documents packed into one row) do
        not attend to each other, and positions restart in each (see document_attention)."""
        logits = self.lm_head(self.features(idx, kv_cache, segment_ids)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)

    def features(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                 segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, d_model), normalised: what the LM head reads. Callers
        that need the logits of a few positions only apply `lm_head` to those."""
        t = idx.shape[1]
        mask = None
        if kv_cache is None:
            if t > self.config.context_length:
                raise ScratchLMError(
                    f"sequence of {t} tokens exceeds context_length {self.config.context_length}")
            if segment_ids is None:
                positions = torch.arange(t, device=idx.device)  # (T,), shared by the batch
            else:
                positions, mask = document_attention(segment_ids)  # (B, T), per sequence
        else:
            if segment_ids is not None:
                raise ScratchLMError("segment_ids do not combine with a KV cache")
            if kv_cache.lengths.shape[0] != idx.shape[0]:
                raise ScratchLMError(
                    f"batch of {idx.shape[0]} sequences for a KV cache of {kv_cache.lengths.shape[0]}")
            positions = kv_cache.begin(t)  # (B, T), per sequence
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.dropout(x)
        # One new token per sequence (decoding): the hidden states lose their time axis, and
        # every layer takes its single-token path (CausalSelfAttention._decode).
        decoding = kv_cache is not None and t == 1
        if decoding:
            x = x[:, 0]
        # cos/sin rows of each position, with a head axis to broadcast over: (1|B, 1, T, D).
        rope = ((self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
                if self.config.position == "rope" else None)
        for block in self.blocks:
            x = block(x, rope, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(t)
        x = self.norm(x)
        return x.unsqueeze(1) if decoding else x

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """A cache for `batch_size` sequences of up to `max_len` (default and at most
        context_length) positions, on the model's device and dtype unless told otherwise."""
        max_len = max_len or self.config.context_length
        if max_len > self.config.context_length:
            raise ScratchLMError(
                f"KV cache of {max_len} positions exceeds context_length {self.config.context_length}")
        weight = self.tok_emb.weight
        return KVCache(self.config.n_layers, batch_size, self.config.n_kv_heads,
                       self.config.head_dim, max_len,
                       device=device or weight.device, dtype=dtype or weight.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (tied weights once), or those of the blocks and final norm only:
        the "non-embedding" N of Kaplan et al. 2020 (no token/position embedding, no LM head)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() dedups tied weights
        if not non_embedding:
            return total
        embedding = {id(self.tok_emb.weight): self.tok_emb.weight, id(self.lm_head.weight): self.lm_head.weight}
        if self.pos_emb is not None:
            embedding[id(self.pos_emb.weight)] = self.pos_emb.weight
        return total - sum(p.numel() for p in embedding.values())

    # ----------------------------------------------------------------------- generation
    # no_grad rather than inference_mode: generation also runs mid-training (samples), and
    # tensors created under inference_mode (e.g. FSDP's gathered weights) cannot be updated
    # in place by the training steps that follow.
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` sampled ids continuing `idx` (1, T), one at a time.

        Prefills the KV cache with the prompt, then feeds one token per step. Temperature 0
        is greedy. Stops before yielding `stop_token`. When the context window fills up the
        cache is rebuilt from the most recent half window, so generation can run on.
        The model is put in eval mode while generating and restored afterwards.
        """
        check_sampling_args(temperature, top_k, top_p)
        if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
            raise ScratchLMError(f"generate needs a prompt of shape (1, T>=1), got {tuple(idx.shape)}")
        window = self.config.context_length
        tokens = idx[0].tolist()
        cache = self.new_kv_cache(1, window)
        was_training = self.training
        self.eval()
        try:
            logits = self._prefill(cache, tokens[-window:])
            for _ in range(max_new_tokens):
                next_id = sample_next_token(logits[0, -1], temperature, top_k, top_p, generator)
                if next_id == stop_token:
                    return
                yield next_id
                tokens.append(next_id)
                if int(cache.lengths[0]) == window:
                    logits = self._prefill(cache, tokens[-(window // 2):])
                else:
                    logits = self(torch.tensor([[next_id]], device=cache.keys.device), kv_cache=cache)
        finally:
            self.train(was_training)

    def _prefill(self, cache: KVCache, tokens: list[int]) -> torch.Tensor:
        cache.reset()
        return self(torch.tensor([tokens], device=cache.keys.device), kv_cache=cache)
