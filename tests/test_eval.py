"""Bits per byte and the compression baselines, checked against hand computation and the CLIs."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from scratchlm.eval import compression_bits_per_byte, evaluate_bits_per_byte
from tests.conftest import shared_file


class _ByteTokenizer:
    """256 byte tokens plus an end-of-text id: every token is one byte."""

    eot_id = 256

    def token_byte_lengths(self):
        return np.array([1] * 256 + [0])


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution ignores the input: softmax(bias)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = torch.nn.Parameter(bias)

    def forward(self, idx):
        return self.bias.expand(idx.shape[0], idx.shape[1], -1)


def test_uniform_model_scores_log2_vocab_bits_per_byte():
    vocab = 257
    docs = [np.frombuffer(b"hello world", dtype=np.uint8), np.frombuffer(b"x" * 700, dtype=np.uint8)]
    result = evaluate_bits_per_byte(_FixedLogits(torch.zeros(vocab)), _ByteTokenizer(), docs,
                                    context_length=64, batch_size=3)
    assert result.bytes == 711 and result.tokens == 711 and result.documents == 2
    assert result.bits_per_byte == pytest.approx(math.log2(vocab), rel=1e-6)


def test_peaked_model_matches_hand_computed_cross_entropy():
    bias = torch.zeros(257)
    bias[ord("a")] = 5.0
    docs = [np.frombuffer(b"aaab", dtype=np.uint8)]
    result = evaluate_bits_per_byte(_FixedLogits(bias), _ByteTokenizer(), docs, context_length=2)
    log_z = math.log(math.exp(5.0) + 256)
    nats = 3 * (log_z - 5.0) + log_z
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / 4, rel=1e-6)


def test_every_token_is_scored_once_across_window_boundaries():
    # A document of 10 tokens with context 3: windows of 3+3+3+1 predictions.
    docs = [np.arange(10, dtype=np.int64)]
    result = evaluate_bits_per_byte(_FixedLogits(torch.zeros(257)), _ByteTokenizer(), docs,
                                    context_length=3)
    assert result.tokens == 10 and result.bytes == 10


def test_empty_documents_are_an_error():
    with pytest.raises(ValueError, match="no held-out bytes"):
        evaluate_bits_per_byte(_FixedLogits(torch.zeros(257)), _ByteTokenizer(),
                               [np.array([], dtype=np.int64)], context_length=8)


@pytest.mark.parametrize("name, tool", [("gzip", ["gzip", "-9", "-n", "-c"]), ("xz", ["xz", "-9", "-c"])])
def test_compression_matches_the_command_line_tool(name, tool):
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    text = shared_file("corpora/tinyshakespeare.txt").read_bytes()
    docs = [text[i:i + 20_000] for i in range(0, 100_000, 20_000)]
    result = compression_bits_per_byte(docs, name)
    cli_bytes = sum(len(subprocess.run(tool, input=d, capture_output=True, check=True).stdout) for d in docs)
    assert result.raw_bytes == 100_000
    # xz uses the same liblzma as Python: identical streams. GNU gzip has its own deflate: within 1%.
    assert result.compressed_bytes == pytest.approx(cli_bytes, rel=0 if name == "xz" else 0.01)
    assert 1.0 < result.bits_per_byte < 5.0
