"""Byte-level BPE: training against a naive reference, encoding, special tokens, files, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import ScratchLMError
from scratchlm.sources import SourceStats, iter_documents_from, split_text
from scratchlm.tokenizer import TOKENIZER_FILES, Tokenizer, train_bpe
from scratchlm.tokenizer.pretokenize import PATTERNS, count_pretokens
from scratchlm.tokenizer.train import bpe_merges
from tests.conftest import shared_file

EOT = "<|endoftext|>"
SAMPLE = (
    "Once upon a time there was a little dog named Spot. Spot liked to run.\n"
    "One day, Spot saw a big red ball! He ran to the ball and played all day.\n"
    "The end.<|endoftext|>Lily and Tom were friends. They liked to share their toys, "
    "and they'd sing: 1234 la-la-la... \u00e9t\u00e9 \u65e5\u672c\u8a9e \U0001f600\n"
) * 20


def naive_bpe(word_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Textbook BPE, recounting every pair each round: the independent reference for training."""
    words = {tuple(bytes([b]) for b in w): c for w, c in word_counts.items()}
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties: greatest pair of byte strings
        merges.append(best)
        merged: dict[tuple[bytes, ...], int] = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("corpus") / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    return Tokenizer.train(path, vocab_size=400, special_tokens=[EOT])


# --------------------------------------------------------------------------- training
def test_merges_match_naive_reference_on_real_text():
    corpus = shared_file("corpora/tinystories_train_head.txt")
    counts = count_pretokens(split_text(corpus.read_text(encoding="utf-8"), "blank", 1000), workers=1)
    token_bytes, merges = bpe_merges(counts, 150)
    assert [(token_bytes[a], token_bytes[b]) for a, b in merges] == naive_bpe(counts, 150)


@pytest.mark.parametrize("words", [
    {b"aaaa": 3, b"aaa": 2},            # overlapping pairs of one token: (a, a) then (aa, aa)
    {b"abab": 5, b"ba": 4, b"abba": 2},  # back-to-back occurrences share a neighbour pair
    {b"xy": 1, b"yx": 1, b"zz": 1},      # all tied: the greatest pair of byte strings wins
    {b"ab\x00": 2, b"ab": 2, b"\xff\xfe": 2},  # NUL and high bytes in tie-breaks
])
def test_merges_match_naive_reference_on_edge_cases(words):
    token_bytes, merges = bpe_merges(words, 20)
    assert [(token_bytes[a], token_bytes[b]) for a, b in merges] == naive_bpe(words, len(merges))
    assert naive_bpe(words, len(merges) + 1) == naive_bpe(words, len(merges))  # ran out of pairs


def test_tie_break_prefers_greatest_byte_pair():
    # ("b", "a") and ("a", "b") both occur twice: the greater pair of byte strings goes first.
    _, merges = bpe_merges({b"ab": 2, b"ba": 2}, 1)
    assert merges == [(ord("b"), ord("a"))]


def test_train_bpe_vocab_layout():
    vocab, merges = train_bpe([SAMPLE], 300, [EOT, "<|pad|>"])
    assert len(vocab) == 300
    assert all(vocab[b] == bytes([b]) for b in range(256))
    assert vocab[298] == EOT.encode() and vocab[299] == b"<|pad|>"
    assert [vocab[256 + i] for i in range(len(merges))] == [l + r for l, r in merges]


def test_documents_are_never_merged_across(sample_file):
    # The sample file's <|endoftext|> separators are its document boundaries (the file format):
    # they are removed by the reader and never learned.
    vocab, _ = train_bpe(split_text(SAMPLE, "eot", 1), 600, [EOT])
    assert vocab[len(vocab) - 1] == EOT.encode()
    regular = [vocab[i] for i in range(len(vocab) - 1)]
    # Were the separator pre-tokenized like text, its 20 copies would yield "<|" and "|>".
    assert not any(b"<|" in t or b"|>" in t for t in regular)
    assert Tokenizer.train(sample_file, 600, [EOT]).vocab == vocab


def test_special_token_text_inside_a_document_is_ordinary_text():
    # A document that spells a special token (a web page quoting <|endoftext|>) is text: the
    # trainer counts its characters like any others.
    docs = [f"see the token {EOT} here"] * 30
    vocab, merges = train_bpe(docs, 300, [EOT])
    assert any(b"<|" in left + right or b"|>" in left + right for left, right in merges)


