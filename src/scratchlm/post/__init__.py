"""Post-training: from a base model to an assistant.

    chat.py      the chat format (ChatML-style role tokens), rendering to ids and a loss mask
    formats.py   SFT and preference data files (Alpaca, OpenAI messages, ShareGPT, ...)
    data.py      rendered data as a data directory with a loss mask, for the training loop
    finetune.py  what SFT and DPO share: settings, training config, output layout
    supervised.py  supervised fine-tuning (`scratchlm sft`), full or LoRA
    preference.py  Direct Preference Optimization (`scratchlm dpo`)

Both methods run the training loop of scratchlm.train; LoRA itself lives in the model
stage (scratchlm.model.lora), because every command loads adapter directories.
Names are imported on first use, so `scratchlm --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FinetuneSettings": "scratchlm.post.finetune",
    "sft": "scratchlm.post.supervised",
    "dpo": "scratchlm.post.preference",
    "dpo_loss": "scratchlm.post.preference",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
