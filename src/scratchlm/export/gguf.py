"""GGUF export: one file llama.cpp, Ollama and LM Studio run (through the `gguf` package).

GGUF names each tensor the way llama.cpp's graphs look them up, and describes the model in
key/value metadata instead of a config.json. Our architectures map onto llama.cpp's:

    rope + RMSNorm + SwiGLU     "llama"  (with q/k norms: "qwen3")
    learned positions + GELU    "gpt2"

llama.cpp's "llama" graph applies RoPE to *interleaved* pairs (x0,x1), (x2,x3)...; ours (like
transformers') rotates the two halves of each head (x0,x32), (x1,x33).... Meta's original
checkpoints were interleaved, and transformers' conversion script permuted the q/k rows
into halves; GGUF conversion permutes them back (`_interleave_rope_rows`). The "qwen3" graph
uses the halves layout ("NEOX" RoPE in llama.cpp's words), so its rows stay as they are.

The tokenizer travels as metadata: tokenizer model "gpt2" (byte-level BPE), the tokens in
GPT-2's byte alphabet, the merges, token types (special tokens are CONTROL), end-of-text as
bos (added before a prompt) and eos, and the pre-tokenizer llama.cpp must use: "gpt-2" for
our gpt2 pattern, "llama-bpe" (Llama 3's regex, the same splits as GPT-4's) for gpt4.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.export import GGUF_DTYPES
from scratchlm.export.adapters import GPT2, QWEN3, bias_or_zeros, hf_architecture, qkv_sizes
from scratchlm.export.hf import check_dtype
from scratchlm.export.hf_tokenizer import byte_level_merges, byte_level_tokens
from scratchlm.fsutil import atomic_output_file
from scratchlm.model import ModelConfig
from scratchlm.model.directory import load_model
from scratchlm.post.chat import CHATML, CHATML_JINJA, IM_END, chat_format
from scratchlm.tokenizer import Tokenizer

PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "llama-bpe"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ScratchLMError("GGUF export needs the gguf package: pip install 'scratchlm[export]'") from None
    return gguf


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "f16",
                overwrite: bool = False) -> Path:
    """Write `model_dir` as one GGUF file. Weight matrices get `dtype`; norms, biases and GPT-2's
    position table stay f32 (as llama.cpp's own converter keeps them); a matrix whose rows
    do not split into q8_0's blocks of 32 falls back to f16."""
    gguf = _gguf()
    check_dtype(dtype, GGUF_DTYPES)
    out_file = Path(out_file)
    if out_file.is_dir():
        raise ScratchLMError(f"{out_file} is a directory (the GGUF output is a file, e.g. model.gguf)")
    model, tokenizer = load_model(model_dir)
    config = model.config
    architecture = hf_architecture(config)
    arch = "gpt2" if architecture == GPT2 else "qwen3" if architecture == QWEN3 else "llama"
    tensors = gguf_tensors(model.state_dict(), config, arch)
    with atomic_output_file(out_file, overwrite, "GGUF file") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_metadata(writer, gguf, config, arch, dtype, name=Path(model_dir).resolve().name)
        _add_tokenizer(writer, gguf, tokenizer)
        for name, tensor in tensors.items():
            qtype = _tensor_type(gguf, name, tensor, dtype)
            data = gguf.quants.quantize(tensor.to(torch.float32).numpy(), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_file


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names and layouts, for architecture `arch`."""
    out = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:  # absent, llama.cpp reuses token_embd as the output matrix
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        if arch == "gpt2":
            # GPT-2's graph has biases everywhere; a model trained without gets zero ones.
            for mine, gg in (("attn_norm", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.out", "attn_output"),
                             ("mlp_norm", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
                out[f"{theirs}{gg}.weight"] = state[f"{ours}{mine}.weight"]
                out[f"{theirs}{gg}.bias"] = bias_or_zeros(state, ours + mine, config)
            continue
        for suffix in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = state[f"{ours}attn.qkv.{suffix}"].split(qkv_sizes(config), dim=0)
            if arch == "llama":
                q, k = _interleave_rope_rows(q, config.n_heads), _interleave_rope_rows(k, config.n_kv_heads)
            out.update({f"{theirs}attn_q.{suffix}": q, f"{theirs}attn_k.{suffix}": k, f"{theirs}attn_v.{suffix}": v})
            for mine, gg in (("attn.out", "attn_output"), ("mlp.gate", "ffn_gate"), ("mlp.up", "ffn_up"),
                             ("mlp.proj", "ffn_down")):
                out[f"{theirs}{gg}.{suffix}"] = state[f"{ours}{mine}.{suffix}"]
        out[f"{theirs}attn_norm.weight"] = state[f"{ours}attn_norm.weight"]
        out[f"{theirs}ffn_norm.weight"] = state[f"{ours}mlp_norm.weight"]
        if config.qk_norm:
            out[f"{theirs}attn_q_norm.weight"] = state[f"{ours}attn.q_norm.weight"]
            out[f"{theirs}attn_k_norm.weight"] = state[f"{ours}attn.k_norm.weight"]
    if arch == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
        out["output_norm.bias"] = bias_or_zeros(state, "norm", config)
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (r0..r_{d/2-1}, r_{d/2}..r_{d-1}) to interleaved
    pairs (r0, r_{d/2}, r1, r_{d/2+1}, ...): then llama.cpp's interleaved RoPE rotates the
    same pairs of q/k features ours does."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _tensor_type(gguf, name: str, tensor: torch.Tensor, dtype: str):
    types = gguf.GGMLQuantizationType
    if tensor.dim() == 1 or name == "position_embd.weight":
        return types.F32
    if dtype == "q8_0" and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16
    return {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]


def _add_metadata(writer, gguf, config: ModelConfig, arch: str, dtype: str, name: str) -> None:
    file_types = gguf.LlamaFileType
    writer.add_name(name)
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16, "bf16": file_types.MOSTLY_BF16,
                          "q8_0": file_types.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def _add_tokenizer(writer, gguf, tokenizer: Tokenizer) -> None:
    specials = set(tokenizer.special_tokens.values())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[tokenizer.pattern])
    writer.add_token_list(byte_level_tokens(tokenizer))
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                            for i in range(tokenizer.vocab_size)])
    writer.add_token_merges([f"{left} {right}" for left, right in byte_level_merges(tokenizer)])
    chat = chat_format(tokenizer) == CHATML
    if tokenizer.eot_id is not None:
        writer.add_bos_token_id(tokenizer.eot_id)
        if not chat:
            writer.add_eos_token_id(tokenizer.eot_id)
    # A prompt starts after <|endoftext|>, as every training document does and as `scratchlm
    # generate` starts it: llama.cpp adds the "bos" token, which is that token, in front.
    writer.add_add_bos_token(tokenizer.eot_id is not None)
    writer.add_add_eos_token(False)
    if chat:
        # A chat model ends its turn with <|im_end|>: llama.cpp stops there, and finds the
        # ChatML format from the template (its built-in chatml renders the same ids after bos).
        end_of_turn = tokenizer.special_tokens[IM_END]
        writer.add_eos_token_id(end_of_turn)
        writer.add_eot_token_id(end_of_turn)
        writer.add_chat_template(CHATML_JINJA)
