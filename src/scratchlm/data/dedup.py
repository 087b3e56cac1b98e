"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures, LSH banding.

Exact: blake2b of the lower-cased, whitespace-collapsed text; the first occurrence is kept.

Near: the Jaccard similarity of two documents' sets of word 5-grams ("shingles") is estimated
by MinHash (Broder 1997): under a random hash function h, P[min h(A) == min h(B)] = J(A, B),
so with 128 independent functions the fraction of equal minima estimates J within ~±0.04.
The functions are multiply-add-shift hashes of the 32-bit shingle values (Dietzfelbinger
1996), h(x) = ((a·x + b) mod 2^64) >> 32 with random 64-bit a, b: 2-independent, and the mod
is free in numpy's wrapping uint64 arithmetic. They are applied to all shingles at once (a
(shingles × 128) matrix per document). We first used (a·x + b) mod (2^61 − 1) with a, x <
2^32: a·x then hardly wraps, the hash is nearly monotonic in x, the 128 minima are correlated
and the estimates were off by up to 0.15; the test against exact Jaccard caught it.

Comparing all pairs is quadratic, so LSH banding (Leskovec et al., Mining of Massive Datasets,
ch. 3.4) cuts each signature into b bands of r rows; documents that agree on a whole band
become candidates. A pair with similarity s becomes a candidate with probability
1 − (1 − s^r)^b, an S-curve whose midpoint sits near (1/b)^(1/r). `choose_bands` picks (b, r)
minimising the weighted areas of false positives below the threshold and false negatives
above it (misses weigh more), then every candidate pair is verified by its estimated Jaccard,
so the S-curve only has to be generous. Verified pairs are merged with union-find and the first document of each cluster
is kept.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable

import numpy as np

from scratchlm.data.filters import ngram_keys

_MAX_HASH = np.uint64((1 << 32) - 1)
_SHIFT = np.uint64(32)


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace differences removed."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


