"""The transformer: configs, components against independent references, the KV cache, accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ScratchLMError
from scratchlm.model import PRESETS, ModelConfig, Transformer, count_params, layers
from scratchlm.model.accounting import estimate_training_memory, flops_per_token, gpu_key, peak_flops_for_device
from scratchlm.model.layers import (
    RMSNorm,
    apply_rope,
    expand_kv_heads,
    reference_attention,
    rope_tables,
    sdpa_attention,
)


def small_config(**overrides) -> ModelConfig:
    """A Llama-style model small enough to run dozens of times in a test."""
    base = dict(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                d_ff=64, norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
    return ModelConfig(**{**base, **overrides})


GPT2_STYLE = dict(norm="layernorm", position="learned", mlp="gelu", bias=True)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=30), "d_model"),           # not divisible by n_heads=4
    (dict(n_kv_heads=3), "n_heads"),         # 4 heads are not a multiple of 3 kv heads
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(mlp="relu"), "mlp"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(dropout=1.0), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(d_model=36, n_heads=4, n_kv_heads=4), "d_model"),  # head_dim 9: odd, RoPE impossible
    (dict(bias="yes"), "bias"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ScratchLMError, match=rf"field {field}\b"):
        small_config(**overrides)


def test_config_defaults_and_presets():
    config = ModelConfig(vocab_size=10, context_length=8, d_model=64, n_layers=1, n_heads=4, mlp="swiglu")
    assert config.n_kv_heads == 4 and config.d_ff == 192  # 8/3 * 64 = 170.7 -> 192
    assert ModelConfig.from_preset("gpt2-124m", vocab_size=300).vocab_size == 300
    with pytest.raises(ScratchLMError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ScratchLMError, match="unknown model field.*colour"):
        ModelConfig.from_preset("tiny", colour="red")


def test_gpt2_124m_has_the_known_parameter_count():
    model = Transformer(ModelConfig.from_preset("gpt2-124m"))
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_analytic_param_count_matches_the_built_model(name):
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):  # shapes only: even llama-1b builds instantly
        model = Transformer(config)
    counts = count_params(config)
    assert counts.total == model.num_params() == config.num_params()
    assert counts.non_embedding == model.num_params(non_embedding=True)


def test_preset_sizes_are_as_advertised():
    def millions(name: str) -> float:
        return count_params(ModelConfig.from_preset(name)).total / 1e6
    assert 0.8 < millions("tiny") < 1.3
    assert 13 < millions("small") < 17
    assert 115 < millions("llama-124m") < 130
    assert 330 < millions("gpt2-350m") < 370
    assert 0.9e3 < millions("llama-1b") < 1.3e3


@pytest.mark.parametrize("overrides", [
    dict(qk_norm=True, bias=True), dict(tie_embeddings=False), dict(GPT2_STYLE, bias=False),
])
def test_param_count_of_variants(overrides):
    config = small_config(**overrides)
    assert count_params(config).total == Transformer(config).num_params()


# --------------------------------------------------------------------------- components
def test_rmsnorm_matches_torch():
    x = torch.randn(3, 5, 16)
    ours, theirs = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 384), (32, 1, 384), (4, 37, 768), (2, 6, 17, 64)])
def test_rmsnorm_one_call_path_is_the_formula_bit_for_bit(shape):
    """fp32 on CPU takes F.rms_norm (one operator call, for decoding speed); training numerics
    must not move, so it has to equal the written-out formula exactly, not just closely."""
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape) * 3
    written_out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.equal(norm(x), written_out)


def test_rope_matches_complex_rotation():
    """Independent implementation: the pair (x_i, x_{i+D/2}) is the complex number
    x_i + j x_{i+D/2}, rotated by multiplying with exp(j * position * theta^(-2i/D))."""
    head_dim, seq, theta = 16, 40, 10000.0
    x = torch.randn(2, 3, seq, head_dim, dtype=torch.float64)
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs
    rotated = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    cos, sin = rope_tables(head_dim, seq, theta)
    ours = apply_rope(x.float(), cos, sin)
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    def score(m: int, n: int) -> float:
        return float(apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n]))
    assert score(5, 2) == pytest.approx(score(45, 42), abs=1e-4)


@pytest.mark.parametrize("native_gqa", [True, False])  # False: the torch < 2.5 path
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_sdpa_matches_reference_attention(n_kv_heads, native_gqa, monkeypatch):
    monkeypatch.setattr(layers, "_SDPA_HAS_GQA", native_gqa)
    q = torch.randn(2, 4, 9, 8)
    k, v = torch.randn(2, n_kv_heads, 9, 8), torch.randn(2, n_kv_heads, 9, 8)
    torch.testing.assert_close(sdpa_attention(q, k, v, None, is_causal=True),
                               reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # A query block after a cached prefix: causal relative to the end, with an explicit mask.
    q_tail = q[:, :, -3:]
    mask = torch.arange(9)[None, :] <= torch.arange(6, 9)[:, None]
    torch.testing.assert_close(sdpa_attention(q_tail, k, v, mask, is_causal=False),
                               reference_attention(q_tail, k, v), atol=1e-5, rtol=1e-5)


def test_expand_kv_heads_groups_consecutive_query_heads():
    k = torch.arange(2.0).view(1, 2, 1, 1)
    assert expand_kv_heads(k, 6).flatten().tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("style", [{}, GPT2_STYLE, dict(qk_norm=True)])
def test_forward_shapes_dtypes_and_initial_loss(style):
    torch.manual_seed(0)
    config = small_config(**style)
    model = Transformer(config)
    idx, targets = torch.randint(0, config.vocab_size, (2, 3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, config.vocab_size) and logits.dtype == torch.float32
    loss = model(idx, targets)
    assert loss.shape == () and torch.isclose(
        loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    # Small initial weights give nearly uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ignored_targets_and_bf16_logits_stay_fp32():
    model = Transformer(small_config()).to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 10))
    assert model(idx).dtype == torch.float32
    targets = idx.clone()
    targets[:, 5:] = -1
    expected = F.cross_entropy(model(idx)[:, :5].flatten(0, 1), idx[:, :5].flatten())
    torch.testing.assert_close(model(idx, targets), expected)


def test_too_long_sequence_is_rejected():
    with pytest.raises(ScratchLMError, match="context_length"):
        Transformer(small_config())(torch.zeros(1, 33, dtype=torch.long))


def test_dropout_only_in_training_mode():
    model = Transformer(small_config(dropout=0.2))
    idx = torch.randint(0, 97, (2, 10))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    config = small_config(d_model=256, n_heads=4, d_ff=512, n_layers=8)
    model = Transformer(config)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    assert block.attn.out.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)


def test_meta_device_construction_then_materialise():
    """The FSDP recipe: build on meta, allocate with to_empty, then init_weights."""
    config = small_config()
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight
    assert torch.equal(model.rope_cos, Transformer(config).rope_cos)
    assert torch.isfinite(model(torch.zeros(1, 5, dtype=torch.long))).all()


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("style", [{}, GPT2_STYLE, dict(qk_norm=True)])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_decoding_matches_full_forward(style, n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(small_config(n_kv_heads=n_kv_heads, **style)).eval()
    idx = torch.randint(0, 97, (2, 16))
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    # Prefill 7, then a 3-token chunk after a prefix, then single-token steps.
    pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:10], kv_cache=cache)]
    pieces += [model(idx[:, i:i + 1], kv_cache=cache) for i in range(10, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [16, 16]


@pytest.mark.parametrize("style", [{}, GPT2_STYLE])
def test_cache_tracks_positions_per_sequence(style):
    """Two prompts of different lengths share one right-padded prefill; each then decodes at
    its own position and must match its own uncached forward pass."""
    torch.manual_seed(0)
    model = Transformer(small_config(**style)).eval()
    long, short = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    padded = torch.cat([long[:, :6], F.pad(short, (0, 1))], dim=0)  # lengths 6 and 5
    cache = model.new_kv_cache(batch_size=2)
    model(padded, kv_cache=cache)
    cache.lengths = torch.tensor([6, 5])
    # Both rows take long[6] next: row 0 at position 6, row 1 at position 5 (over the pad).
    logits_long = model(long[:, 6:7].expand(2, 1).clone(), kv_cache=cache)
    step = torch.cat([long[:, 7:8], short[:, :1]], dim=0)
    logits_step = model(step, kv_cache=cache)
    torch.testing.assert_close(logits_long[0, -1], model(long[:, :7])[0, -1], atol=1e-5, rtol=1e-5)
    expected_short = model(torch.cat([short, long[:, 6:7], short[:, :1]], dim=1))[0, -1]
    torch.testing.assert_close(logits_step[1, -1], expected_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_step[0, -1], model(long[:, :8])[0, -1], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    model = Transformer(small_config()).eval()
    cache = model.new_kv_cache(batch_size=1, max_len=4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ScratchLMError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ScratchLMError, match="context_length"):
        model.new_kv_cache(batch_size=1, max_len=64)


# --------------------------------------------------------------------------- document masking
@pytest.mark.parametrize("style", [{}, GPT2_STYLE], ids=["llama", "gpt2"])
def test_packed_documents_with_segment_ids_equal_each_document_alone(style):
    """Rows packing several documents (segment ids) give each document the logits it gets
    when run alone: no attention across documents, positions restarting (learned ones too)."""
    torch.manual_seed(0)
    model = Transformer(small_config(**style)).eval()
    lengths = [[5, 11, 1, 9], [26], [3, 3, 3, 3, 3, 3, 3]]  # one row per list, padded to 26
    documents = [[torch.randint(0, 97, (n,)) for n in row] for row in lengths]
    idx = torch.zeros(3, 26, dtype=torch.long)
    segments = torch.zeros(3, 26, dtype=torch.long)
    for r, row in enumerate(documents):
        at = 0
        for d, doc in enumerate(row):
            idx[r, at : at + len(doc)], segments[r, at : at + len(doc)] = doc, d
            at += len(doc)
        segments[r, at:] = len(row)  # padding: a segment of its own
    with torch.no_grad():
        packed = model(idx, segment_ids=segments)
        for r, row in enumerate(documents):
            at = 0
            for doc in row:
                alone = model(doc[None])[0]
                torch.testing.assert_close(packed[r, at : at + len(doc)], alone, atol=1e-5, rtol=1e-5)
                at += len(doc)
        # Without segment ids the second document would see the first: the check has teeth.
        assert not torch.allclose(model(idx)[0, 5:16], model(documents[0][1][None])[0], atol=1e-3)


def test_document_attention_positions_and_mask():
    positions, mask = layers.document_attention(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


# --------------------------------------------------------------------------- accounting
def test_flops_per_token_hand_computed():
    config = ModelConfig.from_preset("gpt2-124m")
    # 6 * (85,056,000 non-embedding + 50257 * 768 head) + 12 * 12 layers * 768 * 1024
    assert flops_per_token(config, 1024) == 6 * (85_056_000 + 38_597_376) + 12 * 12 * 768 * 1024
    assert config.flops_per_token() == 855_166_464


def test_training_memory_estimate():
    config = ModelConfig.from_preset("gpt2-124m")
    ddp = estimate_training_memory(config, batch_size=4, seq_len=1024)
    assert ddp["weights"] == ddp["gradients"] == 124_439_808 * 4
    assert ddp["optimizer"] == 124_439_808 * 8
    fsdp = estimate_training_memory(config, batch_size=4, seq_len=1024, world_size=8, sharding="fsdp")
    assert fsdp["optimizer"] == ddp["optimizer"] / 8 and fsdp["activations"] == ddp["activations"]
    assert fsdp["fsdp_gathered"] > 0 and fsdp["total"] < ddp["total"]
    # Hand count for 4096 tokens, bf16 activations: a GPT-2 block saves 16 d values per token
    # (Korthikanti et al. count 17 d, the difference being dropout masks); the fp32 logits and
    # their softmax take 2 * 4 bytes per vocabulary entry; plus the embedding output.
    tokens, block = 4096, 16 * 768 * 4096 * 2
    logits_and_embedding = 2 * tokens * 50257 * 4 + 768 * tokens * 2
    assert ddp["activations"] == 12 * block + logits_and_embedding
    ckpt = estimate_training_memory(config, batch_size=4, seq_len=1024, activation_checkpointing=True)
    # Checkpointing keeps each block's input (d per token) and recomputes one block at a time.
    assert ckpt["activations"] == 12 * 768 * tokens * 2 + block + logits_and_embedding


def test_gpu_names():
    assert gpu_key("h100") == "H100"
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_key("NVIDIA H100 PCIe") == "H100-PCIE"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert peak_flops_for_device("NVIDIA L40S") is None
    with pytest.raises(ScratchLMError, match="unknown GPU"):
        gpu_key("abacus")
