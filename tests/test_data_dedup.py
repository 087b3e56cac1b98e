"""Exact and MinHash/LSH near-duplicate detection on real shared-corpus documents."""

from __future__ import annotations

import random

import numpy as np
import pytest

from scratchlm.data.dedup import (
    MinHasher, choose_bands, estimated_jaccard, exact_key, near_duplicate_keep_mask, near_duplicate_pairs,
    word_hashes_of,
)
from scratchlm.sources import iter_documents_from
from tests.conftest import shared_file

THRESHOLD = 0.8


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard of word n-gram sets, computed with plain Python sets (the reference)."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def edit(text: str, rng: random.Random, kind: str) -> str:
    words = text.split()
    if kind == "replace_1pct":
        for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[i] = "EDITED"
    elif kind == "delete_2pct":
        drop = set(rng.sample(range(len(words)), max(1, len(words) // 50)))
        words = [w for i, w in enumerate(words) if i not in drop]
    elif kind == "append_line":
        words += "Share this article with your friends on social media.".split()
    elif kind == "truncate_5pct":
        words = words[: len(words) - len(words) // 20]
    elif kind == "replace_15pct":  # a heavy rewrite: must NOT count as a near-duplicate
        for i in rng.sample(range(len(words)), len(words) * 15 // 100):
            words[i] = f"word{i}"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = []
    for name in ("corpora/c4_demo.jsonl", "corpora/wiki_demo.txt", "corpora/tinystories_valid_head.txt"):
        docs += [d.text for d in iter_documents_from(str(shared_file(name)))]
    return docs


def test_exact_key_ignores_case_and_whitespace():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello, world")


def test_bands_put_the_s_curve_near_the_threshold():
    bands, rows = choose_bands(128, THRESHOLD)
    assert bands * rows <= 128
    assert 0.7 <= (1 / bands) ** (1 / rows) <= 0.85
    s = 0.9
    assert 1 - (1 - s**rows) ** bands > 0.99  # a 0.9-similar pair is almost surely a candidate


def test_minhash_estimate_matches_exact_jaccard(corpus):
    rng = random.Random(1)
    hasher = MinHasher()
    base = [d for d in corpus if len(d.split()) > 300][:20]
    for doc in base:
        for kind in ("replace_1pct", "delete_2pct", "replace_15pct"):
            copy = edit(doc, rng, kind)
            est = estimated_jaccard(hasher.signature(doc), hasher.signature(copy))
            # 128 permutations: standard error sqrt(J(1-J)/128) <= 0.045; 0.15 is > 3 sigma.
            assert abs(est - true_jaccard(doc, copy)) < 0.15, kind


def planted_copies(corpus: list[str]) -> list[tuple[int, str, str]]:
    """100 edited copies (original index, kind of edit, text) of real documents."""
    rng = random.Random(0)
    sources = [i for i, d in enumerate(corpus) if len(d.split()) >= 150]
    planted = rng.sample(sources, 100)
    kinds = ["replace_1pct", "delete_2pct", "append_line", "truncate_5pct", "replace_15pct"]
    return [(orig, kinds[k % len(kinds)], edit(corpus[orig], rng, kinds[k % len(kinds)]))
            for k, orig in enumerate(planted)]


def test_planted_near_duplicates_are_found(corpus):
    hasher = MinHasher()
    copies = planted_copies(corpus)
    texts = corpus + [c for _, _, c in copies]
    signatures = np.stack([hasher.signature(t) for t in texts])
    pairs = {(i, j) for i, j, _ in near_duplicate_pairs(signatures, THRESHOLD)}

    truly_near = hits = 0
    for k, (orig, kind, copy) in enumerate(copies):
        found = (orig, len(corpus) + k) in pairs
        similarity = true_jaccard(corpus[orig], copy)
        if similarity >= THRESHOLD:
            truly_near += 1
            hits += found
        if similarity >= 0.9:  # 3.3 standard errors above the threshold: must never be missed
            assert found, (kind, similarity)
        if kind == "replace_15pct":
            assert not found, "a heavily rewritten copy was flagged"
    recall = hits / truly_near
    # False positives: flagged pairs whose exact Jaccard is clearly below the threshold.
    false_pos = [(i, j) for i, j in pairs if true_jaccard(texts[i], texts[j]) < THRESHOLD - 0.1]
    n_pairs = len(texts) * (len(texts) - 1) // 2
    print(f"\nMinHash/LSH on {len(corpus)} real documents + {len(copies)} edited copies: "
          f"recall {recall:.3f} ({hits}/{truly_near} copies with true J >= {THRESHOLD}), "
          f"false positives {len(false_pos)} of {len(pairs)} flagged pairs, "
          f"FP rate {len(false_pos) / n_pairs:.2e} over {n_pairs:,} pairs")
    assert truly_near >= 60
    # Copies just above 0.8 are missed when their estimate falls below it (standard error
    # ~0.035), so recall at the threshold itself is below 1 by design of any MinHash filter.
    assert recall >= 0.96
    assert not false_pos

    keep = near_duplicate_keep_mask(signatures, THRESHOLD)
    for k, (orig, kind, _) in enumerate(copies):
        if (orig, len(corpus) + k) in pairs:
            assert keep[orig] and not keep[len(corpus) + k]  # the first document survives


def test_word_hashes_depend_only_on_the_word():
    text = shared_file("corpora/tinyshakespeare.txt").read_text()
    whole = word_hashes_of(text)
    words = text.split()
    assert len(whole) == len(words)
    assert np.array_equal(whole, word_hashes_of(text, block_chars=1000))  # blocking changes nothing
    first = {}
    for word, h in zip(words[:5000], whole[:5000].tolist()):
        assert first.setdefault(word, h) == h  # the same word always hashes the same
    assert len(set(first.values())) == len(first)  # and distinct words differently here
