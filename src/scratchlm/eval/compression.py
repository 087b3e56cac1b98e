"""Compression baselines: how many bits per byte do gzip -9 and xz -9 need for the same text?

A language model is a compressor (arithmetic coding turns its log-loss into a file size), so
its bits per byte can be set beside general-purpose compressors on the same bytes. Each
document is compressed on its own, exactly as the model sees it: no shared dictionary
across documents. Python's `gzip` (level 9, with its header) and `lzma` (xz container,
preset 9) produce the same streams as the `gzip -9` and `xz -9` command-line tools.
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass
from typing import Callable, Iterable

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9),
}


@dataclass(frozen=True)
class CompressionResult:
    name: str
    raw_bytes: int
    compressed_bytes: int

    @property
    def bits_per_byte(self) -> float:
        return 8.0 * self.compressed_bytes / self.raw_bytes


def compression_bits_per_byte(documents: Iterable[bytes], name: str) -> CompressionResult:
    """Compress every document separately with `name` ("gzip" or "xz") and total the sizes."""
    compress = COMPRESSORS[name]
    raw = packed = 0
    for doc in documents:
        if not doc:
            continue
        raw += len(doc)
        packed += len(compress(doc))
    if raw == 0:
        raise ValueError("no bytes to compress: every document was empty")
    return CompressionResult(name, raw, packed)
