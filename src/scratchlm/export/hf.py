"""Hugging Face checkpoints: export a model directory for transformers, import one back.

An exported directory is what `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` (and
vLLM, TGI) read:

    config.json             LlamaForCausalLM, Qwen3ForCausalLM or GPT2LMHeadModel (adapters.py)
    model.safetensors       the weights under transformers' names (a tied head is not stored:
                            transformers ties it to the embedding on load)
    generation_config.json  end-of-text as bos/eos (a chat model: eos <|im_end|>, then
                            end-of-text); our default sampling (temperature 0.8)
    tokenizer.json          our BPE as a `tokenizers` byte-level BPE (hf_tokenizer.py)
    tokenizer_config.json   with a chat model's template (`chat_template`)
    chat_template.jinja     a chat model's template again: transformers 5 reads (and writes)
                            this file; older versions and other tools read tokenizer_config

Import reads such a directory (ours or a published Llama-family / GPT-2 checkpoint: one
safetensors file, sharded ones with their index, or pytorch_model.bin through
torch.load(weights_only=True)) and writes a scratchlm model directory. `--from-hub` fetches the
same files with huggingface_hub first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.errors import ScratchLMError
from scratchlm.export import HF_DTYPES
from scratchlm.export.adapters import GPT2, config_from_hf, from_hf, hf_architecture, hf_config, to_hf
from scratchlm.export.hf_tokenizer import chat_template_name, from_tokenizer_json, tokenizer_config, tokenizer_json
from scratchlm.fsutil import (atomic_directory, atomic_write_json, atomic_write_text, check_output_directory,
                               current_umask)
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import load_model, save_model
from scratchlm.post.chat import CHATML, CHATML_JINJA, chat_format, stop_ids
from scratchlm.tokenizer import ENDOFTEXT, Tokenizer
from scratchlm.tokenizer.files import read_gpt2_files

_TORCH_DTYPES = {name: getattr(torch, name) for name in HF_DTYPES}
# The sampling `scratchlm generate` uses by default, so `model.generate(do_sample=True)` matches.
DEFAULT_TEMPERATURE = 0.8

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def check_dtype(dtype: str, choices: Iterable[str]) -> None:
    if dtype not in choices:
        raise ScratchLMError(f"unknown dtype {dtype!r} (choose from {', '.join(choices)})")


# --------------------------------------------------------------------------- export
def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write `model_dir` as a transformers checkpoint into `out_dir` (see the module docstring)."""
    check_dtype(dtype, HF_DTYPES)
    check_output_directory(out_dir, overwrite, "Hugging Face checkpoint")
    model, tokenizer = load_model(model_dir)
    config = model.config
    tensors = {name: tensor.to(_TORCH_DTYPES[dtype]).contiguous()
               for name, tensor in to_hf(model.state_dict(), config).items()}
    values = hf_config(config, tokenizer.eot_id)
    # transformers 5 reads "dtype"; earlier versions, vLLM and TGI "torch_dtype".
    values.update(dtype=dtype, torch_dtype=dtype)
    chat = chat_format(tokenizer) == CHATML
    # transformers' generate stops at any of a list of eos ids.
    generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": stop_ids(tokenizer) if chat else tokenizer.eot_id,
                  "do_sample": True, "temperature": DEFAULT_TEMPERATURE, "max_length": config.context_length}
    with atomic_directory(out_dir, overwrite, "Hugging Face checkpoint", commit_last=("config.json",)) as tmp:
        _write_safetensors(tmp / SAFETENSORS, tensors)
        atomic_write_json(tmp / "generation_config.json", generation)
        atomic_write_json(tmp / "tokenizer.json", tokenizer_json(tokenizer))
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(tokenizer, config.context_length))
        if chat:
            atomic_write_text(tmp / CHAT_TEMPLATE_JINJA, CHATML_JINJA)
        atomic_write_json(tmp / "config.json", values)
    return Path(out_dir)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except (SafetensorError, OSError) as exc:  # e.g. disk full: safetensors writes in Rust
        raise ScratchLMError(f"cannot write {path.name}: {exc}") from None
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates it 0600


