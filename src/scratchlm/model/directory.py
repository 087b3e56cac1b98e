"""Model directories: everything needed to use a trained model, and nothing executable.

    config.json        ModelConfig fields, format_version, optional "extra" (run metadata)
    model.safetensors  the weights (tied weights stored once, under the embedding's name)
    tokenizer files    written by Tokenizer.save (scratchlm.tokenizer.TOKENIZER_FILES)
    eval.json          benchmark results of these weights (`scratchlm eval`), when evaluated

Adapter directories (LoRA, scratchlm.model.lora) hold the adapters of a base model directory
instead of weights of their own:

    adapter_config.json  format_version; base, base_relative, base_hash; the LoRA config fields
                         (rank, alpha, dropout, targets); optional "extra"
    adapter.safetensors  the adapter tensors only (blocks.{i}.attn.qkv.lora.q.A, ...)
    tokenizer files      the tokenizer trained with (the base's), so the directory describes itself
    eval.json            as above

The base is recorded twice: `base` as an absolute path and `base_relative` as a path relative
to the adapter directory, so the pair survives either moving the adapter alone or moving a
tree that holds both. Loading tries the relative path first, then the absolute one, and uses
the first whose weights file still has `base_hash` (the sha256 of the base's
model.safetensors), so adapters are never silently applied to weights they were not trained
on. A base may itself be an adapter directory (e.g. DPO adapters trained on an SFT adapter's
merged model); its hash is then that of its adapter.safetensors, and it is checked in turn.

`load_model` and `load_config` accept either kind: an adapter directory loads as its base
with the adapters merged in, a plain Transformer, so every command works on it unchanged.

Loading reads JSON and safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import (
    atomic_directory,
    atomic_write_json,
    check_output_directory,
    current_umask,
    describe_os_error,
)
from scratchlm.model.config import ModelConfig
from scratchlm.model.lora import (
    LoraConfig,
    apply_lora,
    check_lora_model,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from scratchlm.model.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"


def model_files() -> tuple[str, ...]:
    """The files a model or adapter directory consists of (what replacing one removes)."""
    from scratchlm.tokenizer import TOKENIZER_FILES

    return (CONFIG_FILE, WEIGHTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, EVAL_FILE, *TOKENIZER_FILES)


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
    # New weights make earlier benchmark results (eval.json) stale: they are removed, and so
    # are the files of an adapter directory this one replaces (one directory, one kind).
    with atomic_directory(directory, overwrite, "model", commit_last=(CONFIG_FILE,),
                          replaces=(EVAL_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)) as tmp:
        meta = {"format_version": FORMAT_VERSION, **config.to_dict(), "extra": extra or {}}
        atomic_write_json(tmp / CONFIG_FILE, meta)
        _write_safetensors(tmp / WEIGHTS_FILE, tensors, Path(directory) / WEIGHTS_FILE)
        tokenizer.save(tmp)
    return Path(directory)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], shown: Path) -> None:
    """Write `tensors` to `path`, naming `shown` (the final path) in errors."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except (SafetensorError, OSError) as exc:  # e.g. disk full: safetensors writes in Rust
        raise ScratchLMError(f"cannot write {shown}: {exc}") from None
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates it 0600


def _weights_to_save(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing memory: a tied head is stored once, as the embedding.
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items()
            if not (config.tie_embeddings and name == _TIED_HEAD)}


