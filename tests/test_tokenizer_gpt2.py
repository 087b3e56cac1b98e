"""Acceptance: GPT-2's own files give tiktoken's `gpt2` ids; trained tokenizers round-trip and
their two encoders agree, on every shared corpus."""

from __future__ import annotations

import hashlib
import shutil
import tracemalloc

import pytest

from scratchlm.tokenizer import Tokenizer
from tests.conftest import shared_file

EOT = "<|endoftext|>"
CORPORA = [
    "corpora/tinystories_valid_head.txt",
    "corpora/tinystories_train_head.txt",
    "corpora/tinyshakespeare.txt",
    "corpora/wiki_demo.txt",
    "corpora/c4_demo.jsonl",
]
# The reference encoder is plain Python; this much of each corpus keeps the suite quick.
REFERENCE_SLICE = 150_000
# tiktoken's gpt2() fetches these URLs (tiktoken_ext/openai_public.py) and caches each file under
# the sha1 of its URL; seeding that cache from the shared copies makes it work offline.
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def read_corpus(name: str) -> str:
    return shared_file(name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, url in GPT2_URLS.items():
        shutil.copy(shared_file(f"tokenizers/gpt2/{name}"), cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        import tiktoken
        from tiktoken_ext import openai_public

        # Built here rather than via tiktoken.get_encoding, whose registry may cache across tests.
        return tiktoken.Encoding(**openai_public.gpt2())
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gpt2(shared_file("tokenizers/gpt2/encoder.json"), shared_file("tokenizers/gpt2/vocab.bpe"))


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request) -> Tokenizer:
    files = [shared_file(n) for n in ("corpora/tinystories_valid_head.txt", "corpora/wiki_demo.txt")]
    return Tokenizer.train(files, vocab_size=3000, special_tokens=[EOT], pattern=request.param)


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.vocab[0] == b"!" and len(gpt2.merges) == 50000


@pytest.mark.parametrize("corpus", CORPORA)
def test_gpt2_ids_match_tiktoken(gpt2, tiktoken_gpt2, corpus):
    text = read_corpus(corpus)
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.decode(ids) == text
    # special tokens inside the text, at the start, the end and back to back: ordinary text by
    # default (tiktoken's encode_ordinary), single ids when allowed
    with_specials = EOT + text[:50_000].replace("\n\n", f"\n{EOT}\n", 200) + EOT + EOT
    assert gpt2.encode(with_specials) == tiktoken_gpt2.encode_ordinary(with_specials)
    assert (gpt2.encode(with_specials, allowed_special="all")
            == tiktoken_gpt2.encode(with_specials, allowed_special="all"))


@pytest.mark.parametrize("corpus", CORPORA)
def test_gpt2_reference_encoder_matches(gpt2, tiktoken_gpt2, corpus):
    text = read_corpus(corpus)[:REFERENCE_SLICE // 3]
    assert gpt2.encode_reference(text) == tiktoken_gpt2.encode_ordinary(text)


@pytest.mark.parametrize("corpus", CORPORA)
def test_trained_round_trip_and_encoders_agree(trained, corpus):
    text = read_corpus(corpus)
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    piece = text[:REFERENCE_SLICE]
    assert trained.encode_reference(piece) == trained.encode(piece)


def test_trained_matches_tiktoken_built_independently(trained):
    """Our ids equal those of a tiktoken Encoding built directly from the saved ranks."""
    import tiktoken

    ranks = {t: i for i, t in trained.vocab.items() if i not in trained.special_tokens.values()}
    encoding = tiktoken.Encoding("independent", pat_str=trained._pattern_regex,
                                 mergeable_ranks=ranks, special_tokens=trained.special_tokens)
    text = read_corpus("corpora/tinyshakespeare.txt")
    assert trained.encode(text) == encoding.encode_ordinary(text)


@pytest.mark.slow
def test_encode_iterable_large_file_bounded_memory(gpt2, tmp_path):
    text = read_corpus("corpora/tinyshakespeare.txt")
    path = tmp_path / "big.txt"
    path.write_text(text * 5, encoding="utf-8")  # 5.6 MB
    expected = gpt2.encode(text * 5)
    mismatches = count = 0
    tracemalloc.start()
    try:
        with open(path, encoding="utf-8") as f:
            for count, (got, want) in enumerate(zip(gpt2.encode_iterable(f), expected), start=1):
                mismatches += got != want
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(expected) and mismatches == 0
    assert peak < 10 * 2**20, f"peak {peak / 2**20:.1f} MiB"
