"""Inference: text generation over the model's KV-cached token sampling."""

from scratchlm.infer.generate import generate, generate_text

__all__ = ["generate", "generate_text"]
