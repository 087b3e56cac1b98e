r"""The chat format: conversations as token ids, and which of them supervised fine-tuning trains on.

ChatML (the format of OpenAI's chat models, Qwen and many others). A conversation, a list of
messages (role: system, user or assistant; content: text), is rendered as

    <|endoftext|>
    <|im_start|> encode(role + "\n" + content) <|im_end|> encode("\n")     for each message

e.g. `<|endoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n`.

- It starts with <|endoftext|> because every pretraining document follows one: a
  conversation starts where the model has always seen text start.
- <|im_start|> and <|im_end|> are special tokens added after pretraining (`add_chat_tokens`)
  and written only by this module. Message text is always encoded with `encode_ordinary`, so
  "<|im_end|>" typed by a user is ordinary text: it can neither end a turn nor forge one.
- role + "\n" + content is encoded as one piece and the "\n" after <|im_end|> as another:
  exactly how the exported Hugging Face tokenizer encodes the rendered text (it splits text at
  special tokens only), so `apply_chat_template` with `CHATML_JINJA` gives the same ids.

Trained on (`loss_mask` True): the content of each assistant message and its <|im_end|>, so
the model learns what to answer and that its turn ends there. Not trained on: <|endoftext|>,
each header `<|im_start|>role\n` (written by us at generation time, never by the model), the
system and user turns (the model should answer the user, not learn to write like one) and the
"\n" after <|im_end|> (generation stops at <|im_end|>). An assistant message with
`train=False` (OpenAI's `"weight": 0`) stays in the context but is not trained on.

Where the header meets the content, BPE can merge across the "\n" when the content starts with
whitespace (the GPT-2 pattern makes "\n" + " " of "\n  Hi" one pre-token, and "\n\n" of
"\n\nHi"). The mask then starts at the first token that is not part of the header's own
encoding, encode(role + "\n"): that token holds content, so it is trained on (Hugging Face's
`return_assistant_tokens_mask` marks it too). Such a reply starts differently from the
generation prompt, which ends with the header's own "\n" token; content without leading
whitespace (nearly all data) never hits this.

Generation: `render_prompt` renders the conversation so far followed by the header
`<|im_start|>assistant\n`; the model writes the reply and ends it with <|im_end|>
(`stop_ids`: <|im_end|>, then <|endoftext|>, which also ends anything).

A base model without the chat tokens can still be talked to, in the plain format
(`chat_format(tokenizer)` says which of the two a tokenizer uses):

    <|endoftext|>{system}\n\nUser: {user}\nAssistant: {assistant}\nUser: {user}\nAssistant:

(the system line only when there is one). The prompt ends with "Assistant:" and no space:
byte-level BPE attaches a space to the word after it (" Hello"), so the model writes it.
Generation stops at the string "\nUser:" (`stop_strings`: the model starting the user's
next turn) or at <|endoftext|>; the reply is the text before it, stripped of surrounding
whitespace. Only ChatML is trained on (`render_conversation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, NamedTuple, Sequence

from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import ENDOFTEXT, Tokenizer

if TYPE_CHECKING:
    from scratchlm.model import Transformer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")
CHATML = "chatml"  # the name stored in the tokenizer (Tokenizer.chat_template)
PLAIN = "plain"
PLAIN_STOP_STRINGS = ("\nUser:",)
_CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END)
_PLAIN_NAMES = {"user": "User", "assistant": "Assistant"}

# The same format for Hugging Face's `apply_chat_template` (exported as the tokenizer's
# chat_template; tests check it gives exactly our ids). `generation` marks what
# `return_assistant_tokens_mask` reports: the tokens we train on.
CHATML_JINJA = r"""{#- ChatML as scratchlm renders it: see scratchlm/post/chat.py -#}
{{- '<|endoftext|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role'] + ' (valid: system, user, assistant)') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class Message:
    """One turn. `train` applies to assistant turns only: False keeps the turn as context
    without training on it (OpenAI's `"weight": 0`, LLaMA-Factory's `"loss_weight": 0`)."""

    role: str
    content: str
    train: bool = True


class RenderedConversation(NamedTuple):
    ids: list[int]
    loss_mask: list[bool]  # True where the loss is taken: the assistant's replies


Messages = Sequence["Message | Mapping[str, Any]"]


# --------------------------------------------------------------------------- checks
def as_messages(messages: Messages) -> list[Message]:
    """`messages` as Message objects; mappings with "role" and "content" (and optionally
    "train") are accepted too, as chat front ends produce them."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ScratchLMError(f"messages: expected a list of messages, got {type(messages).__name__}")
    result = []
    for i, message in enumerate(messages):
        if isinstance(message, Message):
            result.append(message)
            continue
        if not isinstance(message, Mapping):
            raise ScratchLMError(f"messages[{i}]: expected a message with role and content, "
                                 f"got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ScratchLMError(f"messages[{i}]: missing field {field!r}")
        result.append(Message(message["role"], message["content"], message.get("train", True)))
    return result


def check_conversation(messages: Sequence[Message], purpose: Literal["training", "prompt"],
                       what: str = "messages", role_field: str = "role", content_field: str = "content") -> None:
    """Raise a one-line error naming the message and field of the first problem.

    Every conversation: known roles, string contents, a system message only first, no empty
    assistant message, `train` only off on assistant turns. "training" also needs an
    assistant turn to train on; "prompt" (what the model answers next) must end with the
    user. `what`, `role_field` and `content_field` name things as the caller's file does.
    """
    if not messages:
        raise ScratchLMError(f"{what}: the conversation is empty")
    for i, message in enumerate(messages):
        where = f"{what}[{i}]"
        if message.role not in ROLES:
            raise ScratchLMError(f"{where}.{role_field}: unknown role {message.role!r} "
                                 f"(valid: {', '.join(ROLES)})")
        if not isinstance(message.content, str):
            raise ScratchLMError(f"{where}.{content_field}: expected a string, got {type(message.content).__name__}")
        if message.role == "system" and i > 0:
            raise ScratchLMError(f"{where}.{role_field}: a system message may only come first")
        if message.role == "assistant" and not message.content.strip():
            raise ScratchLMError(f"{where}.{content_field}: empty assistant message")
        if not isinstance(message.train, bool):
            raise ScratchLMError(f"{where}: train must be true or false, got {message.train!r}")
        if not message.train and message.role != "assistant":
            raise ScratchLMError(f"{where}: only assistant turns are trained on, so only they can be excluded")
    if purpose == "training" and not any(m.role == "assistant" and m.train for m in messages):
        raise ScratchLMError(f"{what}: no assistant turn to train on")
    if purpose == "prompt" and messages[-1].role != "user":
        raise ScratchLMError(f"{what}[{len(messages) - 1}].{role_field}: the conversation must end with "
                             f"a user message for the model to answer, not {messages[-1].role!r}")


# --------------------------------------------------------------------------- the format in use
def chat_format(tokenizer: Tokenizer) -> Literal["chatml", "plain"]:
    """"chatml" when the tokenizer carries the ChatML template (a chat model), else "plain"."""
    if tokenizer.chat_template is None:
        return PLAIN
    if tokenizer.chat_template != CHATML:
        raise ScratchLMError(f"the tokenizer's chat template {tokenizer.chat_template!r} is unknown to this "
                             f"scratchlm (it knows {CHATML!r})")
    missing = [token for token in _CHAT_TOKENS if token not in tokenizer.special_tokens]
    if missing:
        raise ScratchLMError(f"the tokenizer says chat template {CHATML!r} but lacks the special token "
                             f"{missing[0]} (edited tokenizer.json?)")
    return CHATML


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids that end a reply, the turn's own end first: [<|im_end|>, <|endoftext|>] in
    ChatML, [<|endoftext|>] (when the tokenizer has it) in the plain format."""
    if chat_format(tokenizer) == CHATML:
        return [tokenizer.special_tokens[IM_END], tokenizer.special_tokens[ENDOFTEXT]]
    return [tokenizer.eot_id] if tokenizer.eot_id is not None else []


def stop_strings(tokenizer: Tokenizer) -> list[str]:
    """Text that ends a reply (cut before it): none in ChatML, "\\nUser:" in the plain format."""
    return [] if chat_format(tokenizer) == CHATML else list(PLAIN_STOP_STRINGS)


# --------------------------------------------------------------------------- rendering
def render_conversation(tokenizer: Tokenizer, messages: Messages) -> RenderedConversation:
    """Ids of a whole conversation in ChatML and the mask of the tokens trained on (see the
    module docstring). Needs a tokenizer with the chat tokens (`add_chat_tokens`)."""
    messages = as_messages(messages)
    check_conversation(messages, "training")
    if chat_format(tokenizer) != CHATML:
        raise ScratchLMError("the tokenizer has no chat tokens: give the model them first "
                             "(scratchlm.post.chat.add_chat_tokens)")
    ids, loss_mask = [tokenizer.special_tokens[ENDOFTEXT]], [False]
    im_start, im_end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    newline = tokenizer.encode_ordinary("\n")
    for message in messages:
        body = tokenizer.encode_ordinary(f"{message.role}\n{message.content}")
        trained = message.role == "assistant" and message.train
        content_start = _header_length(tokenizer, message.role, body) if trained else len(body)
        ids += [im_start, *body, im_end, *newline]
        loss_mask += [False] * (1 + content_start) + [True] * (len(body) - content_start)
        loss_mask += [trained] + [False] * len(newline)
    return RenderedConversation(ids, loss_mask)


def _header_length(tokenizer: Tokenizer, role: str, body: list[int]) -> int:
    """How many leading tokens of `body` (role + "\\n" + content) are the header's own
    encoding: the first token after them is the first one holding content."""
    header = tokenizer.encode_ordinary(f"{role}\n")
    n = 0
    while n < len(header) and n < len(body) and header[n] == body[n]:
        n += 1
    return n


def render_prompt(tokenizer: Tokenizer, messages: Messages) -> list[int]:
    """Ids of the conversation so far followed by the assistant's header: what the model
    continues to answer the last (user) message. ChatML for a chat model, else the plain
    format; stop generating at `stop_ids` (and, plain, `stop_strings`)."""
    messages = as_messages(messages)
    check_conversation(messages, "prompt")
    if chat_format(tokenizer) == PLAIN:
        return _render_plain_prompt(tokenizer, messages)
    im_start, im_end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    ids = [tokenizer.special_tokens[ENDOFTEXT]]
    for message in messages:
        ids += [im_start, *tokenizer.encode_ordinary(f"{message.role}\n{message.content}"), im_end,
                *tokenizer.encode_ordinary("\n")]
    return ids + [im_start, *tokenizer.encode_ordinary("assistant\n")]


def _render_plain_prompt(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    parts = []
    for message in messages:
        if message.role == "system":
            parts.append(f"{message.content}\n\n")
        else:
            parts.append(f"{_PLAIN_NAMES[message.role]}: {message.content}\n")
    ids = tokenizer.encode_ordinary("".join(parts) + "Assistant:")
    return [tokenizer.eot_id, *ids] if tokenizer.eot_id is not None else ids


# --------------------------------------------------------------------------- preparing a base model
def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the ChatML tokens it lacks (new ids at the end) and the template
    recorded: the tokenizer `add_chat_tokens` gives the model."""
    if chat_format(tokenizer) == CHATML:
        return tokenizer
    missing = [token for token in _CHAT_TOKENS if token not in tokenizer.special_tokens]
    return Tokenizer(tokenizer.vocab, tokenizer.merges, [*tokenizer.special_tokens, *missing],
                     pattern=tokenizer.pattern, chat_template=CHATML)


def add_chat_tokens(model: Transformer, tokenizer: Tokenizer) -> tuple[Transformer, Tokenizer]:
    """A tokenizer with the ChatML tokens (new ids at the end of the vocabulary) and the
    template recorded, and a new model whose embedding (and untied LM head) has a row for
    each new id, initialised to the mean of the existing rows; every other weight is the
    same, so the logits of the old tokens on old ids are unchanged. The mean puts the new
    tokens where an average token is, rather than at a random point the trained layers have
    never seen (Hewitt 2021, "Initializing new word embeddings for pretrained language
    models"). <|endoftext|> is added too if missing: every conversation starts with it.

    Inputs that already have the tokens and the template are returned unchanged."""
    # Imported here: reading data files and rendering (what the export and data code use this
    # module for) need neither torch nor the model.
    import torch

    from scratchlm.model import ModelConfig, Transformer

    if chat_format(tokenizer) == CHATML:
        return model, tokenizer
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ScratchLMError(f"the model's vocab_size is {model.config.vocab_size} but the tokenizer has "
                             f"{tokenizer.vocab_size} tokens")
    chat_tokenizer = with_chat_tokens(tokenizer)
    # New ids go at the end. A tokenizer that had the tokens but not the template (trained
    # with --special-token <|im_start|> ...) keeps its ids: only the template is recorded.
    new_rows = chat_tokenizer.vocab_size - tokenizer.vocab_size
    if new_rows == 0:
        return model, chat_tokenizer

    state = model.state_dict()
    grown = {"tok_emb.weight"} | ({"lm_head.weight"} if not model.config.tie_embeddings else set())
    for name in grown:
        rows = state[name]
        mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
        state[name] = torch.cat([rows, mean.expand(new_rows, -1)])
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    config = ModelConfig.from_dict({**model.config.to_dict(), "vocab_size": chat_tokenizer.vocab_size})
    reference = model.tok_emb.weight
    chat_model = Transformer(config).to(device=reference.device, dtype=reference.dtype)
    chat_model.load_state_dict(state)
    chat_model.train(model.training)
    return chat_model, chat_tokenizer
