"""Interop: a model directory out to Hugging Face transformers and GGUF (llama.cpp, Ollama),
and Hugging Face checkpoints (local or from the Hub) in.

    from scratchlm.export import export_hf, export_gguf, import_hf
    export_hf("runs/tiny/model", "tiny-hf")              # AutoModelForCausalLM.from_pretrained("tiny-hf")
    export_gguf("runs/tiny/model", "tiny.gguf", "q8_0")  # llama-cli -m tiny.gguf
    import_hf(None, "gpt2", from_hub="openai-community/gpt2")

Functions are imported on first use, so `scratchlm --help` (which lists the dtypes) does not
load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

HF_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")

_LAZY = {
    "download_hf": "scratchlm.export.hf",
    "export_hf": "scratchlm.export.hf",
    "import_hf": "scratchlm.export.hf",
    "export_gguf": "scratchlm.export.gguf",
}

__all__ = sorted(["GGUF_DTYPES", "HF_DTYPES", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
