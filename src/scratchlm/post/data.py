"""Fine-tuning data as an ordinary data directory: token shards plus a loss mask.

Rendered conversations (SFT) and preference pairs (DPO) are written in the layout
`scratchlm data prepare` writes (scratchlm.data.shards), so the training loop's loader,
packing, document masking, resume and distributed sharding all apply unchanged. Each
document is one rendered sequence, and its `.mask.bin` marks the tokens the loss is taken
on: the assistant's reply, never the prompt. The EOT that follows every document in a
shard is the next document's beginning-of-sequence token, so a rendered sequence is
stored without its leading `<|endoftext|>`.

A sequence longer than the model's context is cut to fit and counted: split across rows, its
second half would be trained on without the prompt it answers. The reply the cut runs through
is not trained on (only whole replies teach where a turn ends); an item left with no reply to
train on is dropped and counted (`no_target_left`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from scratchlm.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, shard_dtype
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_json

SHARD_TOKENS = 1 << 24


def fit_to_context(ids: Sequence[int], mask: Sequence[bool], context_length: int, eot_id: int,
                   end_of_turn: int | None = None) -> tuple[list[int], list[bool], bool]:
    """(ids, mask, whether it was cut) of a rendered sequence that starts with <|endoftext|>,
    without that token and cut so the sequence and the EOT after it fill at most one row.

    A cut reply is not trained on: after the last trained `end_of_turn` token that survives
    the cut, the mask is cleared. Learning the first half of a reply with no end in sight
    would teach the model to keep going instead of ending its turn."""
    if not ids or ids[0] != eot_id:
        raise ValueError("a rendered sequence starts with <|endoftext|>")
    ids, mask = list(ids[1:]), list(mask[1:])
    cut = len(ids) > context_length - 1
    ids, mask = ids[:context_length - 1], mask[:context_length - 1]
    if cut and end_of_turn is not None:
        ends = [i for i, (token, trained) in enumerate(zip(ids, mask)) if trained and token == end_of_turn]
        keep = ends[-1] + 1 if ends else 0
        mask = mask[:keep] + [False] * (len(mask) - keep)
    return ids, mask, cut


def write_masked_data(out_dir: str | Path, tokenizer, splits: dict[str, Iterable[tuple[list[int], list[bool]]]],
                      extra: dict[str, Any]) -> dict[str, Any]:
    """Write {split: [(ids, mask), ...]} (ids without the leading EOT) as a data directory with
    a loss mask; `extra` goes into the manifest. Returns the manifest."""
    eot_id = tokenizer.eot_id
    if eot_id is None:
        raise ScratchLMError("the tokenizer has no <|endoftext|> token to separate sequences")
    dtype = shard_dtype(tokenizer.vocab_size)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tokenizer.fingerprint(), "eot_id": eot_id, "dtype": dtype.name,
        "loss_mask": True, "splits": {}, **extra,
    }
    with atomic_directory(out_dir, overwrite=True, what="fine-tuning data", commit_last=(MANIFEST,)) as tmp:
        for split, sequences in splits.items():
            writer = ShardWriter(tmp, split, dtype, eot_id, SHARD_TOKENS, loss_mask=True)
            documents = targets = 0
            for ids, mask in sequences:
                writer.add(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))
                documents += 1
                targets += int(sum(mask))
            if not documents:
                raise ScratchLMError(f"no {split} sequences to write")
            shards = writer.close()
            manifest["splits"][split] = {"shards": shards, "documents": documents,
                                         "tokens": sum(s["tokens"] for s in shards), "target_tokens": targets}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def files_fingerprint(paths: Iterable[str | Path], settings: dict[str, Any]) -> str:
    """sha256 of the input files' bytes and the settings that shape the data: a resumed run
    must train on exactly the data it started with."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        digest.update(str(Path(path).name).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare_masked_data(data_dir: Path, tokenizer, context_length: int, splits: dict[str, list[list]], kind: str,
                        fingerprint: str, resume: bool, stats: dict[str, Any]) -> dict[str, Any]:
    """Render {split: items} into `data_dir` and return the data's stats; an item is a list of
    conversations stored as consecutive documents (SFT: one; DPO: chosen, then rejected).

    Data written before from the same inputs (`fingerprint`) is reused as it is, so a resumed
    run trains on exactly what it started with; other data there is only replaced by a fresh
    run. An item any of whose sequences loses its whole reply to the context cut is left out
    (`no_target_left`); `truncated` counts the sequences cut."""
    from scratchlm.post.chat import render_conversation, stop_ids

    try:
        manifest = json.loads((Path(data_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if manifest is not None and manifest.get("source_fingerprint") == fingerprint:
        return manifest["stats"]
    if manifest is not None and resume:
        raise ScratchLMError(f"cannot resume: the data files or settings changed since the run in {data_dir.parent} "
                             f"started (use --overwrite to start over)")
    stats = {**stats, "truncated": 0, "no_target_left": 0}
    end_of_turn = stop_ids(tokenizer)[0]

    def rendered(items: list[list]):
        for conversations in items:
            sequences = []
            for conversation in conversations:
                ids, mask = render_conversation(tokenizer, conversation)
                ids, mask, cut = fit_to_context(ids, mask, context_length, tokenizer.eot_id, end_of_turn)
                stats["truncated"] += cut
                sequences.append((ids, mask))
            if all(any(mask) for _, mask in sequences):
                yield from sequences
            else:  # a reply cut away entirely: nothing to learn from the item
                stats["no_target_left"] += 1

    rows = {split: list(rendered(items)) for split, items in splits.items()}
    write_masked_data(data_dir, tokenizer, rows, {"kind": kind, "source_fingerprint": fingerprint, "stats": stats})
    return stats
