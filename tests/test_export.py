"""Export to Hugging Face and GGUF, import from Hugging Face, each checked by an independent
consumer: transformers (AutoModelForCausalLM, AutoTokenizer, its GGUF loader) and the gguf
package's reader. Tolerances: fp32 logits 1e-4 (absolute and relative); f16 weights within
f16 rounding (relative 2^-11); q8_0 within half a quantization step of each block of 32."""

from __future__ import annotations

import argparse
import inspect
import json
import random
from pathlib import Path

import pytest
import torch

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.export import export_gguf, export_hf, import_hf
from scratchlm.export.hf_tokenizer import from_tokenizer_json
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import load_model, save_model
from scratchlm.tokenizer import Tokenizer, train_bpe
from tests.conftest import shared_file
from tests.test_tokenizer_gpt2 import CORPORA

transformers = pytest.importorskip("transformers")

_TOKENIZERS: dict[str, Tokenizer] = {}


def trained_tokenizer(pattern: str, vocab_size: int = 400) -> Tokenizer:
    """A BPE trained on Python source that ships with Python (always there, deterministic)."""
    key = f"{pattern}-{vocab_size}"
    if key not in _TOKENIZERS:
        text = inspect.getsource(argparse) + inspect.getsource(json)
        vocab, merges = train_bpe([text], vocab_size, pattern=pattern)
        _TOKENIZERS[key] = Tokenizer(vocab, merges, ["<|endoftext|>"], pattern=pattern)
    return _TOKENIZERS[key]


def make_model_dir(directory: Path, tokenizer: Tokenizer, preset: str = "tiny", **fields) -> Path:
    """A model directory with random weights; every weight (norms included, which start as ones)
    is perturbed so a mix-up between two tensors of the same shape changes the logits."""
    config = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, **fields)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(directory, model, tokenizer)


def _ids(config: ModelConfig, length: int = 24) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def _greedy_matches(ours: Transformer, theirs, eot: int) -> None:
    """transformers' greedy search continues a prompt with our tokens (it stops after eos)."""
    prompt = _ids(ours.config, 6)[:1]
    mine = list(ours.generate(prompt, 12, temperature=0.0, stop_token=eot))
    out = theirs.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=eot)[0, prompt.shape[1]:].tolist()
    assert out[:len(mine)] == mine
    if len(mine) < 12:
        assert out[len(mine)] == eot


# Llama (MHA untied with biases, GQA tied, MQA), Qwen3 (q/k norms), GPT-2 (with biases, and
# without: exported as zero biases), rope_theta other than 10000.
ARCHITECTURES = {
    "llama-mha-untied-bias": ("tiny", dict(n_heads=4, n_kv_heads=4, tie_embeddings=False, bias=True,
                                           rope_theta=500000.0)),
    "llama-gqa-tied": ("tiny", dict(n_heads=4, n_kv_heads=2, rope_theta=20000.0)),
    "llama-mqa": ("tiny", dict(n_heads=4, n_kv_heads=1)),
    "qwen3-qk-norm": ("tiny", dict(n_heads=4, n_kv_heads=2, qk_norm=True, tie_embeddings=False)),
    "gpt2-tied": ("gpt2-124m", dict(context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256)),
    "gpt2-untied-nobias": ("gpt2-124m", dict(context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                             d_ff=192, bias=False, tie_embeddings=False)),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_export_hf_matches_transformers_and_imports_back_bit_identical(name, tmp_path):
    preset, fields = ARCHITECTURES[name]
    tokenizer = trained_tokenizer("gpt4" if "qwen" in name else "gpt2")
    model_dir = make_model_dir(tmp_path / "model", tokenizer, preset, **fields)
    ours, _ = load_model(model_dir)
    hf_dir = export_hf(model_dir, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected_class = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
    assert type(theirs).__name__ == expected_class[name.split("-")[0]]
    idx = _ids(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
    _greedy_matches(ours, theirs, tokenizer.eot_id)
    # A tied head is stored once, as transformers saves it.
    stored = json.loads((hf_dir / "config.json").read_text())
    assert stored["tie_word_embeddings"] == ours.config.tie_embeddings

    back_dir = import_hf(hf_dir, tmp_path / "back")
    back, back_tokenizer = load_model(back_dir)
    assert back.config == ours.config
    assert back_tokenizer.fingerprint() == tokenizer.fingerprint()
    mine, theirs_back = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs_back.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs_back[key]), key


def test_export_hf_half_precision_round_trips_the_rounded_weights(tmp_path):
    tokenizer = trained_tokenizer("gpt2")
    model_dir = make_model_dir(tmp_path / "model", tokenizer, n_kv_heads=2)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        hf_dir = export_hf(model_dir, tmp_path / dtype, dtype=dtype)
        assert json.loads((hf_dir / "config.json").read_text())["dtype"] == dtype
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        assert theirs.dtype == torch_dtype
        back, _ = load_model(import_hf(hf_dir, tmp_path / f"{dtype}-back"))
        ours, _ = load_model(model_dir)
        for key, tensor in ours.state_dict().items():
            assert torch.equal(back.state_dict()[key], tensor.to(torch_dtype).float()), key


# --------------------------------------------------------------------------- tokenizers
def _random_unicode(rng: random.Random, length: int) -> str:
    """Mixed scripts, digits, whitespace runs, emoji, combining marks, controls; no surrogates
    (not encodable text)."""
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F),
              (0x300, 0x36F), (0x0, 0x1F), (0xE000, 0xE0FF), (0x10000, 0x1007F)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
        if rng.random() < 0.1:
            chars.append(rng.choice([" ", "  ", "\n", "\n\n", "\r\n", "'s", "'LL", "123456"]))
    return "".join(chars)


def _tokenizer_cases():
    yield "trained-gpt2", lambda: trained_tokenizer("gpt2")
    yield "trained-gpt4", lambda: trained_tokenizer("gpt4")
    yield "gpt2-own", lambda: Tokenizer.from_gpt2(shared_file("tokenizers/gpt2/encoder.json"),
                                                  shared_file("tokenizers/gpt2/vocab.bpe"))


@pytest.mark.parametrize("case", [name for name, _ in _tokenizer_cases()])
def test_autotokenizer_gives_our_ids_and_decode(case, tmp_path):
    tokenizer = dict(_tokenizer_cases())[case]()
    model_dir = make_model_dir(tmp_path / "model", tokenizer, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                               d_ff=64)
    hf_dir = export_hf(model_dir, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = {f"random-{seed}": _random_unicode(random.Random(seed), 3000) for seed in range(20)}
    for corpus in CORPORA:
        try:
            texts[corpus] = shared_file(corpus).read_text(encoding="utf-8")
        except pytest.skip.Exception:
            pass  # the random texts still run without the shared data
    for name, text in texts.items():
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text), name
        assert theirs.decode(ids) == tokenizer.decode(ids) == text, name
    # transformers recognises special tokens written in text (chat templates rely on it); our
    # encode() does when asked, and split_special_tokens=True gives our ordinary-text default.
    text = "a<|endoftext|>b <|endoftext|>"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text, allowed_special="all")
    assert theirs.encode(text, add_special_tokens=False, split_special_tokens=True) == tokenizer.encode(text)
    # With special tokens added (the default), <|endoftext|> starts the text, as in generation.
    assert theirs("def f():").input_ids == [tokenizer.eot_id] + tokenizer.encode("def f():")
    # tokenizer.json read back by our importer is the same tokenizer.
    assert from_tokenizer_json(hf_dir / "tokenizer.json").fingerprint() == tokenizer.fingerprint()


