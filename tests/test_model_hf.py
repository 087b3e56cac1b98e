"""Our GPT-2 and Llama against Hugging Face's implementations with the same random weights.

transformers is an independent, widely used reference: mapping our weights into
GPT2LMHeadModel / LlamaForCausalLM must give the same logits (fp32, 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def _split_qkv(weight: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    return list(weight.split([q, kv, kv], dim=0))


def gpt2_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    # HF GPT-2 uses Conv1D layers whose weights are stored (in, out): transposed nn.Linear.
    sd = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        for ours, theirs in ((block.attn.qkv, "attn.c_attn"), (block.attn.out, "attn.c_proj"),
                             (block.mlp.fc, "mlp.c_fc"), (block.mlp.proj, "mlp.c_proj")):
            sd[p + theirs + ".weight"] = ours.weight.t()
            sd[p + theirs + ".bias"] = ours.bias
        for ours, theirs in ((block.attn_norm, "ln_1"), (block.mlp_norm, "ln_2")):
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight, ours.bias
    return sd


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = _split_qkv(block.attn.qkv.weight, model.config)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "mlp.gate_proj.weight": block.mlp.gate.weight, p + "mlp.up_proj.weight": block.mlp.up.weight,
            p + "mlp.down_proj.weight": block.mlp.proj.weight,
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
        })
    return sd


def _randomise(model: Transformer) -> None:
    """Norm weights are ones at init, which would hide a mix-up between them: perturb all."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _load(hf_model, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = hf_model.load_state_dict({k: v.detach().clone() for k, v in state.items()},
                                                   strict=False)
    assert not unexpected
    # Only non-persistent or derived buffers may be left out (e.g. masked_bias, rotary inv_freq).
    assert all("inv_freq" in name or "bias" in name and "attn" in name for name in missing), missing


def _compare(ours: Transformer, theirs, vocab_size: int) -> None:
    idx = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_matches_hf_gpt2():
    config = ModelConfig.from_preset("gpt2-124m", vocab_size=211, context_length=64, d_model=64,
                                     n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256)
    ours = Transformer(config).eval()
    _randomise(ours)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_ff,
        activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    _load(theirs, gpt2_state_dict(ours))
    _compare(ours, theirs, config.vocab_size)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_llama_matches_hf_llama(n_kv_heads):
    config = ModelConfig.from_preset("tiny", vocab_size=211, context_length=64, d_model=64,
                                     n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=160,
                                     rope_theta=500000.0)
    ours = Transformer(config).eval()
    _randomise(ours)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=True, attention_bias=False,
        rope_theta=config.rope_theta)
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    _load(theirs, llama_state_dict(ours))
    _compare(ours, theirs, config.vocab_size)
