"""State-dict adapters between our model and Hugging Face's, both ways (torchtitan's pattern).

Three transformers architectures cover what a ModelConfig can be:

  LlamaForCausalLM   RoPE, RMSNorm, SwiGLU, grouped-query attention; biases optional
                     (attention_bias on q/k/v/o, mlp_bias on gate/up/down)
  Qwen3ForCausalLM   the same with per-head RMSNorm on queries and keys (our qk_norm)
  GPT2LMHeadModel    learned positions, LayerNorm, GELU (tanh), biases everywhere

Our attention projects q, k, v with one fused matrix; Hugging Face's Llama uses three, GPT-2 one
Conv1D (its weights stored transposed, (in, out)). RoPE is the rotate-half layout in both, so
Llama's q/k rows need no permutation here (GGUF's do: see gguf.py). Anything else (LayerNorm
with RoPE, GELU with RoPE, RMSNorm with learned positions, q/k-norm in GPT-2) has no
transformers architecture and is refused, naming the field.
"""

from __future__ import annotations

from typing import Any

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig

LLAMA, QWEN3, GPT2 = "LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"


def hf_architecture(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly what our model does."""
    if config.position == "rope":
        for field, wanted in (("norm", "rmsnorm"), ("mlp", "swiglu")):
            if getattr(config, field) != wanted:
                raise ScratchLMError(f"model config field {field}: {getattr(config, field)} with RoPE has no "
                                     f"transformers architecture (Llama needs {field} {wanted})")
        if config.qk_norm and config.bias:
            raise ScratchLMError("model config fields qk_norm and bias: Qwen3, the transformers architecture "
                                 "with q/k norms, has no MLP biases")
        return QWEN3 if config.qk_norm else LLAMA
    for field, wanted in (("norm", "layernorm"), ("mlp", "gelu")):
        if getattr(config, field) != wanted:
            raise ScratchLMError(f"model config field {field}: {getattr(config, field)} with learned positions "
                                 f"has no transformers architecture (GPT-2 needs {field} {wanted})")
    if config.qk_norm:
        raise ScratchLMError("model config field qk_norm: GPT-2 has no q/k norms (use position rope: Qwen3)")
    return GPT2


# --------------------------------------------------------------------------- configs
def hf_config(config: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """config.json for transformers (also what vLLM and TGI read)."""
    architecture = hf_architecture(config)
    common = {"architectures": [architecture], "vocab_size": config.vocab_size,
              "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "torch_dtype": "float32"}
    if architecture == GPT2:
        return {**common, "model_type": "gpt2", "n_positions": config.context_length, "n_ctx": config.context_length,
                "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
                "n_inner": config.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True}
    values = {**common, "model_type": "qwen3" if architecture == QWEN3 else "llama",
              "hidden_size": config.d_model, "intermediate_size": config.d_ff,
              "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
              "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
              "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
              "hidden_act": "silu", "attention_bias": config.bias, "attention_dropout": 0.0,
              # transformers 5 reads rope_parameters; earlier versions and other readers rope_theta.
              "rope_theta": config.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    if architecture == LLAMA:
        values["mlp_bias"] = config.bias
    else:
        values.update(use_sliding_window=False, sliding_window=None)
    return values


# Fields of a transformers config that change what the model computes in ways ours cannot:
# refused when present with a non-default value, never silently ignored.
_UNSUPPORTED = {
    "rope_scaling": (None,),
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "n_routed_experts": (None, 0),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "scale_attn_by_inverse_layer_idx": (False, None),
    "reorder_and_upcast_attn": (False, None),
    "pretraining_tp": (1, None),
}


def config_from_hf(values: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for a transformers config.json (Llama, Qwen3, GPT-2); anything we
    cannot represent is refused with the field named."""
    architectures = values.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in (LLAMA, QWEN3, GPT2):
        raise ScratchLMError(f"{where}: architecture {architecture!r} is not supported (LlamaForCausalLM, "
                             f"Qwen3ForCausalLM or GPT2LMHeadModel)")
    for field, defaults in _UNSUPPORTED.items():
        if values.get(field) not in defaults:
            raise ScratchLMError(f"{where}: field {field} = {values[field]!r} is not supported by scratchlm")
    rope = values.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ScratchLMError(f"{where}: field rope_parameters.rope_type = {rope['rope_type']!r} (RoPE scaling) "
                             f"is not supported by scratchlm")
    try:
        if architecture == GPT2:
            if values.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ScratchLMError(f"{where}: field activation_function = {values['activation_function']!r} is "
                                     f"not supported (GPT-2's gelu_new)")
            return ModelConfig(
                vocab_size=values["vocab_size"], context_length=values.get("n_positions", values.get("n_ctx")),
                d_model=values["n_embd"], n_layers=values["n_layer"], n_heads=values["n_head"],
                n_kv_heads=values["n_head"], d_ff=values.get("n_inner") or 4 * values["n_embd"],
                norm="layernorm", norm_eps=values.get("layer_norm_epsilon", 1e-5), position="learned",
                mlp="gelu", bias=True, tie_embeddings=values.get("tie_word_embeddings", True), qk_norm=False)
        if values.get("hidden_act", "silu") != "silu":
            raise ScratchLMError(f"{where}: field hidden_act = {values['hidden_act']!r} is not supported (silu)")
        attention_bias = bool(values.get("attention_bias", False))
        if architecture == LLAMA and bool(values.get("mlp_bias", False)) != attention_bias:
            raise ScratchLMError(f"{where}: fields attention_bias and mlp_bias differ: scratchlm has biases "
                                 f"everywhere or nowhere")
        if architecture == QWEN3 and attention_bias:
            raise ScratchLMError(f"{where}: field attention_bias: biases in attention but not in the MLP are "
                                 f"not supported by scratchlm")
        d_model, heads = values["hidden_size"], values["num_attention_heads"]
        if values.get("head_dim", d_model // heads) * heads != d_model:
            raise ScratchLMError(f"{where}: field head_dim = {values['head_dim']}: scratchlm needs head_dim x "
                                 f"num_attention_heads = hidden_size")
        return ModelConfig(
            vocab_size=values["vocab_size"], context_length=values["max_position_embeddings"], d_model=d_model,
            n_layers=values["num_hidden_layers"], n_heads=heads,
            n_kv_heads=values.get("num_key_value_heads") or heads, d_ff=values["intermediate_size"],
            norm="rmsnorm", norm_eps=values.get("rms_norm_eps", 1e-6), position="rope",
            rope_theta=float(rope.get("rope_theta", values.get("rope_theta", 10000.0))), mlp="swiglu",
            bias=attention_bias, tie_embeddings=values.get("tie_word_embeddings", False),
            qk_norm=architecture == QWEN3)
    except KeyError as exc:
        raise ScratchLMError(f"{where}: missing field {exc.args[0]!r}") from None


# --------------------------------------------------------------------------- weights
def qkv_sizes(config: ModelConfig) -> list[int]:
    kv = config.n_kv_heads * config.head_dim
    return [config.n_heads * config.head_dim, kv, kv]


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (tied head included or not) -> transformers names and layouts."""
    architecture = hf_architecture(config)
    out: dict[str, torch.Tensor] = {}
    if architecture == GPT2:
        out.update({"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
                    "transformer.ln_f.weight": state["norm.weight"],
                    "transformer.ln_f.bias": bias_or_zeros(state, "norm", config)})
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for mine, hf in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                             ("mlp.proj", "mlp.c_proj")):
                out[theirs + hf + ".weight"] = state[ours + mine + ".weight"].t().contiguous()  # Conv1D: (in, out)
                out[theirs + hf + ".bias"] = bias_or_zeros(state, ours + mine, config)
            for mine, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[theirs + hf + ".weight"] = state[ours + mine + ".weight"]
                out[theirs + hf + ".bias"] = bias_or_zeros(state, ours + mine, config)
    else:
        out.update({"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]})
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            for suffix in ("weight", "bias") if config.bias else ("weight",):
                q, k, v = state[f"{ours}attn.qkv.{suffix}"].split(qkv_sizes(config), dim=0)
                out.update({f"{theirs}self_attn.q_proj.{suffix}": q, f"{theirs}self_attn.k_proj.{suffix}": k,
                            f"{theirs}self_attn.v_proj.{suffix}": v})
                for mine, hf in (("attn.out", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                                 ("mlp.up", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")):
                    out[f"{theirs}{hf}.{suffix}"] = state[f"{ours}{mine}.{suffix}"]
            out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
            out[theirs + "post_attention_layernorm.weight"] = state[ours + "mlp_norm.weight"]
            if config.qk_norm:
                out[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
                out[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def bias_or_zeros(state: dict[str, torch.Tensor], prefix: str, config: ModelConfig) -> torch.Tensor:
    """GPT-2 has biases everywhere; a model trained without them has zero ones (the same function)."""
    if config.bias:
        return state[prefix + ".bias"]
    weight = state[prefix + ".weight"]
    return torch.zeros(weight.shape[0] if weight.dim() == 2 else weight.shape[-1], dtype=weight.dtype)


def from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """transformers names and layouts -> our state dict (for Transformer.load_state_dict)."""
    architecture = hf_architecture(config)

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ScratchLMError(f"{where}: tensor {name} is missing")
        return tensors.pop(name)

    out: dict[str, torch.Tensor] = {}
    if architecture == GPT2:
        out.update({"tok_emb.weight": take("transformer.wte.weight"), "pos_emb.weight": take("transformer.wpe.weight"),
                    "norm.weight": take("transformer.ln_f.weight"), "norm.bias": take("transformer.ln_f.bias")})
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for mine, hf in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                             ("mlp.proj", "mlp.c_proj")):
                out[ours + mine + ".weight"] = take(theirs + hf + ".weight").t().contiguous()
                out[ours + mine + ".bias"] = take(theirs + hf + ".bias")
            for mine, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[ours + mine + ".weight"] = take(theirs + hf + ".weight")
                out[ours + mine + ".bias"] = take(theirs + hf + ".bias")
            for buffer in (".attn.bias", ".attn.masked_bias"):  # old checkpoints' causal-mask buffers
                tensors.pop(theirs.rstrip(".") + buffer, None)
    else:
        out.update({"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")})
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            for suffix in ("weight", "bias") if config.bias else ("weight",):
                out[f"{ours}attn.qkv.{suffix}"] = torch.cat([take(f"{theirs}self_attn.{p}_proj.{suffix}")
                                                             for p in "qkv"], dim=0)
                for mine, hf in (("attn.out", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                                 ("mlp.up", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")):
                    out[f"{ours}{mine}.{suffix}"] = take(f"{theirs}{hf}.{suffix}")
            out[ours + "attn_norm.weight"] = take(theirs + "input_layernorm.weight")
            out[ours + "mlp_norm.weight"] = take(theirs + "post_attention_layernorm.weight")
            if config.qk_norm:
                out[ours + "attn.q_norm.weight"] = take(theirs + "self_attn.q_norm.weight")
                out[ours + "attn.k_norm.weight"] = take(theirs + "self_attn.k_norm.weight")
            tensors.pop(theirs + "self_attn.rotary_emb.inv_freq", None)  # a derived buffer some save
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same tensor as the embedding when saved at all
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if tensors:
        unexpected = sorted(tensors)
        raise ScratchLMError(f"{where}: tensor(s) scratchlm has no place for ({', '.join(unexpected[:3])}"
                             f"{', ...' if len(unexpected) > 3 else ''}): an architecture feature it does not "
                             f"support")
    return out
