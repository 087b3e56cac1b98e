"""Text generation: a prompt in, decoded text pieces out as soon as they are complete.

Token sampling (and the KV cache) lives on the model, `Transformer.generate`; this layer
encodes the prompt and turns the token stream back into text. A token can end in the middle
of a multi-byte UTF-8 character (byte-level BPE splits them freely), so bytes are fed to an
incremental UTF-8 decoder that holds an incomplete character back until its last byte
arrives; invalid bytes become U+FFFD, exactly as `Tokenizer.decode` does.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.model.sampling import check_sampling_args
from scratchlm.model.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizer import Tokenizer


def check_generation_args(max_new_tokens: int, temperature: float, top_k: int | None,
                          top_p: float | None, seed: int | None = None) -> None:
    """Raise a one-line error for a bad option (call it before loading a model)."""
    if max_new_tokens < 1:
        raise ScratchLMError(f"max tokens must be at least 1, got {max_new_tokens}")
    check_sampling_args(temperature, top_k, top_p)
    if seed is not None and not 0 <= seed < 2**63:
        raise ScratchLMError(f"seed must be between 0 and 2^63 - 1, got {seed}")


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 256,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, notice: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece; stops at the end-of-text token.

    The prompt is ordinary text (a special token's string in it is text) and starts a fresh
    document: it follows the end-of-text token, as every document does in training (an
    empty prompt is just the start of a document). A prompt longer than the context keeps its
    end; `notice` is told so. Temperature 0 is greedy. With a seed the output is reproducible
    (on the same device); without one it draws from torch's global generator.
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p, seed)
    device = model.tok_emb.weight.device
    prompt_ids = tokenizer.encode_ordinary(prompt)
    if tokenizer.eot_id is not None:
        prompt_ids = [tokenizer.eot_id] + prompt_ids
    elif not prompt_ids:
        raise ScratchLMError("empty prompt and the tokenizer has no <|endoftext|> to start from")
    window = model.config.context_length
    if len(prompt_ids) > window and notice is not None:
        notice(f"the prompt is {len(prompt_ids)} tokens; the model sees only its last {window} "
               f"(context length {window})")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    token_bytes = tokenizer.vocab
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids = model.generate(torch.tensor([prompt_ids[-window:]], device=device), max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, stop_token=tokenizer.eot_id)
    for token_id in ids:
        piece = utf8.decode(token_bytes[token_id])
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)  # an unfinished character at the very end
    if tail:
        yield tail


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """The whole continuation as one string (same arguments as `generate`)."""
    return "".join(generate(model, tokenizer, prompt, **kwargs))