# --------------------------------------------------------------------------- bad input
def test_export_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    tokenizer = trained_tokenizer("gpt2")
    model_dir = make_model_dir(tmp_path / "model", tokenizer, n_kv_heads=2)

    def fails(argv: list[str], message: str) -> None:
        before = sorted(p.name for p in tmp_path.iterdir())
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        assert code != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary leftovers

    fails(["export", "hf", str(tmp_path / "nope"), str(tmp_path / "out")], "nope/config.json: not found")
    fails(["export", "gguf", str(tmp_path / "nope"), str(tmp_path / "out.gguf")], "nope/config.json: not found")
    fails(["export", "hf", str(model_dir), str(tmp_path / "out"), "--dtype", "int4"], "invalid choice: 'int4'")
    fails(["export", "gguf", str(model_dir), str(tmp_path / "out.gguf"), "--dtype", "q4_0"], "invalid choice")
    fails(["export", "gguf", str(model_dir), str(tmp_path)], "is a directory")
    fails(["export", "hf", str(model_dir), str(model_dir)], "is not empty")
    with pytest.raises(ScratchLMError, match="unknown dtype 'fp8'"):
        export_hf(model_dir, tmp_path / "out", dtype="fp8")

    # Corrupt weights: refused, and the output directory is not created.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in model_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    fails(["export", "hf", str(corrupt), str(tmp_path / "out")], "unreadable safetensors")
    fails(["export", "gguf", str(corrupt), str(tmp_path / "out.gguf")], "unreadable safetensors")

    # An existing file is replaced only with --overwrite.
    target = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(model_dir), str(target)]) == 0
    capsys.readouterr()
    fails(["export", "gguf", str(model_dir), str(target)], "exists; use --overwrite")
    assert main(["export", "gguf", str(model_dir), str(target), "--overwrite", "--dtype", "q8_0"]) == 0


def test_export_refuses_architectures_transformers_lacks(tmp_path):
    tokenizer = trained_tokenizer("gpt2")
    cases = {"norm: layernorm with RoPE": dict(norm="layernorm"),
             "mlp: gelu with RoPE": dict(mlp="gelu"),
             "qk_norm and bias": dict(qk_norm=True, bias=True)}
    for message, fields in cases.items():
        model_dir = make_model_dir(tmp_path / message.split(":")[0].replace(" ", "_"), tokenizer, **fields)
        for export in (lambda: export_hf(model_dir, tmp_path / "hf"), lambda: export_gguf(model_dir, tmp_path / "m.gguf")):
            with pytest.raises(ScratchLMError, match=message.split(" with")[0]):
                export()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
