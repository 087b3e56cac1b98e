"""Evaluation: bits per byte on held-out text, beside gzip and xz on the same bytes."""

from scratchlm.eval.bpb import BitsPerByte, evaluate_bits_per_byte
from scratchlm.eval.compression import CompressionResult, compression_bits_per_byte

__all__ = ["BitsPerByte", "CompressionResult", "compression_bits_per_byte", "evaluate_bits_per_byte"]