def load_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the "extra" metadata of a model directory; of an adapter directory,
    its base's ModelConfig and its own "extra". (The base's hash is not checked here, only by
    load_model: reading a config stays cheap.)"""
    return _load_config(Path(directory), chain=())


def _load_config(directory: Path, chain: tuple[Path, ...]) -> tuple[ModelConfig, dict[str, Any]]:
    if is_adapter_directory(directory):
        adapter = _read_adapter_config(directory)
        base = _find_base(directory, adapter, chain, check_hash=False)
        return _load_config(base, chain + (directory.resolve(),))[0], adapter.extra
    path = directory / CONFIG_FILE
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
    """Load (model in eval mode, tokenizer) from a model directory, checking they match; from
    an adapter directory, the base model with the adapters merged in (a plain Transformer)."""
    from scratchlm.tokenizer import Tokenizer

    directory = Path(directory)
    config, _ = load_config(directory)
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size != config.vocab_size:
        where = "its base model" if is_adapter_directory(directory) else CONFIG_FILE
        raise ScratchLMError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but "
                             f"{where} says vocab_size {config.vocab_size}")
    return _load_weights(directory, chain=()).to(device).eval(), tokenizer


def _load_weights(directory: Path, chain: tuple[Path, ...]) -> Transformer:
    """The Transformer a model directory holds; for an adapter directory, its (verified) base
    with the adapters merged in. `chain`: the adapter directories being loaded on top."""
    if not is_adapter_directory(directory):
        config, _ = load_config(directory)
        model = Transformer(config)
        model.load_state_dict(_read_weights(directory / WEIGHTS_FILE, model))
        return model
    adapter = _read_adapter_config(directory)
    base = _find_base(directory, adapter, chain, check_hash=True)
    model = apply_lora(_load_weights(base, chain + (directory.resolve(),)), adapter.lora)
    load_lora_state_dict(model, read_adapter_weights(directory), source=str(directory / ADAPTER_WEIGHTS_FILE))
    return merge_lora(model)


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


# --------------------------------------------------------------------------- adapters
def is_adapter_directory(path: str | os.PathLike) -> bool:
    """Whether `path` holds LoRA adapters (adapter_config.json) rather than a model's weights."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def save_adapter(directory: str | os.PathLike, model: Transformer, tokenizer: Tokenizer,
                 base_dir: str | os.PathLike, lora_config: LoraConfig,
                 extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the adapters of a LoRA model (apply_lora(base model, lora_config), trained) as an
    adapter directory of `base_dir`, atomically as save_model does. The base is checked to be
    the model the adapters were applied to (same config) and hashed now: later changes to its
    weights make the adapter directory refuse to load."""
    directory, base_dir = Path(directory), Path(base_dir).resolve()
    if base_dir == directory.resolve():
        raise ScratchLMError(f"{directory}: an adapter directory cannot replace its own base model")
    base_config, _ = load_config(base_dir)
    if base_config != model.config:
        ours = model.config.to_dict()
        changed = [f"{k} {v!r} -> {ours[k]!r}" for k, v in base_config.to_dict().items() if ours[k] != v]
        raise ScratchLMError(f"{base_dir}: this base model's config differs from the model's ({'; '.join(changed)})")
    if tokenizer.vocab_size != base_config.vocab_size:
        raise ScratchLMError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {base_config.vocab_size}")
    check_lora_model(model, lora_config)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in lora_state_dict(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "base": str(base_dir),
        "base_relative": os.path.relpath(base_dir, directory.resolve()),
        "base_hash": _sha256(_weights_path(base_dir)),
        **lora_config.to_dict(),
        "extra": extra or {},
    }
    # A model directory this one replaces loses its weights and config (one directory, one kind).
    with atomic_directory(directory, overwrite, "adapter", commit_last=(ADAPTER_CONFIG_FILE,),
                          replaces=(EVAL_FILE, CONFIG_FILE, WEIGHTS_FILE)) as tmp:
        _write_safetensors(tmp / ADAPTER_WEIGHTS_FILE, tensors, directory / ADAPTER_WEIGHTS_FILE)
        tokenizer.save(tmp)
        atomic_write_json(tmp / ADAPTER_CONFIG_FILE, meta)
    return directory


def adapter_base(directory: str | os.PathLike) -> Path:
    """The base directory of an adapter directory, checked to still hold the weights the
    adapters were trained on (e.g. before resuming a LoRA run from an adapter checkpoint)."""
    directory = Path(directory)
    return _find_base(directory, _read_adapter_config(directory), chain=(), check_hash=True)


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory's adapter.safetensors, on the CPU (unchecked: see
    scratchlm.model.lora.load_lora_state_dict)."""
    path = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise ScratchLMError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ScratchLMError(f"{path}: unreadable safetensors file ({exc})") from None


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter directory's base with its adapters folded in as a plain model
    directory (`scratchlm lora merge`). Its "extra" keeps the adapter's, plus where it came from."""
    adapter_dir = Path(adapter_dir)
    if not is_adapter_directory(adapter_dir):
        raise ScratchLMError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: not found (not an adapter directory?)")
    check_output_directory(out_dir, overwrite, "model")  # before the work of loading
    adapter = _read_adapter_config(adapter_dir)
    model, tokenizer = load_model(adapter_dir)
    origin = {"adapter": str(adapter_dir.resolve()), "base": adapter.base, "base_hash": adapter.base_hash,
              **adapter.lora.to_dict()}
    return save_model(out_dir, model, tokenizer, extra={**adapter.extra, "merged_adapter": origin},
                      overwrite=overwrite)


