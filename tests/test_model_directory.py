"""Model directories: round trips, tied weights, and clear errors for broken directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig, Transformer, load_config, load_model, save_model
from scratchlm.tokenizer import Tokenizer


def byte_tokenizer(*extra_specials: str) -> Tokenizer:
    """256 single bytes + <|endoftext|> (257 tokens): no training needed."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>", *extra_specials])


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(
        "tiny", vocab_size=257, context_length=32, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=2, d_ff=64, **overrides))


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, norm="layernorm", position="learned",
                                                 mlp="gelu", bias=True)])
def test_round_trip_gives_identical_logits(tmp_path, overrides):
    model = tiny_model(**overrides).eval()
    save_model(tmp_path / "m", model, byte_tokenizer(), extra={"step": 7})
    loaded, tokenizer = load_model(tmp_path / "m")
    idx = torch.randint(0, 257, (2, 20))
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded(idx), model(idx))
    assert tokenizer.vocab_size == 257 and tokenizer.eot_id == 256
    assert load_config(tmp_path / "m")[1] == {"step": 7}
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_tied_weights_are_stored_once(tmp_path):
    save_model(tmp_path / "m", tiny_model(), byte_tokenizer())
    names = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert "tok_emb.weight" in names and "lm_head.weight" not in names
    assert not any(name.startswith("rope_") for name in names)  # derived buffers stay out


def test_tokenizer_vocab_mismatch_is_refused(tmp_path):
    model = tiny_model()
    with pytest.raises(ScratchLMError, match="258 tokens.*vocab_size is 257"):
        save_model(tmp_path / "m", model, byte_tokenizer("<|pad|>"))
    save_model(tmp_path / "m", model, byte_tokenizer())
    byte_tokenizer("<|pad|>").save(tmp_path / "m")  # swap in a 258-token tokenizer
    with pytest.raises(ScratchLMError, match="tokenizer has 258 tokens.*vocab_size 257"):
        load_model(tmp_path / "m")


def _break(directory, how: str) -> str:
    config, weights = directory / "config.json", directory / "model.safetensors"
    if how == "no config":
        config.unlink()
        return "config.json: not found"
    if how == "bad json":
        config.write_text("{not json")
        return "config.json: invalid JSON"
    if how == "unknown field":
        config.write_text(json.dumps({**json.loads(config.read_text()), "colour": "red"}))
        return "config.json: unknown model field.*colour"
    if how == "bad field":
        config.write_text(json.dumps({**json.loads(config.read_text()), "n_kv_heads": 3}))
        return "field n_heads"
    if how == "future format":
        config.write_text(json.dumps({**json.loads(config.read_text()), "format_version": 99}))
        return "format_version 99"
    if how == "no weights":
        weights.unlink()
        return "model.safetensors: not found"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return "model.safetensors: unreadable"
    if how == "wrong shapes":
        config.write_text(json.dumps({**json.loads(config.read_text()), "d_ff": 96}))
        return r"model.safetensors: blocks.0.mlp.gate.weight has shape \(64, 32\), config needs \(96, 32\)"
    if how == "missing layer":  # config says 3 layers, the weights hold 2
        config.write_text(json.dumps({**json.loads(config.read_text()), "n_layers": 3}))
        return "model.safetensors: weights do not match.*blocks.2"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no config", "bad json", "unknown field", "bad field", "future format",
                                 "no weights", "truncated weights", "wrong shapes", "missing layer"])
def test_broken_directories_name_the_problem(tmp_path, how):
    save_model(tmp_path / "m", tiny_model(), byte_tokenizer())
    expected = _break(tmp_path / "m", how)
    with pytest.raises(ScratchLMError, match=expected):
        load_model(tmp_path / "m")


def test_saving_over_an_existing_directory_needs_overwrite_and_keeps_other_files(tmp_path):
    save_model(tmp_path / "m", tiny_model(), byte_tokenizer(), extra={"v": 1})
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match="not empty.*--overwrite"):
        save_model(tmp_path / "m", tiny_model(), byte_tokenizer(), extra={"v": 2})
    assert load_config(tmp_path / "m")[1] == {"v": 1}
    save_model(tmp_path / "m", tiny_model(), byte_tokenizer(), extra={"v": 2}, overwrite=True)
    assert load_config(tmp_path / "m")[1] == {"v": 2}
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporaries left behind
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]
