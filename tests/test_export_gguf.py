"""GGUF export checked by two independent readers: the gguf package (every tensor back, within
the dtype's error: f32 equal, f16 relative 2^-11, bf16 equal to PyTorch's rounding, q8_0
within half a quantization step of each block of 32, whose
scale is stored as f16) and transformers' GGUF loader (our
logits to 1e-4 in fp32). llama.cpp itself: benchmarks/llama_cpp_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scratchlm.export import export_gguf
from scratchlm.export.gguf import gguf_tensors
from scratchlm.model.directory import load_model
from tests.test_export import ARCHITECTURES, _ids, make_model_dir, trained_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _read_gguf(path: Path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)
                        .reshape(tuple(reversed(t.shape.tolist())))) for t in reader.tensors}
    return reader, tensors


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("name", ["llama-mha-untied-bias", "qwen3-qk-norm", "gpt2-tied"])
def test_gguf_reader_round_trip(name, tmp_path):
    preset, fields = ARCHITECTURES[name]
    tokenizer = trained_tokenizer("gpt4" if "qwen" in name else "gpt2")
    model_dir = make_model_dir(tmp_path / "model", tokenizer, preset, **{**fields, "d_ff": 256})
    model, _ = load_model(model_dir)
    arch = name.split("-")[0]
    expected = gguf_tensors(model.state_dict(), model.config, arch)
    types = gguf.GGMLQuantizationType
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        path = export_gguf(model_dir, tmp_path / f"{dtype}.gguf", dtype=dtype)
        reader, tensors = _read_gguf(path)
        assert tensors.keys() == expected.keys()
        for key, tensor in expected.items():
            qtype, values = tensors[key]
            values = torch.from_numpy(values.copy())
            assert values.shape == tensor.shape, key
            if tensor.dim() == 1 or dtype == "f32" or key == "position_embd.weight":
                assert qtype == types.F32 and torch.equal(values, tensor), key
            elif dtype == "f16":
                assert qtype == types.F16
                torch.testing.assert_close(values, tensor, rtol=2**-11, atol=2**-24)
            elif dtype == "bf16":
                assert qtype == types.BF16
                assert torch.equal(values, tensor.to(torch.bfloat16).float()), key
            else:
                assert qtype == types.Q8_0
                blocks = tensor.reshape(-1, 32)
                step = blocks.abs().amax(dim=1, keepdim=True) / 127
                error = (values.reshape(-1, 32) - blocks).abs()
                # Rounding to the step, plus the step itself stored as f16 (times up to 127).
                assert bool((error <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), key

    reader, _ = _read_gguf(tmp_path / "f32.gguf")
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("llama-bpe" if arch == "qwen3" else "gpt-2")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.eot_id] == "<|endoftext|>"
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"  # GPT-2's byte alphabet
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tokenizer.merges)
    token_types = _field(reader, "tokenizer.ggml.token_type")
    assert token_types[tokenizer.eot_id] == gguf.TokenType.CONTROL and token_types[0] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eot_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True  # <|endoftext|> starts a prompt


# transformers' GGUF loader sets a Qwen3 model's head_dim to Qwen3's default (128) and a GPT-2
# model's positions to GPT-2's (1024) whatever the file says, so those two are built to match.
GGUF_FOR_TRANSFORMERS = {
    "llama-mha-untied": ("tiny", dict(n_heads=4, n_kv_heads=4, tie_embeddings=False, rope_theta=500000.0)),
    "llama-gqa-tied": ("tiny", dict(n_heads=4, n_kv_heads=2)),
    "qwen3-qk-norm": ("tiny", dict(d_model=256, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=256, qk_norm=True)),
    "gpt2-tied": ("gpt2-124m", dict(context_length=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256)),
}


@pytest.mark.parametrize("name", list(GGUF_FOR_TRANSFORMERS))
def test_transformers_gguf_loader_reproduces_our_logits(name, tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    preset, fields = GGUF_FOR_TRANSFORMERS[name]
    tokenizer = trained_tokenizer("gpt2")
    model_dir = make_model_dir(tmp_path / "model", tokenizer, preset, **fields)
    ours, _ = load_model(model_dir)
    export_gguf(model_dir, tmp_path / "model.gguf", dtype="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    idx = _ids(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)


def test_a_chat_model_ends_its_turn_at_im_end_in_gguf(tmp_path):
    from scratchlm.model.directory import save_model
    from scratchlm.post.chat import CHATML_JINJA, IM_END, add_chat_tokens

    preset, fields = ARCHITECTURES["llama-mha-untied-bias"]
    model_dir = make_model_dir(tmp_path / "model", trained_tokenizer("gpt2"), preset, **{**fields, "d_ff": 256})
    model, tokenizer = add_chat_tokens(*load_model(model_dir))
    chat_dir = save_model(tmp_path / "chat", model, tokenizer)
    reader, _ = _read_gguf(export_gguf(chat_dir, tmp_path / "chat.gguf", dtype="f32"))
    assert _field(reader, "tokenizer.chat_template") == CHATML_JINJA
    end_of_turn = tokenizer.special_tokens[IM_END]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == _field(reader, "tokenizer.ggml.eot_token_id") == end_of_turn
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.eot_id  # a prompt still starts after it
    assert _field(reader, "tokenizer.ggml.token_type")[end_of_turn] == gguf.TokenType.CONTROL
