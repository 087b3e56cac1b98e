"""Deterministic train/validation split.

By hash: a document goes to validation when the first 8 bytes of blake2b(text), read as a
fraction of 2^64, fall below `val_fraction`. The decision depends only on the text, so it is
stable under reordering, adding documents or changing worker counts, and an exact duplicate
can never straddle train and val. Tiny corpora whose hashes all land above the cut still get
one validation document (the one with the smallest hash), and never lose all of train.

By position: for a corpus that is one long text (Tiny Shakespeare), validation is the last
`val_fraction` of its characters, cut at a line break, so val is a contiguous held-out tail
rather than scattered passages whose neighbours the model trained on.
"""

from __future__ import annotations

from scratchlm.errors import ScratchLMError
from scratchlm.sources import hash_fraction


def split_by_hash(texts: list[str], val_fraction: float) -> list[bool]:
    """is_val flag per document, with at least one val and one train document."""
    if not 0.0 < val_fraction < 1.0:
        raise ScratchLMError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(texts) < 2:
        raise ScratchLMError(
            f"only {len(texts)} document(s) left: a hash split needs at least 2 "
            "(use split_by_position for one long document, or give a val input)"
        )
    fractions = [hash_fraction(t) for t in texts]
    is_val = [f < val_fraction for f in fractions]
    if not any(is_val):
        is_val[min(range(len(texts)), key=fractions.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(texts)), key=fractions.__getitem__)] = False
    return is_val


def split_by_position(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train_texts, val_texts): the last `val_fraction` of all characters, in corpus order.

    The document that straddles the cut is divided at the line break nearest to it, so a
    single long document yields a train head and a val tail.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ScratchLMError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    total = sum(len(t) for t in texts)
    cut = int(round(total * (1.0 - val_fraction)))
    train, val, position = [], [], 0
    for text in texts:
        start, end = position, position + len(text)
        position = end
        if end <= cut:
            train.append(text)
        elif start >= cut:
            val.append(text)
        else:
            head, tail = _cut_at_line(text, cut - start)
            train.extend([head] if head else [])
            val.extend([tail] if tail else [])
    if not train or not val:
        raise ScratchLMError(
            f"split by position left an empty {'train' if not train else 'val'} split "
            f"({total} characters, val_fraction {val_fraction})"
        )
    return train, val


def _cut_at_line(text: str, offset: int) -> tuple[str, str]:
    """Split at the newline closest to `offset` (or exactly at it when there is none)."""
    before, after = text.rfind("\n", 0, offset), text.find("\n", offset)
    candidates = [i for i in (before, after) if i > 0]
    at = min(candidates, key=lambda i: abs(i - offset)) if candidates else offset
    return text[:at].rstrip(), text[at:].strip("\n")
