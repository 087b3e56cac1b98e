"""One process or many: torchrun detection, device choice, `parallelize`, small collectives.

Scale-out is PyTorch's own: torchrun starts one process per device and sets RANK,
LOCAL_RANK and WORLD_SIZE (plus the rendezvous address for multi-node); we call
init_process_group and wrap the model. Without those variables everything here degrades
to a single process and every collective is the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.errors import ScratchLMError


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only this process logs, shows progress bars and writes run files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ScratchLMError("device cuda requested but no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ScratchLMError("device mps requested but not available (use auto or cpu)")
    return torch.device(name)


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    allow_tf32(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # NCCL moves GPU tensors over NVLink/InfiniBand; gloo is the CPU fallback (and what
        # the tests use).
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, local_rank, world_size, device)


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation): the fp32 work left outside bf16 autocast, such as the
    logits' loss and Muon's fp32 products, runs several times faster. Process-wide, as torch's
    flags are; CPUs have no TF32 and are left as they are."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, ctx: DistContext, *, activation_checkpointing: bool = False,
                compile: bool = False, distributed: str = "ddp",
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Prepare a freshly built model for training, in one place and in torchtitan's order:

    1. activation checkpointing: each block recomputes its activations in the backward pass
       instead of storing them (about a third more compute for memory that no longer grows
       with depth), through torch's own `checkpoint_wrapper`;
    2. compilation, per block: the wrapped block is compiled, so recomputation happens in
       compiled code, and every block shares one compiled graph (same shapes), which keeps
       compile time flat in depth and composes with FSDP2's per-block hooks;
    3. data parallelism: FSDP2 shards each block as its own unit (only one block's full
       weights exist at a time), then the root for the embeddings and head; or DDP
       replicates the whole model and all-reduces gradients.

    Blocks are replaced in `model.blocks` (state-dict names do not change: the wrapper strips
    its prefix and `Module.compile` keeps the module). Returns the module the training step
    calls: `model` itself, or its DDP wrapper. The optimizer, checkpoints and generation use
    `model` (FSDP2 shards its parameters in place). Under FSDP2 `model` may be on the meta
    device (see `materialize`); `param_dtype` is FSDP2's compute dtype (see `fully_shard_model`).
    """
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    if compile:
        for block in model.blocks:
            block.compile()
    if not ctx.enabled:
        return model
    if distributed == "fsdp":
        return fully_shard_model(model, ctx, param_dtype)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def fully_shard_model(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over all processes of the (initialised) group: each block is its own unit, then
    the root for the embeddings and head.

    param_dtype=bf16 (a bf16 run): FSDP2's MixedPrecisionPolicy all-gathers and computes in
    bf16 (half the all-gather bytes, no per-op autocast casts of the weights) while the
    sharded fp32 parameters stay the optimizer's master copy, and gradients are reduced in
    fp32 (`reduce_dtype`), so averaging over processes loses no precision."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Give a model built on the meta device real weights from its own `init_weights()`,
    drawn from `seed`; unsharded models are filled on the CPU and moved to `device`.

    FSDP2-sharded parameters get memory for their shard only (`to_empty`); init_weights then
    draws each sharded tensor whole on the CPU, one at a time, and keeps this process's shard
    (model.transformer.fill_), so no process holds the full model, and the weights equal,
    bit for bit, those of an unsharded model from the same seed."""
    from scratchlm.model.transformer import is_dtensor

    sharded = any(is_dtensor(p) for p in model.parameters())
    model.to_empty(device=device if sharded else torch.device("cpu"))
    torch.manual_seed(seed)
    model.init_weights()
    model.to(device)


def all_reduce_mean_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise mean over processes, in place on `t`'s device; with NCCL the host does not
    wait for it (unlike all_reduce_sum, which returns host floats)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world_size
    return t


def eager(compiled: bool) -> contextlib.AbstractContextManager:
    """Run compiled blocks as plain Python (generation mid-training: a KV cache changes shapes
    every token, which would recompile the blocks over and over)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if not compiled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs):
    the reduced gradient is the same, with one communication per optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_max(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise max over processes: used so every rank takes the same decisions
    (stop, checkpoint now, budget progress) from clocks and signals that differ per rank."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def check_same_on_all_ranks(value: str, what: str, ctx: DistContext) -> None:
    """Refuse to start when processes disagree (e.g. different config files per node)."""
    values = gather_objects(value, ctx)
    if any(v != values[0] for v in values):
        bad = [r for r, v in enumerate(values) if v != values[0]]
        raise ScratchLMError(f"{what} differs between processes: rank 0 vs rank(s) "
                             f"{', '.join(map(str, bad))}")


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