# Word hashing without a Python-level loop over words. The text's UTF-8 bytes b_k get prefix
# sums S_i = sum_{k<i} b_k·P^k (mod 2^64); a word spanning bytes [s, e) hashes to
# (S_e − S_s)·P^(−s), the same value wherever the word occurs, because P is odd and therefore
# invertible mod 2^64. All of it is numpy's wrapping uint64 arithmetic. Python's own hash() is
# no alternative anyway: it is salted per process, and workers must agree with each other.
_WORD_BASE = 0x100000001B3  # the 64-bit FNV prime; any odd constant works
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_NEXT_SPACE = re.compile(r"[\t\n\x0b\x0c\r ]")
_WORD_BASE_INVERSE = pow(_WORD_BASE, -1, 1 << 64)
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _power_table(base: int, size: int) -> np.ndarray:
    table = np.empty(size, dtype=np.uint64)
    table[0] = 1
    table[1:] = np.multiply.accumulate(np.full(size - 1, base, dtype=np.uint64))
    return table


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^(-i) mod 2^64 for i < n, grown on demand and kept for later documents."""
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers))
        _powers, _inverse_powers = _power_table(_WORD_BASE, size), _power_table(_WORD_BASE_INVERSE, size)
    return _powers[:n], _inverse_powers[:n]


def word_hashes_of(text: str, block_chars: int = 1 << 20) -> np.ndarray:
    """A 64-bit hash per whitespace-separated word of `text`, in order.

    Long texts are hashed in blocks cut at whitespace (a word's hash does not depend on where
    it sits), which bounds the power tables and temporaries to about 40 bytes per block byte.
    """
    parts, start = [], 0
    while start < len(text):
        cut = _NEXT_SPACE.search(text, start + block_chars)
        end = cut.start() if cut else len(text)
        parts.append(_block_word_hashes(text[start:end]))
        start = end
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _block_word_hashes(text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    in_word = np.concatenate([[False], ~_WHITESPACE[data], [False]]).view(np.int8)
    edges = np.diff(in_word)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    powers, inverse_powers = _power_tables(len(data) + 1)
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data.astype(np.uint64) * powers[: len(data)], out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * inverse_powers[starts]


class MinHasher:
    """MinHash signatures over word n-grams, identical in every process for the same seed."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
        self.b = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
        self.num_perm = num_perm
        self.ngram = ngram

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the lower-cased word n-grams (one shingle if too short)."""
        word_hashes = word_hashes_of(text.lower())
        if len(word_hashes) == 0:
            return np.zeros(1, dtype=np.uint64)
        keys = ngram_keys(word_hashes, min(self.ngram, len(word_hashes)))
        return np.unique((keys ^ (keys >> _SHIFT)) & _MAX_HASH)

    def signature(self, text: str, chunk: int = 2048) -> np.ndarray:
        """The (num_perm,) uint32 MinHash signature of `text`."""
        shingles = self.shingles(text)
        # The shift is monotonic, so the minimum of (a·x + b) is taken before shifting, once per
        # permutation instead of once per shingle; a reused buffer keeps the work in cache.
        lowest = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        buffer = np.empty((min(chunk, len(shingles)), self.num_perm), dtype=np.uint64)
        for start in range(0, len(shingles), chunk):
            block = shingles[start : start + chunk]
            hashed = buffer[: len(block)]
            np.multiply(block[:, None], self.a, out=hashed)
            hashed += self.b
            np.minimum(lowest, hashed.min(axis=0), out=lowest)
        return (lowest >> _SHIFT).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def choose_bands(num_perm: int, threshold: float, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands·rows <= num_perm minimising the weighted error area of the S-curve.

    False negatives weigh 0.9 (datasketch uses 0.5): a missed pair is lost for good, while a
    false candidate only costs one signature comparison in the verification step. For 128
    permutations and threshold 0.8 this gives 14 bands of 9 rows (midpoint ~0.75): pairs at
    J = 0.8 become candidates with probability 0.87, at J = 0.9 with 0.999.
    """
    s_low = np.linspace(0.0, threshold, 201)
    s_high = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_pos = np.trapezoid(1 - (1 - s_low**rows) ** bands, s_low)
            false_neg = np.trapezoid((1 - s_high**rows) ** bands, s_high)
            error = (1 - false_negative_weight) * false_pos + false_negative_weight * false_neg
            if error < best_err:
                best, best_err = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one 64-bit key per band of each signature; equal bands, equal keys.

    A polynomial hash of the band's `rows` values in wrapping uint64 arithmetic (distinct bands
    collide with probability ~2^-64 per pair, and every candidate is verified anyway). Keys are
    what the data tasks write to disk per document, so finalize never needs all signatures in
    memory to find candidates."""
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for r in range(rows):
        keys *= np.uint64(_WORD_BASE)
        keys ^= signatures[:, r : bands * rows : rows].astype(np.uint64) + np.uint64(r + 1)
    return keys


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index becomes the root: the first document survives
            self.parent[max(ri, rj)] = min(ri, rj)


SignatureRows = Callable[[np.ndarray], np.ndarray]  # document indices -> their signatures


def verified_pairs(band_columns: Iterable[np.ndarray], signature_rows: SignatureRows, threshold: float,
                   max_bucket_pairs: int = 64) -> list[tuple[int, int, float]]:
    """Pairs (i, j, estimated Jaccard), i < j, that share a band key in some band and whose
    signatures agree on at least `threshold` of their positions.

    `band_columns` yields, one band at a time, the (n,) keys of that band for documents
    0..n-1: only one band is in memory at once. In a bucket with more than `max_bucket_pairs`
    members (a swarm of near-identical boilerplate) each member is compared only with the
    bucket's first member rather than with all others: enough to join the cluster, without
    quadratic work."""
    checked: set[tuple[int, int]] = set()
    pairs = []
    for keys in band_columns:
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        edges = np.flatnonzero(np.diff(sorted_keys)) + 1
        for members in np.split(order, edges):
            if len(members) < 2:
                continue
            partners = members[:1] if len(members) > max_bucket_pairs else members
            candidates = [(int(min(a, b)), int(max(a, b))) for a_pos, a in enumerate(partners)
                          for b in members[a_pos + 1:]]
            candidates = [pair for pair in candidates if pair not in checked]
            if not candidates:
                continue
            checked.update(candidates)
            left = signature_rows(np.array([i for i, _ in candidates]))
            right = signature_rows(np.array([j for _, j in candidates]))
            similarity = (left == right).mean(axis=1)
            pairs.extend((i, j, float(sim)) for (i, j), sim in zip(candidates, similarity) if sim >= threshold)
    return sorted(pairs)


def first_of_each_cluster(n: int, pairs: Iterable[tuple[int, int, float]]) -> np.ndarray:
    """Boolean mask over documents 0..n-1: True for the first document of each cluster that
    the pairs join (union-find), and for documents in no pair."""
    uf = _UnionFind(n)
    members = set()
    for i, j, _ in pairs:
        uf.union(i, j)
        members.update((i, j))
    keep = np.ones(n, dtype=bool)  # a document in no pair is its own cluster
    for i in members:
        keep[i] = uf.find(i) == i
    return keep


def near_duplicate_pairs(
    signatures: np.ndarray, threshold: float = 0.8, bands: int | None = None, rows: int | None = None,
    max_bucket_pairs: int = 64,
) -> list[tuple[int, int, float]]:
    """Verified pairs (i, j, estimated Jaccard) with i < j and estimate >= threshold, for
    signatures in memory (the data tasks keep theirs on disk: see data/finalize.py)."""
    if bands is None or rows is None:
        bands, rows = choose_bands(signatures.shape[1], threshold)
    keys = band_keys(signatures, bands, rows)
    return verified_pairs((keys[:, band] for band in range(bands)), signatures.__getitem__, threshold,
                          max_bucket_pairs)


def near_duplicate_keep_mask(
    signatures: np.ndarray, threshold: float = 0.8, bands: int | None = None, rows: int | None = None,
) -> np.ndarray:
    """Boolean mask: True for the first document of each near-duplicate cluster (and singletons)."""
    return first_of_each_cluster(len(signatures), near_duplicate_pairs(signatures, threshold, bands, rows))
