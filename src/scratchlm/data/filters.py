"""Document-level quality and safety filters, and PII scrubbing.

A filter is a named predicate "drop this document?". Filters run in a fixed order and the
first one that fires is charged with the drop, so the stats table says which rule removed what.
Every filter can be switched off by name (`PrepareConfig.disabled_filters`), and every
threshold lives in `FilterConfig` with the paper it comes from:

  Gopher  Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
          Gopher", appendix A.1 (MassiveWeb quality and repetition filters).
  C4      Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
          Text-to-Text Transformer", section 2.2 (Colossal Clean Crawled Corpus).
  FineWeb Penedo et al. 2024, "The FineWeb Datasets", section 3.5 (custom filters).
  Codex   Chen et al. 2021, "Evaluating Large Language Models Trained on Code", section 3.1,
          and StarCoder (Li et al. 2023, section 3) for the alphanumeric fraction.

Prose filters would throw away nearly every program (curly braces, '#' comments, short lines,
repeated lines like `return None`), so each document carries a profile, "prose" or "code",
and only that profile's filters apply. The blocklist filters apply to both.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from scratchlm.errors import ScratchLMError


@dataclass
class FilterConfig:
    # Gopher: documents outside 50..100,000 words are rarely useful prose.
    min_words: int = 50
    max_words: int = 100_000
    # Gopher: mean word length outside 3..10 characters signals tables, code or gibberish.
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    # Gopher: ("#" + "..." + "…") per word; hashtag spam and truncated-snippet pages.
    max_symbol_word_ratio: float = 0.1
    # Gopher: >90% of lines starting with a bullet, >30% ending with an ellipsis.
    max_bullet_lines_fraction: float = 0.9
    max_ellipsis_lines_fraction: float = 0.3
    # Gopher: at least 80% of words contain an alphabetic character.
    min_alpha_words_fraction: float = 0.8
    # Gopher: at least 2 of the English stop words (the, be, to, of, and, that, have, with).
    min_stop_words: int = 2
    # Gopher repetition: duplicated lines / paragraphs, by count and by characters.
    max_dup_line_fraction: float = 0.30
    max_dup_paragraph_fraction: float = 0.30
    max_dup_line_char_fraction: float = 0.20
    max_dup_paragraph_char_fraction: float = 0.20
    # Gopher repetition: characters in the most frequent 2-, 3-, 4-gram.
    max_top_ngram_char_fraction: tuple[float, float, float] = (0.20, 0.18, 0.16)
    # Gopher repetition: characters covered by duplicated 5..10-grams.
    max_dup_ngram_char_fraction: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    # C4: a page needs at least 3 sentences. C4 also deletes every line without terminal
    # punctuation; we keep text intact and use FineWeb's document-level ratio below instead.
    min_sentences: int = 3
    # FineWeb: at least 12% of lines end in punctuation (C4's line rule, relaxed).
    min_line_punct_fraction: float = 0.12
    # FineWeb: at most 67% of lines shorter than 30 characters (menus, lists, boilerplate).
    max_short_lines_fraction: float = 0.67
    short_line_chars: int = 30
    # FineWeb: at most 10% of characters in duplicated lines.
    max_dup_line_chars_fineweb: float = 0.10
    # Codex: files with a line over 1000 characters or mean line length over 100 are
    # minified or generated; StarCoder: under 25% alphanumeric characters is data, not code.
    max_code_line_length: int = 1000
    max_code_mean_line_length: float = 100.0
    min_code_alnum_fraction: float = 0.25
    # Ours: line-ratio rules (bullets, ellipsis, punctuation, short lines) need some lines to
    # judge; a one-line document (one-article-per-line dumps such as wiki_demo) has no line
    # structure, and FineWeb's punctuation rule would drop every article ending in a category list.
    min_lines_for_line_ratios: int = 3
    # Safety: documents with at least this many blocklisted words are dropped.
    blocklist_min_hits: int = 1


@dataclass
class Blocklists:
    """User-supplied safety lists: lower-cased words and domains."""

    words: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    @classmethod
    def load(cls, words_file: str | None, urls_file: str | None) -> Blocklists:
        return cls(words=frozenset(_read_list(words_file)),
                   domains=frozenset(_domain(entry) for entry in _read_list(urls_file)))


def _read_list(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ScratchLMError(f"cannot read blocklist {path}: {exc.strerror}") from exc
    return [line.strip().lower() for line in lines if line.strip() and not line.startswith("#")]


def _domain(entry: str) -> str:
    """'https://www.Example.com/x' and 'example.com' both become 'example.com'."""
    host = urllib.parse.urlsplit(entry if "//" in entry else f"//{entry}").hostname or entry
    return host.lower().removeprefix("www.")


class DocView:
    """One document split into words, lines and paragraphs, each at most once and only when a
    filter asks (code documents never need words or paragraphs)."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @functools.cached_property
    def lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in re.split(r"\n\s*\n", self.text) if p.strip()]

    @functools.cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @functools.cached_property
    def word_chars(self) -> int:
        return int(self.word_lengths.sum())

    @functools.cached_property
    def word_ids(self) -> np.ndarray:
        """A small integer per distinct word, for the n-gram repetition statistics."""
        ids: dict[str, int] = {}
        return np.fromiter((ids.setdefault(w, len(ids)) for w in self.words), dtype=np.uint64, count=len(self.words))


