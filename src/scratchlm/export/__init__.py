"""Interop: a model directory out to Hugging Face transformers and GGUF (llama.cpp, Ollama),
and Hugging Face checkpoints (local or from the Hub) in.

    from scratchlm.export import export_hf, export_gguf, import_hf
    export_hf("runs/tiny/model", "tiny-hf")              # AutoModelForCausalLM.from_pretrained("tiny-hf")
    export_gguf("runs/tiny/model", "tiny.gguf", "q8_0")  # llama-cli -m tiny.gguf
    import_hf(None, "gpt2", from_hub="openai-community/gpt2")
"""

from scratchlm.export.gguf import GGUF_DTYPES, export_gguf
from scratchlm.export.hf import HF_DTYPES, download_hf, export_hf, import_hf

__all__ = ["GGUF_DTYPES", "HF_DTYPES", "download_hf", "export_gguf", "export_hf", "import_hf"]
