"""Our byte-level BPE as a Hugging Face `tokenizers` tokenizer.json, and back.

tokenizer.json spells tokens in GPT-2's printable byte alphabet (each byte one character:
scratchlm.tokenizer.files.gpt2_bytes_to_unicode), merges as pairs of such tokens in rank order.
Pre-tokenization is our regex (`Split`, isolated) followed by `ByteLevel` without its own
regex, so the pieces are exactly ours; special tokens are added tokens. The result encodes
to our ids (`add_special_tokens=False`) and decodes to our text. With special tokens added
(transformers' default) the ids start with <|endoftext|>: every training document follows
one, and `scratchlm generate` starts a prompt the same way.

A chat model's tokenizer (ChatML, scratchlm.post.chat) also gets its chat template as Jinja,
so `apply_chat_template` gives the ids we train on, and <|im_end|> as its eos token: the
end of the assistant's turn is where a chat model stops.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from scratchlm.errors import ScratchLMError
from scratchlm.post.chat import CHATML, CHATML_JINJA, IM_END, chat_format
from scratchlm.tokenizer import ENDOFTEXT, Tokenizer
from scratchlm.tokenizer.files import gpt2_bytes_to_unicode
from scratchlm.tokenizer.pretokenize import PATTERNS

# GPT-2's regex as written before tiktoken's possessive quantifiers: what GPT-2's own
# tokenizer.json (ByteLevel with use_regex) and many others use; the same splits as ours.
_CLASSIC_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CLASSIC_GPT4 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
KNOWN_PATTERNS = {PATTERNS["gpt2"]: "gpt2", _CLASSIC_GPT2: "gpt2", PATTERNS["gpt4"]: "gpt4", _CLASSIC_GPT4: "gpt4"}


def byte_level_tokens(tokenizer: Tokenizer) -> list[str]:
    """Every token as tokenizer.json and GGUF spell it: regular tokens in GPT-2's byte alphabet,
    special tokens as their own text. Two ids with the same spelling cannot be told apart
    there, so they are refused."""
    table = gpt2_bytes_to_unicode()
    specials = {i: t for t, i in tokenizer.special_tokens.items()}
    tokens = [specials.get(i) or _to_text(tokenizer.vocab[i], table) for i in range(tokenizer.vocab_size)]
    if len(set(tokens)) != len(tokens):
        twice = next(token for token, count in Counter(tokens).items() if count > 1)
        raise ScratchLMError(f"the vocabulary spells token {twice!r} under two ids: tokenizer.json and GGUF "
                             f"cannot say that")
    return tokens


def byte_level_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    table = gpt2_bytes_to_unicode()
    return [(_to_text(left, table), _to_text(right, table)) for left, right in tokenizer.merges]


def _to_text(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer.json document (as a dict) for `tokenizer`."""
    tokens = byte_level_tokens(tokenizer)
    specials = set(tokenizer.special_tokens.values())
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in tokenizer.special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer._pattern_regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": _start_with_end_of_text(tokenizer),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens) if i not in specials},
                  "merges": [list(pair) for pair in byte_level_merges(tokenizer)]},
    }


def _start_with_end_of_text(tokenizer: Tokenizer) -> dict[str, Any] | None:
    if tokenizer.eot_id is None:
        return None
    eot = {"SpecialToken": {"id": ENDOFTEXT, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [eot, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [eot, {"Sequence": {"id": "A", "type_id": 0}}, eot, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {ENDOFTEXT: {"id": ENDOFTEXT, "ids": [tokenizer.eot_id], "tokens": [ENDOFTEXT]}}}


def tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict[str, Any]:
    eot = ENDOFTEXT if tokenizer.eot_id is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "bos_token": eot, "eos_token": eot, "add_bos_token": eot is not None, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if chat_format(tokenizer) == CHATML:
        # The template writes <|endoftext|> itself: apply_chat_template tokenizes without
        # adding special tokens.
        config.update(eos_token=IM_END, chat_template=CHATML_JINJA)
    return config


def chat_template_name(template: str | None) -> str | None:
    """The name of a Hugging Face chat template that is one of ours (an export read back),
    else None: another model's template is not a format scratchlm renders."""
    return CHATML if template == CHATML_JINJA else None


def from_tokenizer_json(path: Path) -> Tokenizer:
    """Our Tokenizer from a byte-level BPE tokenizer.json (GPT-2, Llama 3, ours...); anything
    else (SentencePiece, WordPiece, normalizers, other regexes) is refused with the reason."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScratchLMError(f"{path}: unreadable tokenizer.json ({exc})") from None
    model = document.get("model") or {}
    if model.get("type") != "BPE":
        raise ScratchLMError(f"{path}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    if document.get("normalizer"):
        raise ScratchLMError(f"{path}: a normalizer ({document['normalizer'].get('type')}) is not supported")
    pattern = _pattern_of(document.get("pre_tokenizer"), path)
    inverse = {c: b for b, c in gpt2_bytes_to_unicode().items()}

    def to_bytes(text: str) -> bytes:
        try:
            return bytes(inverse[c] for c in text)
        except KeyError as exc:
            raise ScratchLMError(f"{path}: token {text!r} is not byte-level (character {exc.args[0]!r})") from None

    vocab = {int(i): to_bytes(t) for t, i in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    specials = [t for t in document.get("added_tokens", []) if t.get("special")]
    for token in specials:
        vocab[int(token["id"])] = token["content"].encode("utf-8")
    try:
        return Tokenizer(vocab, [(to_bytes(left), to_bytes(right)) for left, right in merges],
                         [t["content"] for t in sorted(specials, key=lambda t: t["id"])], pattern=pattern)
    except ScratchLMError as exc:
        raise ScratchLMError(f"{path}: {exc}") from None


def _pattern_of(pre_tokenizer: dict | None, path: Path) -> str:
    """Which of our pre-tokenization patterns a tokenizer.json's pre_tokenizer is."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    regex = None
    for step in steps:
        if step.get("type") == "Split":
            regex = step.get("pattern", {}).get("Regex")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regex = regex or _CLASSIC_GPT2  # ByteLevel's own regex is GPT-2's
        elif step.get("type") not in ("ByteLevel", "Split"):
            raise ScratchLMError(f"{path}: pre-tokenizer {step.get('type')!r} is not supported")
    if regex not in KNOWN_PATTERNS:
        raise ScratchLMError(f"{path}: pre-tokenization regex {regex!r} is neither GPT-2's nor GPT-4's, the two "
                             f"scratchlm knows")
    return KNOWN_PATTERNS[regex]