# --------------------------------------------------------------------------- import
def import_hf(hf_dir: str | os.PathLike | None, out_dir: str | os.PathLike, *, from_hub: str | None = None,
              revision: str | None = None, cache_dir: str | os.PathLike | None = None,
              overwrite: bool = False) -> Path:
    """A scratchlm model directory at `out_dir` from a transformers checkpoint: the local
    directory `hf_dir`, or the Hub repository `from_hub` (see download_hf)."""
    if (hf_dir is None) == (from_hub is None):
        raise ScratchLMError("import needs either a local Hugging Face directory or --from-hub REPO_ID, not both")
    check_output_directory(out_dir, overwrite, "model")
    source = Path(hf_dir) if hf_dir is not None else download_hf(from_hub, revision, cache_dir)
    if not source.is_dir():
        raise ScratchLMError(f"{source}: not found (a Hugging Face checkpoint directory)")
    config = config_from_hf(_read_json(source / "config.json"), str(source / "config.json"))
    tokenizer = read_hf_tokenizer(source)
    tokenizer = _pad_vocabulary(tokenizer, config.vocab_size, source)
    tensors, weights_name = _read_hf_weights(source)
    state = from_hf(_normalise_gpt2_names(tensors, config), config, str(source / weights_name))
    config = _without_zero_biases(config, state)
    model = Transformer(config)
    _check_shapes(state, model, source / weights_name)
    model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()})
    extra = {"imported_from": from_hub or str(source.resolve()), "hf_architecture": hf_architecture(config)}
    return save_model(out_dir, model, tokenizer, extra=extra, overwrite=overwrite)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"{path}: not found (not a Hugging Face checkpoint directory?)") from None
    except (OSError, ValueError) as exc:
        raise ScratchLMError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ScratchLMError(f"{path}: expected a JSON object")
    return values