@dataclass(frozen=True)
class _AdapterConfig:
    base: str
    base_relative: str
    base_hash: str
    lora: LoraConfig
    extra: dict[str, Any]


def _read_adapter_config(directory: Path) -> _AdapterConfig:
    path = directory / ADAPTER_CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScratchLMError(f"{path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise ScratchLMError(f"cannot read {describe_os_error(exc, path)}") from None
    if not isinstance(meta, dict):
        raise ScratchLMError(f"{path}: expected a JSON object")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ScratchLMError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    fields = {}
    for name in ("base", "base_relative", "base_hash"):
        value = meta.pop(name, None)
        if not isinstance(value, str) or not value:
            raise ScratchLMError(f"{path}: field {name} must be a non-empty string, got {value!r}")
        fields[name] = value
    extra = meta.pop("extra", {})
    if not isinstance(extra, dict):
        raise ScratchLMError(f"{path}: field extra must be a JSON object, got {extra!r}")
    return _AdapterConfig(**fields, lora=LoraConfig.from_dict(meta, source=str(path)), extra=extra)


def _find_base(directory: Path, adapter: _AdapterConfig, chain: tuple[Path, ...], check_hash: bool) -> Path:
    """The base of an adapter directory: the first of its relative and absolute paths that
    holds weights (with check_hash: weights with the recorded hash)."""
    candidates = list(dict.fromkeys(
        path.resolve() for path in (directory.resolve() / adapter.base_relative, Path(adapter.base))))
    found = [path for path in candidates if _weights_path(path).is_file()]
    if not found:
        raise ScratchLMError(f"adapter {directory}: its base model {adapter.base} was not found "
                             f"(nor {adapter.base_relative} relative to the adapter directory)")
    if directory.resolve() in found or any(path in chain for path in found):
        raise ScratchLMError(f"adapter {directory}: its base {found[0]} is built on this adapter directory (a loop)")
    if not check_hash:
        return found[0]
    digests = []
    for path in found:
        digests.append(_sha256(_weights_path(path)))
        if digests[-1] == adapter.base_hash:
            return path
    raise ScratchLMError(f"adapter {directory}: its base {found[0]} changed since training (hash of its "
                         f"{_weights_path(found[0]).name} is now {digests[0][:16]}..., the adapters were "
                         f"trained on {adapter.base_hash[:16]}...)")


def _weights_path(directory: Path) -> Path:
    """The file whose hash pins a base: its adapters if it is an adapter directory itself."""
    return directory / (ADAPTER_WEIGHTS_FILE if is_adapter_directory(directory) else WEIGHTS_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            # In chunks: a base model's weights can be larger than the memory left.
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ScratchLMError(f"cannot read {describe_os_error(exc, path)}") from None
    return digest.hexdigest()
