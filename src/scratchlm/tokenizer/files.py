"""Tokenizer files: our human-readable layout, and GPT-2's own encoder.json / vocab.bpe.

Layout of a tokenizer directory (other files may sit beside these, as in model directories):
- tokenizer.json: settings: format and version, pattern name and regex, vocab size,
  special tokens with their ids, the names of the other two files, and the name of the chat
  template when the model has one (`chat_template`; files without it load as having none).
- vocab.txt: one token per line, `<id> <token>`, ids 0..N-1 in order.
- merges.txt: one merge per line, `<left> <right>`, in merge (rank) order.

A token is written as a JSON string of its bytes decoded as UTF-8, with every byte that is not
part of valid UTF-8 written as the escape \\udcXX (XX = the byte in hex; Python's
"surrogateescape"). Valid UTF-8 never decodes to U+DC80..U+DCFF, so this is unambiguous, and
text tokens stay readable: " the" is written " the", a newline "\\n".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_json, atomic_write_text

TOKENIZER_JSON = "tokenizer.json"
VOCAB_TXT = "vocab.txt"
MERGES_TXT = "merges.txt"
TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_TXT, MERGES_TXT)
FORMAT = "scratchlm-bpe"
FORMAT_VERSION = 1

_LONE_SURROGATE = re.compile("[\udc80-\udcff]")
_JSON = json.JSONDecoder()


def token_to_text(token: bytes) -> str:
    text = json.dumps(token.decode("utf-8", errors="surrogateescape"), ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _parse_token(line: str, pos: int) -> tuple[bytes, int]:
    """Parse one JSON-string token starting at `pos`; returns (bytes, end position)."""
    value, end = _JSON.raw_decode(line, pos)
    if not isinstance(value, str):
        raise ValueError("expected a JSON string")
    return value.encode("utf-8", errors="surrogateescape"), end


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """Write the three tokenizer files into `directory` (created if needed), each atomically."""
    directory = Path(directory)
    vocab_lines = [f"{i} {token_to_text(tokenizer.vocab[i])}\n" for i in range(tokenizer.vocab_size)]
    merge_lines = [f"{token_to_text(l)} {token_to_text(r)}\n" for l, r in tokenizer.merges]
    atomic_write_text(directory / VOCAB_TXT, "".join(vocab_lines))
    atomic_write_text(directory / MERGES_TXT, "".join(merge_lines))
    # Settings last: a directory with a tokenizer.json has the files it describes.
    atomic_write_json(directory / TOKENIZER_JSON, {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "pattern": {"name": tokenizer.pattern, "regex": tokenizer._pattern_regex},
        "vocab_size": tokenizer.vocab_size,
        "num_merges": len(tokenizer.merges),
        "special_tokens": tokenizer.special_tokens,
        "files": {"vocab": VOCAB_TXT, "merges": MERGES_TXT},
        "token_escaping": "JSON string of the UTF-8 text; invalid bytes as \\udcXX (surrogateescape)",
        "fingerprint": tokenizer.fingerprint(),
        **({"chat_template": tokenizer.chat_template} if tokenizer.chat_template is not None else {}),
    })


def load_tokenizer(directory: str | os.PathLike):
    from scratchlm.tokenizer.tokenizer import Tokenizer

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ScratchLMError(f"{directory} is a file, not a tokenizer (or model) directory")
    if not directory.is_dir():
        raise ScratchLMError(f"tokenizer directory not found: {directory}")
    settings_path = directory / TOKENIZER_JSON
    settings = _read_settings(settings_path)
    vocab = _read_vocab(directory / VOCAB_TXT)
    merges = _read_merges(directory / MERGES_TXT)
    if len(vocab) != settings["vocab_size"]:
        raise ScratchLMError(
            f"{directory / VOCAB_TXT}: {len(vocab)} tokens but {settings_path} says vocab_size {settings['vocab_size']}"
        )
    try:
        tokenizer = Tokenizer(vocab, merges, list(settings["special_tokens"]), pattern=settings["pattern"]["name"],
                              chat_template=settings.get("chat_template"))
    except ScratchLMError as exc:
        raise ScratchLMError(f"corrupt tokenizer in {directory}: {exc}") from None
    if tokenizer.special_tokens != settings["special_tokens"] or tokenizer.vocab_size != settings["vocab_size"]:
        raise ScratchLMError(f"{settings_path}: special token ids do not match {VOCAB_TXT}")
    # A merges.txt cut at a line boundary still parses, and would silently encode differently:
    # the fingerprint saved with the files says whether they are the ones that were saved.
    if settings.get("num_merges", len(merges)) != len(merges):
        raise ScratchLMError(f"corrupt tokenizer in {directory}: {MERGES_TXT} has {len(merges)} merges, "
                             f"{TOKENIZER_JSON} says {settings['num_merges']} (truncated or edited?)")
    if "fingerprint" in settings and settings["fingerprint"] != tokenizer.fingerprint():
        raise ScratchLMError(f"corrupt tokenizer in {directory}: its files do not match the fingerprint "
                             f"saved in {TOKENIZER_JSON} (edited or truncated {VOCAB_TXT}/{MERGES_TXT}?)")
    return tokenizer


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLMError(f"tokenizer file missing: {path}") from None
    except UnicodeDecodeError:
        raise ScratchLMError(f"{path}: not valid UTF-8") from None
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror}") from None


def _read_settings(path: Path) -> dict:
    try:
        settings = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ScratchLMError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ScratchLMError(f"{path}: not a scratchlm tokenizer (format should be {FORMAT!r})")
    if settings.get("version") != FORMAT_VERSION:
        raise ScratchLMError(f"{path}: unsupported version {settings.get('version')!r} (expected {FORMAT_VERSION})")
    checks = {
        "vocab_size": lambda v: isinstance(v, int) and v >= 256,
        "pattern": lambda v: isinstance(v, dict) and isinstance(v.get("name"), str),
        "special_tokens": lambda v: isinstance(v, dict) and all(isinstance(i, int) for i in v.values()),
        "chat_template": lambda v: v is None or (isinstance(v, str) and v != ""),
    }
    for field, ok in checks.items():
        if not ok(settings.get(field)):
            raise ScratchLMError(f"{path}: missing or invalid field {field!r}")
    return settings


def _read_vocab(path: Path) -> dict[int, bytes]:
    vocab: dict[int, bytes] = {}
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line:
            continue
        try:
            id_text, _, rest = line.partition(" ")
            token, end = _parse_token(rest, 0)
            if end != len(rest):
                raise ValueError("trailing characters")
            token_id = int(id_text)
        except ValueError as exc:
            raise ScratchLMError(f"{path}:{lineno}: bad vocab line ({exc})") from None
        if token_id != len(vocab):
            raise ScratchLMError(f"{path}:{lineno}: expected id {len(vocab)}, found {token_id}")
        vocab[token_id] = token
    return vocab


def _read_merges(path: Path) -> list[tuple[bytes, bytes]]:
    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line:
            continue
        try:
            left, end = _parse_token(line, 0)
            if line[end : end + 1] != " ":
                raise ValueError("expected a space between the two tokens")
            right, end = _parse_token(line, end + 1)
            if end != len(line):
                raise ValueError("trailing characters")
        except ValueError as exc:
            raise ScratchLMError(f"{path}:{lineno}: bad merge line ({exc})") from None
        merges.append((left, right))
    return merges


# --------------------------------------------------------------------------- GPT-2's files
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable latin-1 bytes map to themselves,
    the rest (control bytes, space, ...) to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """(vocab, merges) from GPT-2's encoder.json (token -> id) and vocab.bpe (merges in rank order).

    Ids follow encoder.json (GPT-2's first ids are not in byte order: id 0 is "!"); the merge
    order follows vocab.bpe.
    """
    # str.translate maps GPT-2's characters back to latin-1 code points (one per byte); any other
    # character becomes U+FFFF, which latin-1 cannot encode, so it is reported.
    table = {ord(c): b for b, c in gpt2_bytes_to_unicode().items()}
    table.update({c: 0xFFFF for c in range(324) if c not in table})

    def to_bytes(text: str, where: str) -> bytes:
        try:
            return text.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            bad = next(c for c in text if table.get(ord(c), 0xFFFF) == 0xFFFF)
            raise ScratchLMError(f"{where}: character {bad!r} is not in GPT-2's byte table") from None

    encoder_path, bpe_path = Path(encoder_json), Path(vocab_bpe)
    try:
        encoder = json.loads(_read_text(encoder_path))
    except json.JSONDecodeError as exc:
        raise ScratchLMError(f"{encoder_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(encoder, dict):
        raise ScratchLMError(f"{encoder_path}: expected a JSON object of token -> id")
    vocab: dict[int, bytes] = {}
    for text, token_id in encoder.items():
        if not isinstance(token_id, int):
            raise ScratchLMError(f"{encoder_path}: id of {text!r} is not an integer")
        # "<|endoftext|>" is stored as plain text, not through the byte table.
        vocab[token_id] = text.encode("utf-8") if text == "<|endoftext|>" else to_bytes(text, str(encoder_path))

    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(_read_text(bpe_path).split("\n"), start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ScratchLMError(f"{bpe_path}:{lineno}: expected two tokens separated by a space")
        where = f"{bpe_path}:{lineno}"
        merges.append((to_bytes(parts[0], where), to_bytes(parts[1], where)))
    return vocab, merges
