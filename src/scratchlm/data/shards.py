"""Token shards on disk, their manifest, and reading documents back.

A data directory holds, per split, `{split}_{NNNNNN}.bin` (raw little-endian token ids, uint16
when the vocabulary fits, else uint32, an EOT token after every document) and
`{split}_{NNNNNN}.idx.npy` (int64 start offset of each document in that shard), plus
`manifest.json` describing everything. Fine-tuning data (conversations, preference pairs) adds
`{split}_{NNNNNN}.mask.bin`: one byte per token, 1 where the token is a training target (an
assistant's reply), 0 where it is only context (the prompt); its manifest says `"loss_mask": true`. Raw arrays rather than a container format so the
loader can `np.memmap` them: no parsing, no copy, shared page cache across ranks.
A document never spans two shards.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_bytes, current_umask

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def index_name(bin_name: str) -> str:
    return bin_name.removesuffix(".bin") + ".idx.npy"


def mask_name(bin_name: str) -> str:
    return bin_name.removesuffix(".bin") + ".mask.bin"


class ShardWriter:
    """Writes documents into shards of about `shard_tokens` tokens, streaming to disk.

    Token ids go straight to a temporary file that is renamed into place when the shard is
    full (only the document offsets are held), so memory does not grow with the shard size
    and an interrupted run never leaves a truncated shard under a real name.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, eot_id: int, shard_tokens: int,
                 loss_mask: bool = False):
        self.out_dir, self.split, self.dtype, self.eot_id = Path(out_dir), split, dtype, eot_id
        self.shard_tokens, self.loss_mask = shard_tokens, loss_mask
        self.shards: list[dict] = []
        self._eot = np.array([eot_id], dtype=dtype).tobytes()
        self._file = self._mask_file = None
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one document's token ids (without EOT) and, for a writer with `loss_mask`,
        which of them are training targets (the EOT after the document never is)."""
        if (mask is not None) != self.loss_mask or (mask is not None and len(mask) != len(ids)):
            raise ValueError("a loss mask, one flag per token, is required exactly when the writer has loss_mask")
        if self._file is None:
            self._file = self._temporary()
            self._mask_file = self._temporary() if self.loss_mask else None
        self._starts.append(self._tokens)
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._file.write(self._eot)
        if self._mask_file is not None:
            self._mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes() + b"\0")
        self._tokens += len(ids) + 1
        if self._tokens >= self.shard_tokens:
            self._flush()

    def _temporary(self):
        return tempfile.NamedTemporaryFile(dir=self.out_dir, prefix=f".{self.split}.", suffix=".tmp", delete=False)

    def close(self) -> list[dict]:
        if self._file is not None:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = shard_name(self.split, len(self.shards))
        if self._mask_file is not None:
            _commit(self._mask_file, self.out_dir / mask_name(name))
        _commit(self._file, self.out_dir / name)
        buffer = io.BytesIO()
        np.save(buffer, np.array(self._starts, dtype=np.int64), allow_pickle=False)
        atomic_write_bytes(self.out_dir / index_name(name), buffer.getvalue())
        self.shards.append({"file": name, "tokens": self._tokens, "documents": len(self._starts)})
        self._file, self._mask_file, self._starts, self._tokens = None, None, [], 0


def _commit(file, path: Path) -> None:
    """Close a finished temporary file and give it its real name."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.chmod(file.name, 0o666 & ~current_umask())
    os.replace(file.name, path)


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a data directory, checked for the keys every consumer relies on."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"not a data directory (no {MANIFEST}): {data_dir}") from None
    except ValueError as exc:
        raise ScratchLMError(f"corrupt manifest {path}: {exc}") from exc
    for key in ("format_version", "vocab_size", "tokenizer_hash", "eot_id", "dtype", "splits"):
        if key not in manifest:
            raise ScratchLMError(f"manifest {path} lacks the field {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ScratchLMError(f"manifest {path} has format_version {manifest['format_version']}, expected {FORMAT_VERSION}")
    return manifest


def split_info(manifest: dict, split: str, data_dir: str | Path) -> dict:
    if split not in manifest["splits"]:
        raise ScratchLMError(f"data directory {data_dir} has no split {split!r} (has {', '.join(manifest['splits'])})")
    return manifest["splits"][split]


def open_shard(data_dir: Path, shard: dict, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens memmap, document starts) of one shard, checked against the manifest."""
    bin_path = data_dir / shard["file"]
    idx_path = data_dir / index_name(shard["file"])
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise ScratchLMError(f"missing shard file {path}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    if len(tokens) != shard["tokens"]:
        raise ScratchLMError(f"shard {bin_path} has {len(tokens)} tokens, manifest says {shard['tokens']}")
    starts = np.load(idx_path, allow_pickle=False)
    return tokens, starts


def open_loss_mask(data_dir: Path, shard: dict) -> np.ndarray:
    """The loss mask memmap of one shard (data with `"loss_mask": true` in its manifest)."""
    path = data_dir / mask_name(shard["file"])
    if not path.is_file():
        raise ScratchLMError(f"missing loss mask file {path}")
    mask = np.memmap(path, dtype=np.uint8, mode="r")
    if len(mask) != shard["tokens"]:
        raise ScratchLMError(f"loss mask {path} has {len(mask)} entries, the shard has {shard['tokens']} tokens")
    return mask


def iter_documents(data_dir: str | Path, split: str) -> Iterator[np.ndarray]:
    """Token ids of every document of `split`, in order, without the trailing EOT."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    for shard in split_info(manifest, split, data_dir)["shards"]:
        tokens, starts = open_shard(data_dir, shard, dtype)
        ends = np.append(starts[1:], len(tokens))
        for start, end in zip(starts, ends):
            yield np.array(tokens[start : end - 1])  # end - 1 drops the EOT separator
