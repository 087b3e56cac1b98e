"""The `scratchlm model info` and `scratchlm generate` commands."""

from __future__ import annotations

import torch

from scratchlm.cli import main
from scratchlm.infer import generate_text
from scratchlm.model import ModelConfig, Transformer, save_model
from scratchlm.tokenizer import Tokenizer


def test_model_info_of_a_preset(capsys):
    assert main(["model", "info", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "85,056,000" in out and "855,166,464" in out
    assert main(["model", "info", "tiny", "--vocab-size", "4096"]) == 0
    assert "4096" in capsys.readouterr().out


def test_model_info_and_generate_from_a_directory(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=257, context_length=64)).eval()
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    save_model(tmp_path / "m", model, tokenizer)
    assert main(["model", "info", str(tmp_path / "m")]) == 0
    assert "model directory" in capsys.readouterr().out
    args = ["generate", str(tmp_path / "m"), "--prompt", "Once", "--max-tokens", "12", "--seed", "3"]
    assert main(args + ["--temperature", "0"]) == 0
    expected = generate_text(model, tokenizer, "Once", max_new_tokens=12, temperature=0)
    assert capsys.readouterr().out == expected + "\n"
    assert main(args + ["--top-k", "5", "--top-p", "0.9"]) == 0
    expected = generate_text(model, tokenizer, "Once", max_new_tokens=12, temperature=0.8, top_k=5,
                             top_p=0.9, seed=3)
    assert capsys.readouterr().out == expected + "\n"


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["model", "info", "no-such-preset"]) == 1
    assert "neither a preset" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.startswith("scratchlm: error: ")
    assert main(["generate", str(tmp_path), "--prompt", "x", "--temperature", "-1"]) == 1