def single_pass_counts(texts: list[str], pattern: str) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(w.encode("utf-8") for w in regex.findall(PATTERNS[pattern], text))
    return counts


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_parallel_batched_counting_equals_single_pass(pattern):
    docs = (split_text(shared_file("corpora/tinyshakespeare.txt").read_text(encoding="utf-8"), "blank", 1000)
            + ["CRLF lines\r\nhere.\r\n\r\nNext paragraph  \n\n  \nend.\n"]
            + split_text(shared_file("corpora/tinystories_valid_head.txt").read_text(encoding="utf-8"), "blank", 1000))
    parallel = count_pretokens(docs, pattern, workers=2, batch_chars=16_384)  # ~120 batches
    assert parallel == single_pass_counts(docs, pattern)


def test_training_is_deterministic_across_worker_counts():
    docs = split_text(shared_file("corpora/tinystories_train_head.txt").read_text(encoding="utf-8"), "blank", 500)
    one = train_bpe(docs, 500, [EOT], workers=1)
    two = train_bpe(iter(docs), 500, [EOT], workers=2)
    assert one == two


def test_invalid_utf8_becomes_replacement_characters_and_is_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 au lait ok ok ok\n" * 50)
    stats = SourceStats(input=str(path))
    texts = [d.text for d in iter_documents_from(str(path), stats=stats)]
    assert texts[0] == "caf\ufffd au lait ok ok ok" and stats.invalid_utf8_bytes == 50
    _, merges = train_bpe(texts, 280, [])
    assert any(b"\xef\xbf" in left + right for left, right in merges)  # U+FFFD is EF BF BD


def test_gpt4_pattern_trains_and_round_trips(sample_file):
    tok = Tokenizer.train(sample_file, 350, [EOT], pattern="gpt4")
    assert tok.pattern == "gpt4"
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode(SAMPLE) == tok.encode_reference(SAMPLE)


# --------------------------------------------------------------------------- encoding
def test_fast_and_reference_encoders_agree(small_tokenizer):
    assert small_tokenizer.fast_path_available
    assert small_tokenizer.encode(SAMPLE) == small_tokenizer.encode_reference(SAMPLE)


def test_special_tokens_in_text_are_ordinary_unless_allowed(small_tokenizer):
    # By default the string of a special token is text: data cannot forge a boundary.
    ordinary = small_tokenizer.encode(f"a{EOT}b")
    assert small_tokenizer.eot_id not in ordinary and len(ordinary) > 3
    assert ordinary == small_tokenizer.encode_ordinary(f"a{EOT}b") == small_tokenizer.encode_reference(f"a{EOT}b")
    assert small_tokenizer.decode(ordinary) == f"a{EOT}b"
    ids = small_tokenizer.encode(f"a{EOT}b", allowed_special="all")
    assert ids.count(small_tokenizer.eot_id) == 1
    assert ids == small_tokenizer.encode(f"a{EOT}b", allowed_special={EOT})
    assert ids == small_tokenizer.encode_reference(f"a{EOT}b", allowed_special="all")
    assert small_tokenizer.decode(ids) == f"a{EOT}b"
    with pytest.raises(ScratchLMError, match="not a special token"):
        small_tokenizer.encode("x", allowed_special={"<|nope|>"})
    plain = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges)  # no special tokens registered
    assert small_tokenizer.eot_id not in plain.encode(f"a{EOT}b")
    with pytest.raises(ScratchLMError, match="not a special token"):
        plain.encode(f"a{EOT}b", allowed_special={EOT})
    assert plain.decode(plain.encode(f"a{EOT}b")) == f"a{EOT}b"


def test_overlapping_special_tokens_longest_first(small_tokenizer):
    double = EOT + EOT
    tok = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, [EOT, double])
    ids = tok.encode(f"x{double}{EOT}y", allowed_special="all")
    assert ids[1:3] == [tok.special_tokens[double], tok.special_tokens[EOT]]
    assert tok.encode_reference(f"x{double}{EOT}y", allowed_special="all") == ids


def test_decode_invalid_utf8_uses_replacement_character(small_tokenizer):
    ids = small_tokenizer.encode("\u00e9")  # two bytes, c3 a9
    lone = [i for i in range(256) if small_tokenizer.vocab[i] == b"\xc3"]
    assert small_tokenizer.decode(lone) == "\ufffd"
    assert small_tokenizer.decode(ids) == "\u00e9"
    with pytest.raises(ScratchLMError, match="outside the vocabulary"):
        small_tokenizer.decode([small_tokenizer.vocab_size])


def test_encode_iterable_equals_encode(small_tokenizer):
    lines = SAMPLE.splitlines(keepends=True) * 200  # enough text to be cut into several pieces
    assert list(small_tokenizer.encode_iterable(iter(lines))) == small_tokenizer.encode("".join(lines))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_random_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.encode_reference(text) == ids


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab1 \n\r.'s\t"), max_size=30), max_size=30),
       st.sampled_from(["gpt2", "gpt4"]))
