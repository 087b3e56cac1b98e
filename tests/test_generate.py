"""Sampling and generation: token level (Transformer.generate) and text level (scratchlm.infer)."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.infer import generate, generate_text
from scratchlm.model import Transformer
from scratchlm.model.sampling import sample_next_token
from scratchlm.tokenizer import Tokenizer
from tests.tiny_chat import peaked_tiny_model

VOCAB = 257  # byte tokenizer: 256 bytes + <|endoftext|>


@pytest.fixture(scope="module")
def model() -> Transformer:
    return peaked_tiny_model(VOCAB, context_length=24)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def greedy_without_cache(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


# --------------------------------------------------------------------------- token level
def test_greedy_with_cache_equals_recomputed_argmax(model):
    prompt = [5, 100, 42, 7]
    expected = greedy_without_cache(model, prompt, 15)  # 19 tokens: within the 24-token window
    assert list(model.generate(torch.tensor([prompt]), 15, temperature=0)) == expected
    assert list(model.generate(torch.tensor([prompt]), 15, top_k=1)) == expected


def test_generation_runs_past_the_context_window(model):
    """Once 24 positions are used the cache is rebuilt from the last 12 tokens."""
    prompt = [1, 2, 3]
    out = list(model.generate(torch.tensor([prompt]), 40, temperature=0))
    assert len(out) == 40
    tokens = prompt + out
    # Until the window is full, nothing changes from the plain computation.
    assert out[:21] == greedy_without_cache(model, prompt, 21)
    # The first token after the rebuild is the argmax given only the most recent 12 tokens.
    assert out[21] == int(model(torch.tensor([tokens[12:24]]))[0, -1].argmax())


def test_seeds_make_sampling_reproducible(model):
    def sample(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return list(model.generate(torch.tensor([[1]]), 20, temperature=1.5, generator=gen))
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_stop_token_ends_generation_before_it(model):
    greedy = list(model.generate(torch.tensor([[9, 9]]), 6, temperature=0))
    stop = greedy[3]
    first = greedy.index(stop)
    assert list(model.generate(torch.tensor([[9, 9]]), 6, temperature=0, stop_token=stop)) == greedy[:first]


def test_generate_restores_training_mode(model):
    model.train()
    try:
        list(model.generate(torch.tensor([[1]]), 2))
        assert model.training
    finally:
        model.eval()


def test_bad_arguments(model):
    with pytest.raises(ScratchLMError, match="shape"):
        next(model.generate(torch.tensor([[1], [2]]), 3))
    with pytest.raises(ScratchLMError, match="top_p"):
        next(model.generate(torch.tensor([[1]]), 3, top_p=0.0))
    with pytest.raises(ScratchLMError, match="temperature"):
        next(model.generate(torch.tensor([[1]]), 3, temperature=-1))


# --------------------------------------------------------------------------- sampling filters
def _draws(logits: torch.Tensor, n: int = 400, **kwargs) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {sample_next_token(logits, generator=gen, **kwargs) for _ in range(n)}


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    assert _draws(logits) == {0, 1, 2, 3}
    assert _draws(logits, top_k=2) == {1, 3}
    # Nucleus 0.7: 0.5 is not enough, 0.5 + 0.3 reaches it, so tokens 1 and 3 remain.
    assert _draws(logits, top_p=0.7) == {1, 3}
    assert _draws(logits, top_p=0.8) == {1, 3}  # reached exactly: the next token is not needed
    assert _draws(logits, top_p=0.81) == {1, 2, 3}
    assert _draws(logits, top_p=1e-6) == {1}
    assert sample_next_token(logits, temperature=0) == 1


# --------------------------------------------------------------------------- text level
@pytest.mark.parametrize("seed", range(5))
def test_text_pieces_join_to_the_decoded_tokens(model, tokenizer, seed):
    """Random bytes from an untrained model are mostly invalid UTF-8: the streamed pieces
    must still join to exactly what Tokenizer.decode gives for the same tokens."""
    pieces = list(generate(model, tokenizer, "Hi", max_new_tokens=30, temperature=1.0, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    # The prompt starts a document: it follows <|endoftext|>, as documents do in training.
    ids = list(model.generate(torch.tensor([[tokenizer.eot_id] + tokenizer.encode("Hi")]), 30,
                              temperature=1.0, generator=gen, stop_token=tokenizer.eot_id))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert generate_text(model, tokenizer, "Hi", max_new_tokens=30, temperature=1.0, seed=seed) == "".join(pieces)


def test_incomplete_characters_are_held_back(model, tokenizer, monkeypatch):
    # "é" is 0xC3 0xA9 and "€" is 0xE2 0x82 0xAC: one byte per token here.
    sequence = list("a".encode()) + list("é€".encode()) + [0xE2]
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: iter(sequence))
    pieces = list(generate(model, tokenizer, "x", max_new_tokens=10))
    assert pieces == ["a", "é", "€", "\ufffd"]  # the dangling 0xE2 is flushed at the end


def test_empty_prompt_starts_a_new_document(model, tokenizer):
    assert generate_text(model, tokenizer, "", max_new_tokens=5, temperature=0) == \
        tokenizer.decode(greedy_without_cache(model, [tokenizer.eot_id], 5))


def test_prompt_is_ordinary_text_after_a_document_start(model, tokenizer, monkeypatch):
    seen = {}

    def record(idx, *args, **kwargs):
        seen["prompt"] = idx[0].tolist()
        return iter([])

    monkeypatch.setattr(model, "generate", record)
    generate_text(model, tokenizer, "a<|endoftext|>b", max_new_tokens=3)
    # One EOT, the document start; the one written in the prompt is text (forging nothing).
    assert seen["prompt"] == [tokenizer.eot_id] + list(b"a<|endoftext|>b")


def test_a_prompt_longer_than_the_context_is_cropped_with_a_notice(model, tokenizer, monkeypatch):
    seen, notices = {}, []
    monkeypatch.setattr(model, "generate", lambda idx, *a, **k: seen.update(prompt=idx[0].tolist()) or iter([]))
    long_prompt = "x" * (model.config.context_length + 10)
    generate_text(model, tokenizer, long_prompt, max_new_tokens=3, notice=notices.append)
    assert len(seen["prompt"]) == model.config.context_length
    assert len(notices) == 1 and "sees only its last" in notices[0]


@pytest.mark.parametrize("option, value, message", [
    ("--max-tokens", "-1", "max tokens must be at least 1"),
    ("--max-tokens", "0", "max tokens must be at least 1"),
    ("--temperature", "-0.5", "temperature must be >= 0"),
    ("--top-k", "0", "top_k must be >= 1"),
    ("--top-p", "1.5", "top_p must be in"),
])
def test_bad_generation_options_fail_before_the_model_is_loaded(option, value, message, tmp_path, capsys,
                                                                 monkeypatch):
    import scratchlm.model.directory as directory
    from scratchlm.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(directory, "load_model", must_not_load)
    assert main(["generate", str(tmp_path / "no-model"), "--prompt", "x", option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
