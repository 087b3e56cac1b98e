"""Text normalisation applied to every document before it is judged or hashed.

Cleaning is conservative: it changes how text is encoded, never what it says. NFC makes
visually identical strings byte-identical (so exact dedup and the tokenizer see one form);
control characters are noise the tokenizer would spend ids on; whitespace is tidied without
touching indentation, which is meaning in code.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab and newline, plus zero-width and BOM characters that are invisible
# but change bytes (and so defeat exact dedup).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
# Unicode spaces other than the ASCII space (NBSP, thin space, ideographic space, ...).
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_UNICODE_LINE_BREAKS = re.compile(r"[\u2028\u2029\x85]")
_INNER_SPACE_RUNS = re.compile(r"(?<=\S)[ \t]{2,}")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, profile: str = "prose") -> str:
    """NFC-normalise, drop control characters and tidy whitespace.

    Both profiles: unify line breaks, strip trailing spaces, collapse 3+ newlines into one
    blank line, strip the document's ends. Prose also collapses runs of spaces inside a line;
    code keeps them (alignment) and keeps leading indentation in both profiles.
    """
    # The fast checks first: most text is already NFC, and ASCII has no exotic breaks or spaces.
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = _UNICODE_LINE_BREAKS.sub("\n", text)
        text = _ODD_SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if profile == "prose":
        text = _INNER_SPACE_RUNS.sub(" ", text)
    if "\n\n\n" in text:
        text = _MANY_BLANK_LINES.sub("\n\n", text)
    # Leading spaces of a program's first line are indentation, so code keeps them.
    return text.strip() if profile == "prose" else text.lstrip("\n").rstrip()
