"""The training stage: config, optimizers, schedules, the loop, checkpoints, DDP/FSDP2, metrics.

`train` is imported lazily so that `scratchlm.train.config` (used by the CLI to build its
`--section.key` options) can be read without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scratchlm.train.config import TrainConfig, load_train_config

if TYPE_CHECKING:
    from scratchlm.train.loop import train

__all__ = ["TrainConfig", "load_train_config", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from scratchlm.train.loop import train

        return train
    raise AttributeError(f"module 'scratchlm.train' has no attribute {name!r}")
