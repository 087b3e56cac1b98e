"""SFT and preference data files: the formats found in the wild, read into conversations.

SFT (`read_sft_file`): each record becomes a conversation, a list of chat.Message.

    Alpaca          {"instruction", "input"?, "output", "system"?, "history"?}: the user says
                    instruction + "\\n\\n" + input (just the instruction when input is empty),
                    the assistant answers output; history ([[instruction, response], ...],
                    LLaMA-Factory's addition) comes before as earlier turns
    OpenAI chat     {"messages": [{"role", "content", "weight"?}]}
    LLaMA-Factory   {"messages": [{"role", "content": [{"type": "text", "value"}], "loss_weight"}]}
    ShareGPT        {"conversations": [{"from": "human" | "gpt" | "system", "value"}], "system"?}

Preference (`read_preference_file`): each record becomes a PreferencePair, the prompt (the
conversation before the answer, ending with the user) and the chosen and rejected replies.

    Alpaca          {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?}
                    ("output", the SFT answer, is not part of the pair)
    ShareGPT        {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
                    (LLaMA-Factory's preference format)
    OpenAI / TRL    {"prompt": str | [messages], "chosen": str | [one assistant message],
                    "rejected": ...}

Loss weights: the OpenAI `weight` and LLaMA-Factory `loss_weight` of a message say whether it
is trained on. Only 0 or 1 are supported (the loss is taken on a token or not), and only an
assistant turn can be trained on: weight 0 on an assistant turn keeps it as context without
training on it (Message.train = False); weight 0 on other turns is what happens anyway; any
other value is an error rather than silently ignored.

A file is a JSON list of records or JSON Lines (one record per line), whatever its name says.
Its format is recognised from the first record's fields; every record must then be in it.
Malformed input stops the reading with one line naming file:line (where the record starts),
the record's number (from 1) and the field. A preference pair whose chosen reply equals the
rejected one teaches nothing and is skipped; the count of skipped pairs is returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TypeVar

from scratchlm.errors import ScratchLMError
from scratchlm.post.chat import Message, check_conversation

T = TypeVar("T")

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_JSON_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]  # the conversation so far; it ends with a user message
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred one

    def conversation(self, reply: str) -> list[Message]:
        """The prompt followed by `reply` (self.chosen or self.rejected) as the assistant turn."""
        return [*self.prompt, Message("assistant", reply)]


class PreferenceFile(NamedTuple):
    pairs: list[PreferencePair]
    equal_skipped: int  # pairs left out because chosen == rejected


# --------------------------------------------------------------------------- public readers
def read_sft_file(path: str | os.PathLike) -> list[list[Message]]:
    """The conversations of an SFT data file (see the module docstring for the formats)."""
    return list(_parse_records(path, _SFT_FORMATS, "SFT"))


def read_preference_file(path: str | os.PathLike) -> PreferenceFile:
    """The preference pairs of a file and how many were skipped as chosen == rejected."""
    pairs = list(_parse_records(path, _PREFERENCE_FORMATS, "preference"))
    kept = [pair for pair in pairs if pair.chosen != pair.rejected]
    return PreferenceFile(kept, len(pairs) - len(kept))


def split_held_out(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): each item is held out when the hash of (seed, its canonical JSON)
    falls in the first `fraction` of the hash range. The same item always lands on the same
    side, whatever the process, the order of the items or the other items: adding data never
    moves old items between the splits, and duplicates never straddle them. The held-out
    share is `fraction` on average, so a tiny data set can get an empty side. Order is kept."""
    if not 0 <= fraction < 1:
        raise ScratchLMError(f"held-out fraction must be at least 0 and below 1, got {fraction}")
    threshold = fraction * 2**64
    train: list[T] = []
    held_out: list[T] = []
    for item in items:
        canonical = json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                               default=dataclasses.asdict)
        digest = hashlib.sha256(f"{seed}\n{canonical}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") < threshold else train).append(item)
    return train, held_out


# --------------------------------------------------------------------------- records
class _Format(NamedTuple):
    name: str  # as the error for an unknown format lists it
    key: str  # the field that identifies it
    parse: Callable[[dict[str, Any]], Any]


def _parse_records(path: str | os.PathLike, formats: Sequence[_Format], kind: str) -> Iterator[Any]:
    """Each record of `path` parsed by the format its first record is in."""
    chosen: _Format | None = None
    for number, (line, record) in enumerate(_read_records(Path(path)), start=1):
        where = f"{path}:{line}: record {number}"
        if not isinstance(record, dict):
            raise ScratchLMError(f"{where}: expected a JSON object, got {_type_name(record)}")
        if chosen is None:
            chosen = next((f for f in formats if f.key in record), None)
            if chosen is None:
                raise ScratchLMError(f"{where}: not in any {kind} format scratchlm reads (tried "
                                     f"{'; '.join(f.name for f in formats)}); its fields are "
                                     f"{', '.join(map(repr, record)) or 'none'}")
        try:
            yield chosen.parse(record)
        except ScratchLMError as exc:
            raise ScratchLMError(f"{where}: {exc}") from None
    if chosen is None:
        raise ScratchLMError(f"{path}: no records")


