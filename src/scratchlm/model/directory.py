"""Model directories: everything needed to use a trained model, and nothing executable.

    config.json        ModelConfig fields, format_version, optional "extra" (run metadata)
    model.safetensors  the weights (tied weights stored once, under the embedding's name)
    tokenizer files    written by Tokenizer.save (scratchlm.tokenizer.TOKENIZER_FILES)

Loading reads JSON and safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json, current_umask
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_files() -> tuple[str, ...]:
    """The files a model directory consists of (what replacing one removes)."""
    from scratchlm.tokenizer import TOKENIZER_FILES

    return (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)
_TIED_HEAD = "lm_head.weight"


def save_model(directory: str | os.PathLike, model: Transformer, tokenizer: Tokenizer,
               extra: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Write a model directory atomically (see fsutil.atomic_directory: an existing non-empty
    directory needs `overwrite`, and only the model's own files in it are replaced).

    `state_dict` overrides `model.state_dict()`: a distributed trainer passes the full,
    gathered state dict here (the model is then only used for its config).
    """
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise ScratchLMError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}")
    tensors = _weights_to_save(state_dict if state_dict is not None else model.state_dict(), config)
    with atomic_directory(directory, overwrite, "model", commit_last=(CONFIG_FILE,)) as tmp:
        meta = {"format_version": FORMAT_VERSION, **config.to_dict(), "extra": extra or {}}
        atomic_write_json(tmp / CONFIG_FILE, meta)
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        except (SafetensorError, OSError) as exc:  # e.g. disk full: safetensors writes in Rust
            raise ScratchLMError(f"cannot write {Path(directory) / WEIGHTS_FILE}: {exc}") from None
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~current_umask())  # safetensors creates it 0600
        tokenizer.save(tmp)
    return Path(directory)


def _weights_to_save(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing memory: a tied head is stored once, as the embedding.
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items()
            if not (config.tie_embeddings and name == _TIED_HEAD)}


def load_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the "extra" metadata of a model directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ScratchLMError(f"{path}: not found (not a model directory?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScratchLMError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ScratchLMError(f"{path}: expected a JSON object")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ScratchLMError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    extra = meta.pop("extra", {})
    return ModelConfig.from_dict(meta, source=str(path)), extra


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
               ) -> tuple[Transformer, Tokenizer]:
    """Load (model in eval mode, tokenizer) from a model directory, checking they match."""
    from scratchlm.tokenizer import Tokenizer

    directory = Path(directory)
    config, _ = load_config(directory)
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size != config.vocab_size:
        raise ScratchLMError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but "
                             f"{CONFIG_FILE} says vocab_size {config.vocab_size}")
    model = Transformer(config)
    model.load_state_dict(_read_weights(directory / WEIGHTS_FILE, model))
    return model.to(device).eval(), tokenizer


def _read_weights(path: Path, model: Transformer) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ScratchLMError(f"{path}: not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ScratchLMError(f"{path}: unreadable safetensors file ({exc})") from None
    if model.config.tie_embeddings:
        tensors[_TIED_HEAD] = tensors.get("tok_emb.weight")
    expected = model.state_dict()
    missing = sorted(name for name in expected if tensors.get(name) is None)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ScratchLMError(f"{path}: weights do not match the config "
                             f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ScratchLMError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"config needs {tuple(expected[name].shape)}")
    return tensors
