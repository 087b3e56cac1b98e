"""Inference: text generation over the model's KV-cached token sampling."""

from scratchlm.infer.generate import check_generation_args, generate, generate_text

__all__ = ["check_generation_args", "generate", "generate_text"]