def test_encode_iterable_random_pieces(small_tokenizer, pieces, pattern):
    import scratchlm.tokenizer.tokenizer as tokmod

    tok = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, [EOT], pattern=pattern)
    flush, tokmod.FLUSH_CHARS = tokmod.FLUSH_CHARS, 8  # cut as often as the safe edges allow
    try:
        assert list(tok.encode_iterable(pieces)) == tok.encode("".join(pieces))
    finally:
        tokmod.FLUSH_CHARS = flush


def test_token_byte_lengths_and_fingerprint(small_tokenizer):
    lengths = small_tokenizer.token_byte_lengths()
    assert lengths.shape == (small_tokenizer.vocab_size,) and lengths[small_tokenizer.eot_id] == 0
    ids = small_tokenizer.encode(SAMPLE.replace(EOT, ""))
    assert int(lengths[np.array(ids)].sum()) == len(SAMPLE.replace(EOT, "").encode())
    other = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges[:-1], [EOT])
    assert other.fingerprint() != small_tokenizer.fingerprint()


# --------------------------------------------------------------------------- files
def test_save_load_round_trip(small_tokenizer, tmp_path):
    small_tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab == small_tokenizer.vocab and loaded.merges == small_tokenizer.merges
    assert loaded.special_tokens == small_tokenizer.special_tokens
    assert loaded.fingerprint() == small_tokenizer.fingerprint()
    settings_json = json.loads((tmp_path / "tokenizer.json").read_text())
    assert settings_json["special_tokens"] == {EOT: small_tokenizer.eot_id}
    assert '" the"' in (tmp_path / "vocab.txt").read_text()  # readable tokens


def test_save_load_arbitrary_bytes(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"\xff", b"\x00"), (b"\n", b"\\"), (b'"', b"\xdc"), (b"\xff\x00", b" ")]
    for l, r in merges:
        vocab[len(vocab)] = l + r
    tok = Tokenizer(vocab, merges, ["<|sp|>"])
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab == tok.vocab and loaded.merges == merges


def test_load_missing_and_corrupt(small_tokenizer, tmp_path):
    with pytest.raises(ScratchLMError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    small_tokenizer.save(tmp_path)
    merges = tmp_path / "merges.txt"
    lines = merges.read_text().split("\n")
    lines[4] = '"th" oops'
    merges.write_text("\n".join(lines))
    with pytest.raises(ScratchLMError, match=r"merges.txt:5: bad merge line"):
        Tokenizer.load(tmp_path)
    merges.unlink()
    with pytest.raises(ScratchLMError, match="merges.txt"):
        Tokenizer.load(tmp_path)
    small_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ScratchLMError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_truncated_or_edited_files_fail_the_fingerprint(small_tokenizer, tmp_path):
    small_tokenizer.save(tmp_path)
    merges = tmp_path / "merges.txt"
    lines = merges.read_text(encoding="utf-8").splitlines(keepends=True)
    # Cut at a line boundary: every remaining line parses, the tokenizer would encode differently.
    merges.write_text("".join(lines[:-40]), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="corrupt tokenizer.*truncated"):
        Tokenizer.load(tmp_path)
    # Same number of merges, two swapped: only the fingerprint can tell.
    lines[10], lines[11] = lines[11], lines[10]
    merges.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="fingerprint"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------- bad input
def test_bad_training_input(tmp_path, sample_file):
    with pytest.raises(ScratchLMError, match="not found"):
        Tokenizer.train(tmp_path / "missing.txt", 300, [EOT])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ScratchLMError, match="no text"):
        Tokenizer.train(empty, 300, [EOT])
    with pytest.raises(ScratchLMError, match="below 256 bytes \\+ 2 special tokens = 258"):
        train_bpe([SAMPLE], 257, [EOT, "<|pad|>"])
    only_separators = tmp_path / "special.txt"
    only_separators.write_text(EOT * 3)
    with pytest.raises(ScratchLMError, match="no text"):
        Tokenizer.train(only_separators, 300, [EOT])
    with pytest.raises(ScratchLMError, match="pattern"):
        train_bpe([SAMPLE], 300, [EOT], pattern="gpt7")
    with pytest.raises(ScratchLMError, match="iterable of documents"):
        train_bpe(SAMPLE, 300, [EOT])


def test_inconsistent_vocab_is_rejected():
    vocab = {i: bytes([i]) for i in range(255)}
    with pytest.raises(ScratchLMError, match="single byte"):
        Tokenizer(vocab, [])
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ScratchLMError, match="not in the vocab"):
        Tokenizer(vocab, [(b"a", b"b")])
