"""Generated tokens to streamed text: whole UTF-8 characters only, stop strings cut off.

Byte-level BPE tokens can end in the middle of a multi-byte character, so token bytes go
through an incremental UTF-8 decoder that keeps an unfinished character until its last byte
arrives (invalid bytes become U+FFFD, as `Tokenizer.decode` does). A stop string can also
span tokens: text that could still turn out to be the start of one is held back until the
next tokens decide, and a completed stop string ends the text just before it.
"""

from __future__ import annotations

import codecs
from typing import Mapping, Sequence


class IncrementalText:
    """Text of one generation, fed a token at a time. `add` and `finish` return
    (text ready to send, whether a stop string was found); after a stop string the text
    is complete and further input is ignored by the caller."""

    def __init__(self, token_bytes: Mapping[int, bytes], stop: Sequence[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        # Every proper prefix of a stop string: the endings of the text that must wait.
        self._prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""  # decoded, not yet sent: it may begin a stop string

    def add(self, token_id: int) -> tuple[str, bool]:
        return self._release(self._utf8.decode(self._token_bytes[token_id]), final=False)

    def finish(self) -> tuple[str, bool]:
        """The rest at the end of the generation: held-back text and an unfinished character."""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, new_text: str, final: bool) -> tuple[str, bool]:
        text = self._held + new_text
        if not self._stop:
            return text, False
        # No stop string can start in text already sent (it would have been held back), so
        # searching the unsent text finds the earliest one.
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        keep = 0 if final else self._held_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _held_length(self, text: str) -> int:
        """Length of the longest ending of `text` that begins some stop string."""
        for length in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-length:] in self._prefixes:
                return length
        return 0
