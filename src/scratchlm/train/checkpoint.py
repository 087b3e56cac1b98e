"""Checkpoints that resume exactly: weights, optimizer, schedule position, RNGs, data position.

Layout of one checkpoint, `checkpoints/step_NNNNNNN/`:
- a model directory (config.json, model.safetensors, tokenizer files): usable on its own;
- `trainer_state.pt`: step, tokens, elapsed time, optimizer (DDP/single process), grad
  scaler, and per rank the RNG states and data-loader position. Only tensors and plain
  containers, so it loads with `torch.load(weights_only=True)` (no code is unpickled);
- `sharded/` (FSDP only): model and optimizer shards written by torch.distributed.checkpoint;
- `meta.json`: step and validation loss, read when pruning.

Every process writes into one temporary directory that rank 0 renames into place at the end,
so a crash mid-write never leaves a directory that looks complete. (Multi-node FSDP therefore
needs the run directory on a shared filesystem.)
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json
from scratchlm.train.distributed import DistContext, barrier, broadcast_object, gather_objects

TRAINER_STATE = "trainer_state.pt"
SHARDED_DIR = "sharded"
META = "meta.json"
_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def is_checkpoint_name(name: str) -> bool:
    """A checkpoint directory's name, or a checkpoint's temporary one (left by a killed save)."""
    return name.startswith(_PREFIX) or (name.startswith(f".{_PREFIX}") and name.endswith(".tmp"))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.')."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# --------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain containers."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                  np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save
def save_checkpoint(root: Path, step: int, *, model: nn.Module, tokenizer, optimizer,
                    trainer_state: dict[str, Any], rank_state: dict[str, Any],
                    val_loss: float | None, keep: int, sharded: bool, ctx: DistContext,
                    adapters: tuple[str, Any] | None = None) -> Path:
    """Write checkpoint `step` collectively (every rank calls this), then prune old ones.

    trainer_state: rank-independent values (step, tokens, elapsed, ...), from rank 0.
    rank_state: this rank's RNG and loader state; all ranks' are gathered into the file.
    adapters: (base model directory, LoraConfig) of a LoRA run: the checkpoint is then an
    adapter directory (the frozen base is not copied into every checkpoint).
    """
    rank_states = gather_objects(rank_state, ctx)
    final = root / checkpoint_name(step)
    with _shared_tmp_dir(final, ctx) as tmp:
        full_weights = gather_full_weights(model, ctx) if sharded else None
        if ctx.is_main:
            from scratchlm.model.directory import save_adapter, save_model

            # First: save_model/save_adapter replace the whole directory they are given.
            if adapters is not None:
                save_adapter(tmp, model, tokenizer, *adapters, extra={"step": step})
            else:
                save_model(tmp, model, tokenizer, extra={"step": step}, state_dict=full_weights)
        barrier(ctx)
        if sharded:
            _save_sharded(tmp / SHARDED_DIR, model, optimizer)
        if ctx.is_main:
            state = dict(trainer_state, rank_states=rank_states, world_size=ctx.world_size,
                         optimizer=None if sharded else optimizer.state_dict())
            torch.save(state, tmp / TRAINER_STATE)
            atomic_write_json(tmp / META, {"step": step, "val_loss": val_loss})
    if ctx.is_main:
        prune_checkpoints(root, keep)
    barrier(ctx)
    return final


@contextlib.contextmanager
def _shared_tmp_dir(final: Path, ctx: DistContext):
    """atomic_directory on rank 0, its temporary path shared with the other ranks."""
    if ctx.is_main:
        with atomic_directory(final) as tmp:
            broadcast_object(str(tmp), ctx)
            yield tmp
            barrier(ctx)  # everyone has finished writing before rank 0 renames
    else:
        tmp = Path(broadcast_object(None, ctx))
        yield tmp
        barrier(ctx)


def _save_sharded(path: Path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def gather_full_weights(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """FSDP shards gathered into full CPU tensors on rank 0 (None elsewhere), so the
    checkpoint's model directory is an ordinary, unsharded one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    return full if ctx.is_main else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints plus the one with the best validation loss; remove
    what killed saves left behind (the hidden temporary directories of checkpoints)."""
    for stale in root.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    found = list_checkpoints(root)
    keep_set = set(found[-keep:])
    best = best_checkpoint(root)
    if best is not None:
        keep_set.add(best)
    for path in found:
        if path not in keep_set:
            shutil.rmtree(path, ignore_errors=True)


def best_checkpoint(root: Path) -> Path | None:
    scored = []
    for path in list_checkpoints(root):
        meta = _read_meta(path)
        if meta.get("val_loss") is not None:
            scored.append((meta["val_loss"], path))
    return min(scored, key=lambda s: s[0])[1] if scored else None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- load
def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise ScratchLMError(f"cannot read checkpoint {path / TRAINER_STATE}: {exc}") from None


def load_checkpoint_weights(path: Path, model: nn.Module, optimizer, state: dict[str, Any],
                            sharded: bool) -> None:
    """Restore model and optimizer from checkpoint `path` into the (wrapped) model."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": optim_sd}
        dcp.load(target, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(model, optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optim"])
        return
    from scratchlm.model.directory import is_adapter_directory, load_model

    if is_adapter_directory(path):
        from scratchlm.model.directory import adapter_base, read_adapter_weights
        from scratchlm.model.lora import load_lora_state_dict

        adapter_base(path)  # the frozen base must still be the one these adapters were trained on
        load_lora_state_dict(model, read_adapter_weights(path))
    else:
        saved, _ = load_model(path, device="cpu")
        model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])


def diff_model_configs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved -> current' for every field that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