def _read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line where it starts, value) for each record of a JSON list or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLMError(f"{path}: not found") from None
    except IsADirectoryError:
        raise ScratchLMError(f"{path} is a directory, not a data file") from None
    except UnicodeDecodeError:
        raise ScratchLMError(f"{path}: not valid UTF-8") from None
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror}") from None
    text = text.removeprefix("\ufeff")  # a byte order mark some editors write
    if text.lstrip(_JSON_WHITESPACE).startswith("["):
        yield from _json_list_records(path, text)
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == 1 and _is_one_json_value(text):
                raise ScratchLMError(f"{path}: a single JSON value ({_type_name(json.loads(text))}); expected a "
                                     f"JSON list of records or JSON Lines (one record per line)") from None
            raise ScratchLMError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None


def _is_one_json_value(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_list_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON list, each with the line it starts on, decoded one at a time
    (json's raw_decode) so that the line of every record is known."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0

    def skip_whitespace(at: int) -> int:
        while at < len(text) and text[at] in _JSON_WHITESPACE:
            at += 1
        return at

    def invalid(at: int, message: str) -> ScratchLMError:
        lineno = text.count("\n", 0, at) + 1
        return ScratchLMError(f"{path}:{lineno}: invalid JSON ({message})")

    pos = skip_whitespace(pos)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise ScratchLMError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield line, value
            pos = skip_whitespace(end)
            if text.startswith(",", pos):
                pos = skip_whitespace(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise invalid(pos, "expected ',' or ']' after a record")
    if skip_whitespace(pos) != len(text):
        raise invalid(skip_whitespace(pos), "extra data after the list")


# --------------------------------------------------------------------------- fields
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
               int: "a number", float: "a number"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _field(record: dict[str, Any], field: str, *kinds: type, optional: bool = False) -> Any:
    """record[field], checked to be one of `kinds` (JSON containers or strings); None when
    `optional` and absent or null."""
    if record.get(field) is None:
        if optional:
            return None
        raise ScratchLMError(f"missing field {field!r}" if field not in record else f"field {field!r} is null")
    value = record[field]
    if not isinstance(value, kinds):
        expected = " or ".join(_TYPE_NAMES[kind] for kind in kinds)
        raise ScratchLMError(f"field {field!r}: expected {expected}, got {_type_name(value)}")
    return value


def _reply(value: str, field: str) -> str:
    if not value.strip():
        raise ScratchLMError(f"field {field!r}: empty assistant reply")
    return value


def _train_flag(message: dict[str, Any], role: str, name: str) -> bool:
    """Message.train from an OpenAI `weight` or LLaMA-Factory `loss_weight` (0 or 1; see the
    module docstring); True when absent."""
    for field in ("weight", "loss_weight"):
        if field not in message:
            continue
        weight = message[field]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ScratchLMError(f"{name}.{field}: only 0 or 1 is supported (a token is trained on or not), "
                                 f"got {weight!r}")
        if role != "assistant":
            if weight == 1:
                raise ScratchLMError(f"{name}.{field}: 1 on a {role} turn, but only assistant turns are trained on")
            return True  # the default for a turn that is never trained on
        return weight == 1
    return True


# --------------------------------------------------------------------------- Alpaca
def _alpaca_prompt(record: dict[str, Any]) -> list[Message]:
    """The system message, the history and the user's turn of an Alpaca record."""
    messages = []
    system = _field(record, "system", str, optional=True)
    if system:
        messages.append(Message("system", system))
    for i, turn in enumerate(_field(record, "history", list, optional=True) or []):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ScratchLMError(f"history[{i}]: expected [instruction, response], two strings")
        messages += [Message("user", turn[0]), Message("assistant", _reply(turn[1], f"history[{i}][1]"))]
    instruction = _field(record, "instruction", str)
    user_input = _field(record, "input", str, optional=True)
    user = "\n\n".join(part for part in (instruction, user_input) if part)
    if not user.strip():
        raise ScratchLMError("fields 'instruction' and 'input' are both empty: there is nothing to answer")
    return [*messages, Message("user", user)]


def _alpaca_sft(record: dict[str, Any]) -> list[Message]:
    return [*_alpaca_prompt(record), Message("assistant", _reply(_field(record, "output", str), "output"))]


def _alpaca_preference(record: dict[str, Any]) -> PreferencePair:
    return PreferencePair(_alpaca_prompt(record), _reply(_field(record, "chosen", str), "chosen"),
                          _reply(_field(record, "rejected", str), "rejected"))


# --------------------------------------------------------------------------- OpenAI / LLaMA-Factory messages
def _openai_messages(messages: list[Any], name: str, purpose: str) -> list[Message]:
    result = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise ScratchLMError(f"{where}: expected an object with role and content, got {_type_name(message)}")
        try:
            role = _field(message, "role", str)
            content = _content_text(_field(message, "content", str, list))
        except ScratchLMError as exc:
            raise ScratchLMError(f"{where}: {exc}") from None
        result.append(Message(role, content, _train_flag(message, role, where)))
    check_conversation(result, purpose, what=name)
    return result


def _content_text(content: str | list[Any]) -> str:
    """A message's text: the string, or its text parts joined (LLaMA-Factory's
    [{"type": "text", "value"}], OpenAI's [{"type": "text", "text"}])."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise ScratchLMError(f"content[{j}]: part of type {kind!r} is not supported (text only)")
        text = part.get("value", part.get("text"))
        if not isinstance(text, str):
            raise ScratchLMError(f"content[{j}]: expected a string 'value' (or 'text'), got {_type_name(text)}")
        texts.append(text)
    return "".join(texts)


def _openai_sft(record: dict[str, Any]) -> list[Message]:
    return _openai_messages(_field(record, "messages", list), "messages", "training")


def _openai_preference(record: dict[str, Any]) -> PreferencePair:
    prompt = _field(record, "prompt", str, list)
    if isinstance(prompt, str):
        prompt_messages = [Message("user", prompt)]
        check_conversation(prompt_messages, "prompt", what="prompt")
    else:
        prompt_messages = _openai_messages(prompt, "prompt", "prompt")
    return PreferencePair(prompt_messages, _openai_reply(record, "chosen"), _openai_reply(record, "rejected"))


def _openai_reply(record: dict[str, Any], field: str) -> str:
    """A reply given as a string or as a list of one assistant message (TRL's conversational form)."""
    reply = _field(record, field, str, list)
    if isinstance(reply, list):
        messages = _openai_messages(reply, field, "training")
        if len(messages) != 1:
            raise ScratchLMError(f"field {field!r}: expected one assistant message, got {len(messages)} messages")
        reply = messages[0].content
    return _reply(reply, field)


# --------------------------------------------------------------------------- ShareGPT
def _sharegpt_messages(record: dict[str, Any], purpose: str) -> list[Message]:
    messages = []
    for i, turn in enumerate(_field(record, "conversations", list)):
        messages.append(_sharegpt_turn(turn, f"conversations[{i}]"))
    check_conversation(messages, purpose, what="conversations", role_field="from", content_field="value")
    system = _field(record, "system", str, optional=True)
    if system:
        if messages[0].role == "system":
            raise ScratchLMError("both a 'system' field and a system turn in 'conversations'")
        messages.insert(0, Message("system", system))
    return messages


def _sharegpt_turn(turn: Any, name: str) -> Message:
    if not isinstance(turn, dict):
        raise ScratchLMError(f"{name}: expected an object with from and value, got {_type_name(turn)}")
    try:
        speaker = _field(turn, "from", str)
        value = _field(turn, "value", str)
    except ScratchLMError as exc:
        raise ScratchLMError(f"{name}: {exc}") from None
    if speaker not in _SHAREGPT_ROLES:
        raise ScratchLMError(f"{name}.from: unknown role {speaker!r} (valid: human, gpt, system)")
    return Message(_SHAREGPT_ROLES[speaker], value)


def _sharegpt_sft(record: dict[str, Any]) -> list[Message]:
    return _sharegpt_messages(record, "training")


def _sharegpt_preference(record: dict[str, Any]) -> PreferencePair:
    prompt = _sharegpt_messages(record, "prompt")
    replies = []
    for field in ("chosen", "rejected"):
        reply = _sharegpt_turn(_field(record, field, dict), field)
        if reply.role != "assistant":
            raise ScratchLMError(f"{field}.from: the reply must come from 'gpt', not {reply.role!r}")
        replies.append(_reply(reply.content, f"{field}.value"))
    return PreferencePair(prompt, *replies)


_SFT_FORMATS = (
    _Format("OpenAI chat / LLaMA-Factory {messages}", "messages", _openai_sft),
    _Format("ShareGPT {conversations}", "conversations", _sharegpt_sft),
    _Format("Alpaca {instruction, input, output}", "instruction", _alpaca_sft),
)
_PREFERENCE_FORMATS = (
    _Format("ShareGPT {conversations, chosen, rejected}", "conversations", _sharegpt_preference),
    _Format("Alpaca {instruction, input, chosen, rejected}", "instruction", _alpaca_preference),
    _Format("OpenAI / TRL {prompt, chosen, rejected}", "prompt", _openai_preference),
)