# --------------------------------------------------------------------------- helpers
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-", "*", "‣", "●", "○", "▪", "◦")
_ELLIPSES = ("...", "…")
_TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", ":", ";")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?:\s|$)")
_HAS_ALPHA = re.compile(r"[^\W\d_]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_ALNUM = np.zeros(256, dtype=bool)
_ASCII_ALNUM[[ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]] = True
_URL_HOST = re.compile(r"https?://([^\s/:?#\"'<>]+)", re.IGNORECASE)


def duplicate_stats(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their total characters), as Gopher counts repetition."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, bits well spread (2^64 / golden ratio)


def ngram_keys(word_values: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit key per word n-gram: a polynomial in the words' ids or hashes, mod 2^64."""
    keys = np.zeros(len(word_values) - n + 1, dtype=np.uint64)
    for i in range(n):
        keys = keys * _NGRAM_MULTIPLIER + word_values[i : len(word_values) - n + 1 + i]
    return keys


def top_ngram_char_fraction(view: DocView, n: int) -> float:
    """Characters in all occurrences of the most frequent word n-gram, over all word characters."""
    if len(view.words) < n or view.word_chars == 0:
        return 0.0
    keys = ngram_keys(view.word_ids, n)
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = int(first[top])
    ngram_chars = int(view.word_lengths[start : start + n].sum())
    return ngram_chars * int(counts[top]) / view.word_chars


def dup_ngram_char_fraction(view: DocView, n: int) -> float:
    """Characters of words covered by any n-gram that occurs more than once."""
    if len(view.words) < n or view.word_chars == 0:
        return 0.0
    keys = ngram_keys(view.word_ids, n)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    dup_starts = np.flatnonzero(counts[inverse] > 1)
    covered = np.zeros(len(view.words) + 1, dtype=np.int64)
    np.add.at(covered, dup_starts, 1)
    np.add.at(covered, dup_starts + n, -1)
    mask = np.cumsum(covered)[:-1] > 0
    return float(view.word_lengths[mask].sum()) / view.word_chars


def alnum_count(text: str) -> int:
    """Number of alphanumeric characters: a byte lookup table for ASCII, str.isalnum for the rest."""
    ascii_alnum = int(_ASCII_ALNUM[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)].sum())
    return ascii_alnum + sum(ch.isalnum() for run in _NON_ASCII.findall(text) for ch in run)


def _frac(count: int, total: int) -> float:
    return count / total if total else 0.0


# --------------------------------------------------------------------------- filters
# Each returns True when the document should be DROPPED.
FilterFn = Callable[[DocView, FilterConfig, Blocklists, "str | None"], bool]


def _gopher_word_count(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return not c.min_words <= len(v.words) <= c.max_words


def _gopher_mean_word_length(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    mean = _frac(v.word_chars, len(v.words))
    return not c.min_mean_word_length <= mean <= c.max_mean_word_length


def _gopher_symbol_ratio(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    symbols = v.text.count("#") + v.text.count("...") + v.text.count("…")
    return _frac(symbols, len(v.words)) > c.max_symbol_word_ratio


def _gopher_bullets_ellipsis(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    if len(v.lines) < c.min_lines_for_line_ratios:
        return False
    bullets = sum(line.lstrip().startswith(_BULLETS) for line in v.lines)
    ellipsis = sum(line.rstrip().endswith(_ELLIPSES) for line in v.lines)
    return (_frac(bullets, len(v.lines)) > c.max_bullet_lines_fraction
            or _frac(ellipsis, len(v.lines)) > c.max_ellipsis_lines_fraction)


def _gopher_alpha_words(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    alpha = sum(1 for w in v.words if _HAS_ALPHA.search(w))
    return _frac(alpha, len(v.words)) < c.min_alpha_words_fraction


def _gopher_stop_words(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    found = sum(1 for w in v.words if w.lower().strip(".,;:!?\"'()") in _STOP_WORDS)
    return found < c.min_stop_words


def _gopher_dup_lines(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    count, chars = duplicate_stats(v.lines)
    return (_frac(count, len(v.lines)) > c.max_dup_line_fraction
            or _frac(chars, len(v.text)) > c.max_dup_line_char_fraction)


def _gopher_dup_paragraphs(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    count, chars = duplicate_stats(v.paragraphs)
    return (_frac(count, len(v.paragraphs)) > c.max_dup_paragraph_fraction
            or _frac(chars, len(v.text)) > c.max_dup_paragraph_char_fraction)


def _gopher_top_ngrams(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return any(top_ngram_char_fraction(v, n) > limit
               for n, limit in zip((2, 3, 4), c.max_top_ngram_char_fraction))


def _gopher_dup_ngrams(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    # Coverage by duplicated n-grams can only shrink as n grows (a repeated 10-gram contains
    # repeated 5-grams), so a document under the smallest limit at n = 5 passes them all.
    if dup_ngram_char_fraction(v, 5) <= min(c.max_dup_ngram_char_fraction):
        return False
    return any(dup_ngram_char_fraction(v, n) > limit
               for n, limit in zip(range(5, 11), c.max_dup_ngram_char_fraction))


def _c4_lorem_ipsum(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return "lorem ipsum" in v.text.lower()


def _c4_curly_brace(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return "{" in v.text


def _c4_sentences(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return len(_SENTENCE_END.findall(v.text)) < c.min_sentences


def _fineweb_line_punct(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    if len(v.lines) < c.min_lines_for_line_ratios:
        return False
    ending = sum(line.rstrip().endswith(_TERMINAL_PUNCT) for line in v.lines)
    return _frac(ending, len(v.lines)) < c.min_line_punct_fraction


def _fineweb_short_lines(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    if len(v.lines) < c.min_lines_for_line_ratios:
        return False
    short = sum(len(line) < c.short_line_chars for line in v.lines)
    return _frac(short, len(v.lines)) > c.max_short_lines_fraction


def _fineweb_dup_line_chars(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    _, chars = duplicate_stats(v.lines)
    return _frac(chars, len(v.text.replace("\n", ""))) > c.max_dup_line_chars_fineweb


def _code_line_length(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    lengths = [len(line) for line in v.text.split("\n")]
    return max(lengths) > c.max_code_line_length or _frac(sum(lengths), len(lengths)) > c.max_code_mean_line_length


def _code_alnum_fraction(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return _frac(alnum_count(v.text), len(v.text)) < c.min_code_alnum_fraction


def _blocklist_words(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    if not b.words:
        return False
    hits = sum(1 for w in v.words if w.lower().strip(".,;:!?\"'()[]") in b.words)
    return hits >= c.blocklist_min_hits


def _url_blocked(host: str, domains: frozenset[str]) -> bool:
    host = host.lower().removeprefix("www.")
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts)))


def _blocklist_urls(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    if not b.domains:
        return False
    hosts = _URL_HOST.findall(v.text)
    if url:
        hosts.append(urllib.parse.urlsplit(url).hostname or "")
    return any(_url_blocked(host, b.domains) for host in hosts)


def _empty(v: DocView, c: FilterConfig, b: Blocklists, url: str | None) -> bool:
    return not v.text.strip()


# Order matters only for attribution: cheap, decisive rules first.
FILTERS: dict[str, FilterFn] = {
    "empty": _empty,
    "blocklist_words": _blocklist_words,
    "blocklist_urls": _blocklist_urls,
    "gopher_word_count": _gopher_word_count,
    "gopher_mean_word_length": _gopher_mean_word_length,
    "gopher_symbol_ratio": _gopher_symbol_ratio,
    "gopher_bullets_ellipsis": _gopher_bullets_ellipsis,
    "gopher_alpha_words": _gopher_alpha_words,
    "gopher_stop_words": _gopher_stop_words,
    "c4_lorem_ipsum": _c4_lorem_ipsum,
    "c4_curly_brace": _c4_curly_brace,
    "c4_sentences": _c4_sentences,
    "fineweb_line_punct": _fineweb_line_punct,
    "fineweb_short_lines": _fineweb_short_lines,
    "fineweb_dup_line_chars": _fineweb_dup_line_chars,
    "gopher_dup_lines": _gopher_dup_lines,
    "gopher_dup_paragraphs": _gopher_dup_paragraphs,
    "gopher_top_ngrams": _gopher_top_ngrams,
    "gopher_dup_ngrams": _gopher_dup_ngrams,
    "code_line_length": _code_line_length,
    "code_alnum_fraction": _code_alnum_fraction,
}

_SAFETY = ("empty", "blocklist_words", "blocklist_urls")
PROFILES: dict[str, tuple[str, ...]] = {
    "prose": tuple(name for name in FILTERS if not name.startswith("code_")),
    "code": _SAFETY + ("code_line_length", "code_alnum_fraction"),
}


def check_filter_names(names: list[str] | tuple[str, ...] | frozenset[str]) -> None:
    unknown = sorted(set(names) - set(FILTERS))
    if unknown:
        raise ScratchLMError(f"unknown filter(s): {', '.join(unknown)}; known: {', '.join(FILTERS)}")


def first_failing_filter(
    text: str, profile: str, config: FilterConfig, blocklists: Blocklists,
    disabled: frozenset[str] = frozenset(), url: str | None = None,
) -> str | None:
    """Name of the first enabled filter of `profile` that drops the document, or None to keep it."""
    view = DocView(text)
    for name in PROFILES[profile]:
        if name not in disabled and FILTERS[name](view, config, blocklists, url):
            return name
    return None


# --------------------------------------------------------------------------- PII
# Replacements are typed placeholders (as in Dolma/BigScience) so the model still learns that
# an address appears there, without memorising the address itself.
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
# Numbers written with a leading +country code and separated groups, or North-American style
# (555) 123-4567 / 555-123-4567; bare digit runs are left alone because they are far more often
# years, prices or identifiers than phone numbers.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}(?:[\s.-]\d{1,4}){2,5}|(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4})(?![\w-])"
)
PII_PATTERNS: dict[str, tuple[re.Pattern, str]] = {
    "email": (_EMAIL, "<EMAIL>"),
    "ip_address": (_IPV4, "<IP_ADDRESS>"),
    "phone": (_PHONE, "<PHONE>"),
}


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, IPv4 addresses and phone numbers; return counts per kind."""
    counts = {}
    for kind, (pattern, placeholder) in PII_PATTERNS.items():
        text, counts[kind] = pattern.subn(placeholder, text)
    return text, counts
