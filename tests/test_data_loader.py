"""TokenLoader: shapes, packing modes, determinism, exact resume, rank disjointness; shard reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchlm.data import TokenLoader, iter_documents, read_manifest
from scratchlm.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, shard_dtype
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_json

EOT = 0
T = 16


def write_data_dir(path, splits: dict[str, list[np.ndarray]], shard_tokens: int = 400, vocab_size: int = 60_000) -> None:
    """A data directory in the real format, from given documents (token ids without EOT)."""
    dtype = shard_dtype(vocab_size)
    info = {}
    for split, docs in splits.items():
        writer = ShardWriter(path, split, dtype, EOT, shard_tokens)
        for doc in docs:
            writer.add(doc)
        shards = writer.close()
        info[split] = {"documents": len(docs), "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    atomic_write_json(path / MANIFEST, {"format_version": FORMAT_VERSION, "vocab_size": vocab_size,
                                         "tokenizer_hash": "test", "eot_id": EOT, "dtype": dtype.name,
                                         "splits": info})


def unique_docs(lengths: list[int]) -> list[np.ndarray]:
    """Documents whose tokens are distinct positive ids, so every window is identifiable."""
    ends = np.cumsum(lengths)
    return [np.arange(e - n, e) + 1 for n, e in zip(lengths, ends)]


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=120).tolist()
    write_data_dir(tmp_path, {"train": unique_docs(lengths), "val": unique_docs([40, 7])})
    return tmp_path


def stream_of(data_dir, split="train") -> list[np.ndarray]:
    manifest = read_manifest(data_dir)
    return [np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]


def window_ids(x: torch.Tensor) -> list[tuple[int, ...]]:
    """Rows identify windows (a first token alone does not: many windows start with EOT)."""
    return [tuple(row) for row in x.tolist()]


def test_batches_are_shifted_windows_of_the_stream(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=4, context_length=T, seed=1)
    # Every non-EOT token is unique, so it tells where its window lies in which shard.
    where = {int(tok): (s, pos) for s, shard in enumerate(stream_of(data_dir))
             for pos, tok in enumerate(shard) if tok != EOT}
    shards = stream_of(data_dir)
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            j = int(np.flatnonzero(row_x != EOT)[0])
            shard, pos = where[int(row_x[j])]
            start = pos - j
            assert np.array_equal(row_x, shards[shard][start : start + T])
            assert np.array_equal(row_y, shards[shard][start + 1 : start + T + 1])


@pytest.mark.parametrize("packing", ["stream", "document"])
def test_one_epoch_visits_every_window_once(data_dir, packing):
    loader = TokenLoader(data_dir, "train", batch_size=1, context_length=T, packing=packing)
    seen = []
    for _ in range(loader.windows_per_rank):
        seen.extend(window_ids(loader.next_batch()[0]))
    assert len(set(seen)) == loader.num_windows == len(seen)
    assert loader.epoch == 1
    assert loader.tokens_per_epoch == loader.num_windows * T
    shards = stream_of(data_dir)
    total = sum(len(s) for s in shards)
    if packing == "stream":  # contiguous, non-overlapping: all but the shard tails
        assert loader.num_windows == sum((len(s) - 1) // T for s in shards)
        assert loader.num_windows * T > total - len(shards) * (T + 1)
    else:  # every window starts at a document start or k·T into its document
        starts = {}
        for s in shards:
            doc_starts = np.concatenate([[0], np.flatnonzero(s == EOT)[:-1] + 1])
            for d, e in zip(doc_starts, np.append(doc_starts[1:], len(s))):
                for k in range(d, e, T):
                    if k + T + 1 <= len(s):
                        starts[int(s[k])] = True
        assert {w[0] for w in seen} == set(starts)


def test_same_seed_same_batches_other_seed_other_order(data_dir):
    def first(seed, n=6):
        loader = TokenLoader(data_dir, "train", batch_size=3, context_length=T, seed=seed)
        return [loader.next_batch()[0] for _ in range(n)]
    a, b, c = first(5), first(5), first(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_resume_replays_exactly_across_epochs(data_dir):
    reference = TokenLoader(data_dir, "train", batch_size=5, context_length=T, seed=3, packing="document")
    expected = [reference.next_batch() for _ in range(3 * reference.batches_per_epoch + 4)]

    first = TokenLoader(data_dir, "train", batch_size=5, context_length=T, seed=3, packing="document")
    for _ in range(reference.batches_per_epoch + 2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = TokenLoader(data_dir, "train", batch_size=5, context_length=T, seed=3, packing="document")
    resumed.load_state_dict(state)
    for x_exp, y_exp in expected[reference.batches_per_epoch + 2 :]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)
    assert resumed.epoch >= 3


def test_state_from_other_settings_is_refused(data_dir):
    state = TokenLoader(data_dir, "train", batch_size=2, context_length=T, seed=0).state_dict()
    other = TokenLoader(data_dir, "train", batch_size=2, context_length=T, seed=1)
    with pytest.raises(ScratchLMError, match="seed"):
        other.load_state_dict(state)
    longer = TokenLoader(data_dir, "train", batch_size=2, context_length=T + 1, seed=0)
    with pytest.raises(ScratchLMError, match="context_length"):
        longer.load_state_dict(state)


@pytest.mark.parametrize("packing", ["stream", "document"])
def test_ranks_read_disjoint_windows(data_dir, packing):
    world = 3
    loaders = [TokenLoader(data_dir, "train", batch_size=2, context_length=T, rank=r, world_size=world,
                           seed=9, packing=packing) for r in range(world)]
    per_rank = []
    for loader in loaders:
        windows = set()
        for _ in range(loader.batches_per_epoch):
            windows.update(window_ids(loader.next_batch()[0]))
        per_rank.append(windows)
        assert len(windows) == 2 * loader.batches_per_epoch
    for i in range(world):
        for j in range(i + 1, world):
            assert not per_rank[i] & per_rank[j]
    # Every rank resumes from the same state dict.
    assert len({json.dumps(l.state_dict()) for l in loaders}) == 1


def test_tiny_val_split_still_yields_batches(data_dir):
    val = TokenLoader(data_dir, "val", batch_size=8, context_length=T)
    assert val.windows_per_rank == (49 - 1) // T  # 40 + 7 tokens + 2 EOT
    x, y = val.next_batch()  # batch larger than the split: windows repeat across epochs
    assert x.shape == (8, T) and val.epoch >= 2
    again = TokenLoader(data_dir, "val", batch_size=8, context_length=T)
    assert torch.equal(again.next_batch()[0], x)  # a fresh val loader sees the same batches


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ScratchLMError, match="window"):
        TokenLoader(data_dir, "val", batch_size=1, context_length=100)
    with pytest.raises(ScratchLMError, match="packing"):
        TokenLoader(data_dir, "train", batch_size=1, context_length=T, packing="padded")
    with pytest.raises(ScratchLMError, match="rank"):
        TokenLoader(data_dir, "train", batch_size=1, context_length=T, rank=2, world_size=2)
    with pytest.raises(ScratchLMError, match="no split 'test'"):
        TokenLoader(data_dir, "test", batch_size=1, context_length=T)
    with pytest.raises(ScratchLMError, match="no manifest.json"):
        TokenLoader(tmp_path / "nowhere", "train", batch_size=1, context_length=T)
    (data_dir / "train_000001.bin").unlink()
    with pytest.raises(ScratchLMError, match="train_000001.bin"):
        TokenLoader(data_dir, "train", batch_size=1, context_length=T)


@pytest.mark.parametrize("vocab_size, dtype", [(50_257, np.uint16), (65_536, np.uint16), (100_277, np.uint32)])
def test_iter_documents_round_trip_and_dtype(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, vocab_size, size=n) for n in rng.integers(0, 90, size=50)]
    write_data_dir(tmp_path, {"train": docs}, shard_tokens=300, vocab_size=vocab_size)
    manifest = read_manifest(tmp_path)
    assert manifest["dtype"] == np.dtype(dtype).name and len(manifest["splits"]["train"]["shards"]) > 3
    back = list(iter_documents(tmp_path, "train"))
    assert len(back) == len(docs) and all(np.array_equal(a, b) for a, b in zip(back, docs))
    raw = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=dtype) for s in manifest["splits"]["train"]["shards"]])
    assert (raw == EOT).sum() == len(docs)  # one EOT after every document
