"""TokenLoader: shapes, packing modes, determinism, exact resume, rank disjointness; shard reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchlm.data import TokenLoader, iter_documents, read_manifest
from scratchlm.data.loader import IGNORE, document_pieces
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


def targets_and_inputs(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, int]]:
    """(input, target) of every non-padding position."""
    keep = y != IGNORE
    return list(zip(x[keep].tolist(), y[keep].tolist()))


def successor_pairs(shards: list[np.ndarray]) -> set[tuple[int, int]]:
    """(token, next token) pairs of the shard streams, with the implied EOT before each shard."""
    pairs = set()
    for shard in shards:
        with_bos = np.concatenate([[EOT], shard])
        pairs.update(zip(with_bos[:-1].tolist(), with_bos[1:].tolist()))
    return pairs


def test_stream_rows_are_consecutive_pieces_of_the_stream(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=4, context_length=T, seed=1)
    # Every non-EOT token is unique, so it tells where its row lies in which shard.
    shards = stream_of(data_dir)
    where = {int(tok): (s, pos) for s, shard in enumerate(shards) for pos, tok in enumerate(shard) if tok != EOT}
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            n = int((row_y != IGNORE).sum())  # a shard's last row is padded
            j = int(np.flatnonzero((row_y != EOT) & (row_y != IGNORE))[0])
            shard, pos = where[int(row_y[j])]
            start = pos - j
            assert np.array_equal(row_y[:n], shards[shard][start : start + n])
            assert np.all(row_y[n:] == IGNORE) and np.all(row_x[n:] == EOT)
            previous = shards[shard][start - 1] if start else EOT  # the implied EOT
            assert row_x[0] == previous and np.array_equal(row_x[1:n], row_y[: n - 1])


@pytest.mark.parametrize("packing", ["stream", "document"])
def test_one_epoch_predicts_every_token_exactly_once(data_dir, packing):
    loader = TokenLoader(data_dir, "train", batch_size=1, context_length=T, packing=packing)
    shards = stream_of(data_dir)
    targets, rows = [], set()
    for _ in range(loader.windows_per_rank):
        x, y = loader.next_batch()
        rows.add(tuple(x[0].tolist()))
        pairs = targets_and_inputs(x, y)
        assert set(pairs) <= successor_pairs(shards)  # each target follows its input in a document
        targets.extend(t for _, t in pairs)
    assert len(rows) == loader.num_windows and loader.epoch == 1
    stream = np.concatenate(shards)
    assert sorted(targets) == sorted(stream.tolist())  # every token (EOTs included) once
    assert loader.tokens_per_epoch == len(stream)
    slots = loader.num_windows * T
    assert loader.padding_fraction == pytest.approx(1 - len(stream) / slots)


def test_document_rows_start_at_documents_and_keep_short_documents_whole(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=1, context_length=T, packing="document")
    row_of_target = {}
    for row in range(loader.windows_per_rank):
        x, y = loader.next_batch()
        starts = (x[0] == EOT).nonzero().flatten().tolist()
        # A row begins with a document's EOT, or with the continuation of a long document,
        # which then comes first and unpadded.
        first = starts[0] if starts else T
        assert bool((y[0, :first] != IGNORE).all())
        for t in y[0][y[0] != IGNORE].tolist():
            if t != EOT:
                row_of_target[t] = row
        segments = loader.segment_ids(x)[0]
        assert segments.tolist() == sorted(segments.tolist())  # documents come one after another
    for doc in unique_docs(np.random.default_rng(0).integers(3, 60, size=120).tolist()):
        if len(doc) + 1 <= T:  # fits a row: never cut
            assert len({row_of_target[int(t)] for t in doc}) == 1
    # Most documents here exceed the 16-token context, so their remainders open rows of their
    # own; with documents mostly shorter than the context, best-fit padding is far lower:
    assert loader.padding_fraction < 0.15
    lengths = np.random.default_rng(1).integers(100, 400, size=2000)  # TinyStories-like, context 512
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts, ends, rows = document_pieces(doc_starts, int(lengths.sum()), 512)
    assert np.array_equal(np.sort(starts), doc_starts)  # no document cut
    assert 1 - lengths.sum() / ((rows.max() + 1) * 512) < 0.01  # under 1% padding


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
    assert val.windows_per_rank == -(-49 // T)  # 40 + 7 tokens + 2 EOT, the last row padded
    x, y = val.next_batch()  # batch larger than the split: windows repeat across epochs
    assert x.shape == (8, T) and val.epoch >= 2
    again = TokenLoader(data_dir, "val", batch_size=8, context_length=T)
    assert torch.equal(again.next_batch()[0], x)  # a fresh val loader sees the same batches


def test_bad_arguments(data_dir, tmp_path):
    assert TokenLoader(data_dir, "val", batch_size=1, context_length=100).num_windows == 1
    with pytest.raises(ScratchLMError, match="not one row per rank for 2"):
        TokenLoader(data_dir, "val", batch_size=1, context_length=100, rank=1, world_size=2)
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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_pass_covers_every_row_once_with_the_same_batch_count_on_every_rank(data_dir, world):
    loaders = [TokenLoader(data_dir, "train", batch_size=5, context_length=T, rank=r, world_size=world)
               for r in range(world)]
    passes = [list(loader.one_pass()) for loader in loaders]
    assert len({len(p) for p in passes}) == 1  # collective-safe: equal counts on every rank
    rows = [tuple(x[i].tolist()) for p in passes for x, y in p for i in range(len(x)) if (y[i] != IGNORE).any()]
    assert len(rows) == len(set(rows)) == loaders[0].num_windows
    assert loaders[0].windows_consumed == 0  # evaluation leaves the training position alone