def read_hf_tokenizer(source: Path) -> Tokenizer:
    """tokenizer.json when present (byte-level BPE only), else GPT-2's vocab.json + merges.txt;
    with the chat template when it is ours (see `_chat_template`)."""
    if (source / "tokenizer.json").is_file():
        tokenizer = from_tokenizer_json(source / "tokenizer.json")
        tokenizer.chat_template = _chat_template(source)
        return tokenizer
    if (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        vocab, merges = read_gpt2_files(source / "vocab.json", source / "merges.txt")
        return Tokenizer(vocab, merges, [ENDOFTEXT], pattern="gpt2")
    raise ScratchLMError(f"{source}: no tokenizer (tokenizer.json, or vocab.json with merges.txt)")


def _chat_template(source: Path) -> str | None:
    """The name of the checkpoint's chat template if it is the one export writes (a chat model
    of ours coming back), else None: the model is then talked to in the plain format, and SFT
    records ChatML when it adds (or finds) the chat tokens."""
    if (source / CHAT_TEMPLATE_JINJA).is_file():  # transformers 5 prefers it to tokenizer_config's
        try:
            return chat_template_name((source / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ScratchLMError(f"{source / CHAT_TEMPLATE_JINJA}: unreadable ({exc})") from None
    if (source / "tokenizer_config.json").is_file():
        return chat_template_name(_read_json(source / "tokenizer_config.json").get("chat_template"))
    return None


def _pad_vocabulary(tokenizer: Tokenizer, vocab_size: int, source: Path) -> Tokenizer:
    """Checkpoints often round the embedding up (to a multiple of 64...) past the tokenizer's
    last id. The extra rows are never produced by encoding; they get placeholder tokens so
    every id the model can emit still decodes."""
    if tokenizer.vocab_size == vocab_size:
        return tokenizer
    if tokenizer.vocab_size > vocab_size:
        raise ScratchLMError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                             f"vocab_size is {vocab_size}")
    vocab = dict(tokenizer.vocab)
    for i in range(tokenizer.vocab_size, vocab_size):
        vocab[i] = f"<|unused_{i}|>".encode()
    return Tokenizer(vocab, tokenizer.merges, list(tokenizer.special_tokens), pattern=tokenizer.pattern,
                     chat_template=tokenizer.chat_template)


def _read_hf_weights(source: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the checkpoint (safetensors preferred) and the file name to report."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        if (source / single_name).is_file():
            return _read_weight_file(source / single_name), single_name
        if (source / index_name).is_file():
            weight_map = _read_json(source / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ScratchLMError(f"{source / index_name}: no weight_map")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (source / shard).is_file():
                    raise ScratchLMError(f"{source / shard}: shard listed in {index_name} is missing")
                tensors.update(_read_weight_file(source / shard))
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise ScratchLMError(f"{source / index_name}: tensor {absent[0]} is not in its shard "
                                     f"{weight_map[absent[0]]}")
            return tensors, index_name
    raise ScratchLMError(f"{source}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} "
                         f"or {PYTORCH_BIN_INDEX})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # Pickle can run code; weights_only restricts it to tensors and plain containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ScratchLMError(f"{path}: unreadable weights ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    except Exception as exc:  # pickle.UnpicklingError and friends from a corrupt or hostile file
        raise ScratchLMError(f"{path}: unreadable weights ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ScratchLMError(f"{path}: expected a dict of tensors")
    return dict(state)


def _normalise_gpt2_names(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 checkpoints saved from GPT2Model (openai-community/gpt2 itself) lack the
    `transformer.` prefix and the head (tied to the embedding)."""
    if hf_architecture(config) != GPT2 or any(name.startswith("transformer.") for name in tensors):
        return tensors
    return {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in tensors.items()}


def _without_zero_biases(config: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """GPT-2's layout always has biases; ours exports all-zero ones for a model trained without
    (the same function). Dropping them again makes export -> import return the same config."""
    biases = [t for name, t in state.items() if name.endswith(".bias")]
    if config.bias and biases and all(not t.any() for t in biases):
        for name in [name for name in state if name.endswith(".bias")]:
            del state[name]
        return ModelConfig.from_dict({**config.to_dict(), "bias": False})
    return config


def _check_shapes(state: dict[str, torch.Tensor], model: Transformer, path: Path) -> None:
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ScratchLMError(f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, config.json "
                                 f"needs {tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise ScratchLMError(f"{path}: tensor for {name} has dtype {tensor.dtype}, not floating point")


# --------------------------------------------------------------------------- the Hub
def download_hf(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the files import needs from a Hub model repository into the Hugging Face cache
    (`cache_dir`, default HF_HOME's; HF_ENDPOINT names another server); returns the snapshot
    directory. Files already cached are not fetched again."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from scratchlm.data.hub import fail_if_unreachable

    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when first imported.
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if not constants.HF_HUB_OFFLINE:
        fail_if_unreachable(f"cannot download model {repo_id!r}", endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)

    def fetch(filename: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        endpoint=endpoint))
        except LocalEntryNotFoundError:
            raise ScratchLMError(f"{repo_id}/{filename} is not in the Hugging Face cache and the Hub is "
                                 f"not reachable (offline)") from None
        except EntryNotFoundError:
            if required:
                raise ScratchLMError(f"{repo_id}: the repository has no {filename}") from None
            return None
        except OSError as exc:  # HfHubHTTPError (no such repository, no access...) is an OSError
            raise ScratchLMError(f"download of {repo_id}/{filename} failed: {str(exc).splitlines()[0]}") from None

    snapshot = fetch("config.json").parent
    if fetch("tokenizer.json", required=False) is None:
        fetch("vocab.json")
        fetch("merges.txt")
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        if fetch(single_name, required=False) is not None:
            return snapshot
        index = fetch(index_name, required=False)
        if index is not None:
            for shard in sorted(set((_read_json(index).get("weight_map") or {}).values())):
                fetch(shard)
            return snapshot
    raise ScratchLMError(f"{repo_id}: the repository has no weights ({SAFETENSORS} or {PYTORCH_BIN}, "
                         f"single or sharded)")
