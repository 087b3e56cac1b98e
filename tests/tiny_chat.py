"""Tiny random-weight model directories for the chat front ends' tests (terminal and web page):
what they check is the plumbing (rendering, streaming, commands), not what the model says."""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import save_model
from scratchlm.post.chat import add_chat_tokens
from scratchlm.tokenizer import Tokenizer, train_bpe

_TEXT = ("the cat sat on the mat and the dog ran after the ball in the park while birds sang "
         "hello there how are you today what is the weather like tell me a story about a fox ")


def save_tiny_model(path: Path, *, chat: bool, context_length: int = 64) -> Path:
    """A 2-layer model directory at `path`; with `chat`, given the ChatML tokens as
    `scratchlm sft` does (a chat model), else a base model that only knows plain text."""
    tokenizer = Tokenizer(*train_bpe([_TEXT] * 4, 300), ["<|endoftext|>"])
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=context_length,
                                     d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192)
    model = Transformer(config)
    if chat:
        model, tokenizer = add_chat_tokens(model, tokenizer)
    return save_model(path, model, tokenizer)


def peaked_tiny_model(vocab_size: int, context_length: int) -> Transformer:
    """A 2-layer random model in eval mode whose weights are scaled up: larger weights than at
    init give peaked, well-separated logits, so a greedy choice never hinges on a 1e-7
    rounding difference between cached and uncached (or batched and alone) computation."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(
        "tiny", vocab_size=vocab_size, context_length=context_length, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=2, d_ff=64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()

