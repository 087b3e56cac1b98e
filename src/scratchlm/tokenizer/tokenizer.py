"""The Tokenizer: byte-level BPE encode/decode over a vocabulary and its merges.

Two encoders produce the same ids:
- the reference encoder, plain Python: within each pre-token, repeatedly merge the adjacent
  pair with the lowest merge rank (GPT-2's own algorithm), with a cache of pre-tokens seen;
- the fast path, tiktoken's Rust BPE built from our own ranks and pattern (no download).
tiktoken ranks a token by its id, so it is used when the ids of the merged tokens grow in merge
order (true for what we train and for GPT-2); otherwise the reference encoder runs.
Special tokens the caller allows are split out here, longest first, before either encoder
sees the text; by default there are none (text is ordinary text, see `Tokenizer.encode`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import regex

from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer.pretokenize import (
    find_safe_edge,
    pattern_regex,
    special_token_regex,
    split_on_special_tokens,
    utf8_bytes,
)

ENDOFTEXT = "<|endoftext|>"

# encode_iterable encodes its buffer up to the last safe edge once this much is buffered;
# with no safe edge for MAX_PENDING_CHARS it cuts anyway.
FLUSH_CHARS = 1 << 16
MAX_PENDING_CHARS = 1 << 22
_REFERENCE_CACHE_LIMIT = 1 << 18
_NO_MERGE = (float("inf"), -1)


class Tokenizer:
    """Byte-level BPE tokenizer.

    vocab: id -> bytes for ids 0..N-1 (the 256 single bytes, the merged tokens, special tokens).
    merges: (left, right) byte pairs in merge order (rank = position).
    special_tokens: strings recognised as single tokens in text; each takes the vocab id whose
    bytes are its UTF-8 (the highest such id, in case a merged token has the same bytes), or a
    new id at the end of the vocab. Vocab entries that are neither bytes, merged tokens nor
    registered special tokens still decode, but are never produced by encode.
    chat_template: the name of the chat format the model was trained with ("chatml", see
    scratchlm.post.chat), or None. It is kept here because the tokenizer travels with every
    model directory, checkpoint and export; it changes no ids, so it is not in the fingerprint.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
        pattern: str = "gpt2",
        chat_template: str | None = None,
    ) -> None:
        self.pattern = pattern
        self.chat_template = chat_template
        self._pattern_regex = pattern_regex(pattern)
        self.vocab: dict[int, bytes] = {int(i): bytes(t) for i, t in vocab.items()}
        if sorted(self.vocab) != list(range(len(self.vocab))):
            raise ScratchLMError(f"vocab ids must be 0..{len(self.vocab) - 1} without gaps")
        self.merges: list[tuple[bytes, bytes]] = [(bytes(l), bytes(r)) for l, r in merges]
        self._ranks = self._mergeable_ranks()
        self.special_tokens = self._assign_special_tokens(special_tokens or ())
        self._id_bytes = [self.vocab[i] for i in range(len(self.vocab))]
        self._byte_ids = [self._ranks[bytes([b])] for b in range(256)]
        # merge table for the reference encoder: (left id, right id) -> (rank, merged id)
        self._pair_merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            pair = (self._ranks[left], self._ranks[right])
            self._pair_merges.setdefault(pair, (rank, self._ranks[left + right]))
        merged_ids = [self._ranks[left + right] for left, right in self.merges]
        self.fast_path_available = all(x < y for x, y in zip(merged_ids, merged_ids[1:]))
        self._special_regexes: dict = {}  # allowed_special -> regex, built on first use
        self._pretokenizer = regex.compile(self._pattern_regex)
        self._tiktoken = None
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ construction helpers
    def _mergeable_ranks(self) -> dict[bytes, int]:
        """bytes -> id for the regular tokens: single bytes and merge results (lowest id on ties)."""
        first_id: dict[bytes, int] = {}
        for i in range(len(self.vocab)):
            first_id.setdefault(self.vocab[i], i)
        ranks: dict[bytes, int] = {}
        for b in range(256):
            token = bytes([b])
            if token not in first_id:
                raise ScratchLMError(f"vocab lacks the single byte {token!r}: byte-level BPE needs all 256")
            ranks[token] = first_id[token]
        for n, (left, right) in enumerate(self.merges, start=1):
            for part in (left, right):
                if part not in ranks:
                    raise ScratchLMError(f"merge {n} ({left!r}, {right!r}): {part!r} is not an earlier token")
            if left + right not in first_id:
                raise ScratchLMError(f"merge {n} ({left!r}, {right!r}): the result is not in the vocab")
            ranks[left + right] = first_id[left + right]
        return ranks

    def _assign_special_tokens(self, special_tokens: Iterable[str]) -> dict[str, int]:
        if isinstance(special_tokens, str):
            special_tokens = [special_tokens]
        regular_ids = set(self._ranks.values())
        specials: dict[str, int] = {}
        for token in special_tokens:
            if not isinstance(token, str) or not token:
                raise ScratchLMError(f"special tokens must be non-empty strings, got {token!r}")
            if token in specials:
                continue
            data = token.encode("utf-8")
            candidates = [i for i, t in self.vocab.items() if t == data and i not in regular_ids]
            if candidates:
                specials[token] = max(candidates)
            else:
                specials[token] = len(self.vocab)
                self.vocab[len(self.vocab)] = data
        return specials

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each id decodes to (0 for special tokens): sum over a sequence = its byte count."""
        lengths = np.array([len(t) for t in self._id_bytes], dtype=np.int64)
        for i in self.special_tokens.values():
            lengths[i] = 0
        return lengths

    def fingerprint(self) -> str:
        """sha256 hex over everything that decides the ids: pattern, vocab, merges, special tokens."""
        h = hashlib.sha256()
        h.update(json.dumps({"pattern": self._pattern_regex, "special_tokens": self.special_tokens},
                            sort_keys=True).encode())
        for i in range(len(self._id_bytes)):
            h.update(b"v%d:%s\n" % (i, self._id_bytes[i].hex().encode()))
        for left, right in self.merges:
            h.update(b"m%s %s\n" % (left.hex().encode(), right.hex().encode()))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"pattern={self.pattern!r}, special_tokens={list(self.special_tokens)})")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Token ids of `text`, which is ordinary text unless told otherwise.

        The string of a special token inside `text` is encoded like any other text, unless
        the token is in `allowed_special` ("all": every registered special token). Text from
        data or from users is never given special tokens: a web page must not be able to forge
        a document boundary (or, once chat tokens exist, a turn). The code that assembles
        sequences appends special ids itself (as tiktoken's `encode_ordinary` /
        `allowed_special` split it).
        """
        encode_ordinary = (self._tiktoken_encoding().encode_ordinary if self.fast_path_available
                           else self.encode_reference_ordinary)
        return self._encode(text, encode_ordinary, allowed_special)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens recognised (same as `encode(text)`)."""
        return self.encode(text)

    def encode_reference(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """`encode` with the pure-Python encoder, whatever the fast path does (for testing)."""
        return self._encode(text, self.encode_reference_ordinary, allowed_special)

    def _special_regex_for(self, allowed_special: str | Iterable[str]):
        """The regex that finds the allowed special tokens (None when none are allowed)."""
        key = allowed_special if isinstance(allowed_special, str) else frozenset(allowed_special)
        if key not in self._special_regexes:
            allowed = set(self.special_tokens) if key == "all" else ({key} if isinstance(key, str) else set(key))
            unknown = sorted(allowed - set(self.special_tokens))
            if unknown:
                raise ScratchLMError(f"not a special token of this tokenizer: {unknown[0]!r} "
                                     f"(it has {', '.join(self.special_tokens) or 'none'})")
            self._special_regexes[key] = special_token_regex(allowed)
        return self._special_regexes[key]

    def _encode(self, text: str, encode_ordinary: Callable[[str], list[int]],
                allowed_special: str | Iterable[str]) -> list[int]:
        specials = self._special_regex_for(allowed_special) if allowed_special else None
        # Most text holds no special token: then the encoder's list is returned as is.
        if specials is None or not specials.search(text):
            return encode_ordinary(text)
        ids: list[int] = []
        for piece, is_special in split_on_special_tokens(text, specials):
            if is_special:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(encode_ordinary(piece))
        return ids

    def encode_reference_ordinary(self, text: str) -> list[int]:
        """Reference encoder for text without special tokens."""
        ids: list[int] = []
        cache = self._cache
        for word in self._pretokenizer.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._bpe(utf8_bytes(word))
                if len(cache) >= _REFERENCE_CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _bpe(self, word: bytes) -> list[int]:
        """Apply merges by rank inside one pre-token: lowest-ranked adjacent pair first."""
        ids = [self._byte_ids[b] for b in word]
        pair_merges = self._pair_merges
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: pair_merges.get(p, _NO_MERGE))
            if pair not in pair_merges:
                break
            merged = pair_merges[pair][1]
            left, right = pair
            out: list[int] = []
            i = 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == left and ids[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _tiktoken_encoding(self):
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(
                name=f"scratchlm-{self.fingerprint()[:12]}",
                pat_str=self._pattern_regex,
                mergeable_ranks=self._ranks,
                special_tokens=self.special_tokens,
            )
        return self._tiktoken

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Encode a stream of strings (e.g. the lines of an open file) with bounded memory.

        Text is buffered and encoded in pieces cut only at edges that leave the pre-tokens
        unchanged (see pretokenize.find_safe_edge), so the ids equal those of
        encode("".join(iterable)) (ordinary text: no special tokens); only text with no such
        edge for MAX_PENDING_CHARS characters is cut elsewhere.
        """
        pending: list[str] = []
        size = 0
        next_check = FLUSH_CHARS
        for piece in iterable:
            pending.append(piece)
            size += len(piece)
            if size < next_check:
                continue
            text = "".join(pending)
            cut = find_safe_edge(text, self.pattern)
            if cut < 0 and size < MAX_PENDING_CHARS:
                pending, next_check = [text], 2 * size  # look again once twice as much is buffered
                continue
            cut = cut if cut > 0 else len(text)
            yield from self.encode(text[:cut])
            rest = text[cut:]
            pending, size, next_check = [rest], len(rest), len(rest) + FLUSH_CHARS
        if size:
            yield from self.encode("".join(pending))

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._id_bytes)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_bytes))
            raise ScratchLMError(f"token id {bad} is outside the vocabulary (size {len(self._id_bytes)})")
        return b"".join(map(self._id_bytes.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ pickling (worker processes)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tiktoken"] = None  # rebuilt on first use in the new process
        state["_cache"] = {}
        return state

    # ------------------------------------------------------------------ training, files
    @classmethod
    def train(
        cls,
        inputs: str | os.PathLike | Iterable[str | os.PathLike],
        vocab_size: int,
        special_tokens: Iterable[str] = (ENDOFTEXT,),
        pattern: str = "gpt2",
        workers: int | None = None,
    ) -> "Tokenizer":
        """Train on the documents of `inputs`: files, directories, globs or `stdlib`, read as
        every command reads them (scratchlm.sources). `tokenizer.commands.train_tokenizer`
        adds held-out compression, progress and saving."""
        from scratchlm.sources import check_inputs, iter_documents
        from scratchlm.tokenizer.train import train_bpe

        specs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
        check_inputs(specs)
        special_tokens = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
        texts = (doc.text for doc in iter_documents(specs))
        vocab, merges = train_bpe(texts, vocab_size, special_tokens, pattern=pattern, workers=workers)
        return cls(vocab, merges, special_tokens, pattern=pattern)

    def save(self, directory: str | os.PathLike) -> None:
        from scratchlm.tokenizer.files import save_tokenizer

        save_tokenizer(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        from scratchlm.tokenizer.files import load_tokenizer

        return load_tokenizer(directory)

    @classmethod
    def from_gpt2(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> "Tokenizer":
        from scratchlm.tokenizer.files import read_gpt2_files

        vocab, merges = read_gpt2_files(encoder_json, vocab_bpe)
        return cls(vocab, merges, [ENDOFTEXT], pattern="gpt2")

