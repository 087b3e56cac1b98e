"""Deterministic train/validation split.

By hash: a document goes to validation when its hash coin (scratchlm.sources.hash_fraction of
its cleaned text: the first 8 bytes of blake2b, read as a fraction of 2^64) falls below
`val_fraction`. The decision depends only on the text, so it is stable under reordering,
adding documents, changing worker or task counts, and an exact duplicate can never straddle
train and val. Tiny corpora whose coins all land above the cut still get one validation
document (the one with the smallest coin), and never lose all of train.

By position: for a corpus that is one long text (Tiny Shakespeare), validation is the last
`val_fraction` of its characters, cut at a line break, so val is a contiguous held-out tail
rather than scattered passages whose neighbours the model trained on.
"""

from __future__ import annotations

import numpy as np

from scratchlm.errors import ScratchLMError


def _check(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ScratchLMError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def split_by_fraction(fractions: np.ndarray, val_fraction: float) -> np.ndarray:
    """is_val per document from its hash coin, with at least one val and one train document."""
    _check(val_fraction)
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) < 2:
        raise ScratchLMError(
            f"only {len(fractions)} document(s) left: a hash split needs at least 2 "
            "(use split_by_position for one long document, or give a val input)"
        )
    is_val = fractions < val_fraction
    if not is_val.any():
        is_val[int(np.argmin(fractions))] = True
    if is_val.all():
        is_val[int(np.argmax(fractions))] = False
    return is_val


def position_cut(chars: np.ndarray, val_fraction: float) -> tuple[int, int]:
    """(document, character offset in it) where the last `val_fraction` of all characters
    begins; the caller cuts that document with `cut_at_line`."""
    _check(val_fraction)
    ends = np.cumsum(np.asarray(chars, dtype=np.int64))
    total = int(ends[-1]) if len(ends) else 0
    cut = int(round(total * (1.0 - val_fraction)))
    doc = int(np.searchsorted(ends, cut, side="right"))
    if doc == len(ends):  # the cut falls at the very end: val would be empty
        doc -= 1
    start = int(ends[doc - 1]) if doc else 0
    return doc, cut - start


def cut_at_line(text: str, offset: int) -> tuple[str, str]:
    """Split at the newline closest to `offset` (or exactly at it when there is none)."""
    before, after = text.rfind("\n", 0, offset), text.find("\n", offset)
    candidates = [i for i in (before, after) if i > 0]
    at = min(candidates, key=lambda i: abs(i - offset)) if candidates else offset
    return text[:at].rstrip(), text[at:].strip("\n")
