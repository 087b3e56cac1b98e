"""prepare_data end to end on the shared corpora: shards decode back to the kept documents,
splits, determinism across worker counts, bad input, atomic output, and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.data import PrepareConfig, TokenLoader, iter_documents, prepare_data, read_manifest
from scratchlm.data.clean import clean_text
from scratchlm.data.filters import Blocklists, FilterConfig, first_failing_filter
from scratchlm.data.shards import ShardWriter
from scratchlm.sources import iter_documents_from
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import Tokenizer
from tests.conftest import shared_file

NO_FILTERS = dict(filter=False, dedup=False, progress=False)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small real BPE tokenizer (vocab 400) trained on a shared corpus."""
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train([shared_file("corpora/tinystories_train_head.txt")], 400, workers=1).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def decoded(tok, data_dir, split) -> list[str]:
    return [tok.decode(ids.tolist()) for ids in iter_documents(data_dir, split)]


def test_shards_decode_back_to_the_kept_documents(tmp_path, tok_dir, tok):
    c4, wiki = shared_file("corpora/c4_demo.jsonl"), shared_file("corpora/wiki_demo.txt")
    config = PrepareConfig(val_inputs=(str(wiki),), workers=2, batch_documents=16, **NO_FILTERS)
    manifest = prepare_data([str(c4)], tok_dir, tmp_path / "data", config=config)
    expected = {split: [clean_text(d.text) for d in iter_documents_from(str(path))]
                for split, path in (("train", c4), ("val", wiki))}
    for split in ("train", "val"):
        assert decoded(tok, tmp_path / "data", split) == expected[split]
        info = manifest["splits"][split]
        assert info["documents"] == len(expected[split])
        assert info["bytes"] == sum(len(t.encode()) for t in expected[split])
        # tokens: the documents' own ids plus one EOT each
        assert info["tokens"] == sum(len(tok.encode(t)) + 1 for t in expected[split])
    assert read_manifest(tmp_path / "data") == manifest
    assert manifest["tokenizer_hash"] == tok.fingerprint()
    assert (manifest["vocab_size"], manifest["eot_id"], manifest["dtype"]) == (400, tok.eot_id, "uint16")
    assert [s["role"] for s in manifest["sources"]] == ["val", "train"]


def test_filters_dedup_and_hash_split_on_shared_corpora(tmp_path, tok_dir, tok):
    story = shared_file("corpora/tinystories_valid_head.txt")
    c4 = shared_file("corpora/c4_demo.jsonl")
    # A planted near-duplicate: a c4 document with two words changed, as an extra input.
    docs = [json.loads(line)["text"] for line in c4.read_text().splitlines()]
    passing = [d for d in docs if first_failing_filter(clean_text(d), "prose", FilterConfig(), Blocklists()) is None]
    original = max(passing, key=len)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps({"text": original.replace(" the ", " a ", 2)}) + "\n")
    config = PrepareConfig(workers=2, progress=False, val_fraction=0.02)
    manifest = prepare_data([str(story), str(c4), str(copy)], tok_dir, tmp_path / "data", config=config)

    stages = {row["stage"]: row for row in manifest["stages"]}
    dropped = {name: f["dropped"] for name, f in manifest["filters"].items()}
    assert stages["read"]["documents"] - stages["clean+filter+tokenize"]["documents"] == sum(dropped.values())
    assert dropped["gopher_word_count"] > 0 and dropped["gopher_dup_ngrams"] > 0
    assert stages["near dedup"]["documents"] == stages["exact dedup"]["documents"] - 1
    kept = decoded(tok, tmp_path / "data", "train") + decoded(tok, tmp_path / "data", "val")
    assert clean_text(original) in kept and clean_text(original.replace(" the ", " a ", 2)) not in kept
    assert stages["split val"]["documents"] >= 1
    assert stages["split train"]["documents"] + stages["split val"]["documents"] == len(kept)


def test_output_identical_for_any_worker_count(tmp_path, tok_dir):
    inputs = [str(shared_file("corpora/tinystories_train_head.txt")), str(shared_file("corpora/c4_demo.jsonl"))]
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_data(inputs, tok_dir, out, config=PrepareConfig(workers=workers, batch_documents=8, progress=False))
        outputs.append({p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"})
        manifest = read_manifest(out)
        stages = [{k: v for k, v in row.items() if k != "seconds"} for row in manifest["stages"]]
        outputs[-1]["stats"] = json.dumps([stages, manifest["filters"], manifest["splits"]])
    assert outputs[0] == outputs[1]


def test_split_by_position_and_tiny_corpora(tmp_path, tok_dir, tok):
    play = shared_file("corpora/tinyshakespeare.txt")
    config = PrepareConfig(split_by_position=True, val_fraction=0.1, **NO_FILTERS)
    prepare_data([str(play)], tok_dir, tmp_path / "play", config=config)
    train, val = decoded(tok, tmp_path / "play", "train"), decoded(tok, tmp_path / "play", "val")
    full = clean_text(play.read_text())
    tail = "\n\n".join(val)
    assert full.endswith(tail) and full.startswith(train[0])
    assert 0.08 < len(tail) / len(full) < 0.12
    # The same play as documents for training: a loader over it works with document packing.
    loader = TokenLoader(tmp_path / "play", "train", batch_size=2, context_length=64, packing="document")
    assert loader.next_batch()[0].shape == (2, 64)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("first tiny document<|endoftext|>second tiny document<|endoftext|>third one")
    manifest = prepare_data([str(tiny)], tok_dir, tmp_path / "tiny", config=PrepareConfig(**NO_FILTERS))
    assert manifest["splits"]["val"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 2


@pytest.mark.slow
def test_stdlib_corpus_with_code_profile(tmp_path, tok_dir):
    config = PrepareConfig(workers=2, progress=False, dedup=False)
    manifest = prepare_data(["stdlib"], tok_dir, tmp_path / "std", config=config)
    assert manifest["sources"][0]["profile"] == "code"
    assert manifest["stages"][1]["documents"] > 0.9 * manifest["stages"][0]["documents"]
    assert manifest["splits"]["train"]["tokens"] > 1_000_000


def test_bad_input(tmp_path, tok_dir):
    with pytest.raises(ScratchLMError, match="missing.txt"):
        prepare_data([str(tmp_path / "missing.txt")], tok_dir, tmp_path / "a", config=PrepareConfig(progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello there"}\n{"text": \n')
    with pytest.raises(ScratchLMError, match=r"bad\.jsonl:2"):
        prepare_data([str(bad)], tok_dir, tmp_path / "b", config=PrepareConfig(strict_json=True, progress=False))
    short = tmp_path / "short.txt"
    short.write_text("too short<|endoftext|>also short")
    with pytest.raises(ScratchLMError, match="no documents left"):
        prepare_data([str(short)], tok_dir, tmp_path / "c", config=PrepareConfig(progress=False))
    with pytest.raises(ScratchLMError, match="unknown filter"):
        prepare_data([str(short)], tok_dir, tmp_path / "d", config=PrepareConfig(disabled_filters=("gopher",)))
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_existing_output_is_refused_or_replaced_atomically(tmp_path, tok_dir, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_text("<|endoftext|>".join(f"document {i} with some words" for i in range(40)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    config = PrepareConfig(**NO_FILTERS)
    with pytest.raises(ScratchLMError, match="holds other files.*--overwrite"):
        prepare_data([str(src)], tok_dir, out, config=config)

    # An interrupted run (while writing shards) leaves no shard, no manifest and no temporary
    # directory; its finished tasks stay, for the next run to continue from.
    calls = {"n": 0}
    original_add = ShardWriter.add

    def failing_add(self, ids):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        original_add(self, ids)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([str(src)], tok_dir, out, config=PrepareConfig(shard_tokens=10, **NO_FILTERS), overwrite=True)
    assert sorted(os.listdir(out)) == ["notes.txt", "tasks"]
    assert not [p for p in (out / "tasks").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.txt"]
    monkeypatch.undo()

    # --overwrite writes the data directory beside the user's file, which stays.
    many = prepare_data([str(src)], tok_dir, out, config=PrepareConfig(shard_tokens=10, **NO_FILTERS),
                        overwrite=True)
    assert len(many["splits"]["train"]["shards"]) > 3
    assert (out / "notes.txt").read_text() == "the user's own file"
    # Overwriting an earlier output removes that output's shards the new one does not replace.
    few = prepare_data([str(src)], tok_dir, out, config=config, overwrite=True)
    shards = {s["file"] for split in few["splits"].values() for s in split["shards"]}
    expected = {"manifest.json", "notes.txt", *shards, *(f.replace(".bin", ".idx.npy") for f in shards)}
    assert set(os.listdir(out)) == expected
    assert read_manifest(out) == few


def test_special_token_text_in_documents_never_becomes_a_boundary(tmp_path, tok_dir, tok):
    """A document that spells <|endoftext|> (JSONL, Parquet, blank-line or line documents) is
    encoded as ordinary text: the only EOT ids in the shards are the separators prepare adds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    eot = "<|endoftext|>"
    texts = [f"Story {i}: the page quotes {eot} and then the story goes on, word after word." for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("\n\n".join(texts))  # blank-line documents
    (tmp_path / "d.txt").write_text("\n".join(texts))  # one document per line
    for name, mode in (("a.jsonl", "auto"), ("b.parquet", "auto"), ("c.txt", "blank"), ("d.txt", "line")):
        out = tmp_path / f"data-{name}"
        config = PrepareConfig(doc_mode=mode, min_doc_chars=1, val_fraction=0.2, **NO_FILTERS)
        manifest = prepare_data([str(tmp_path / name)], tok_dir, out, config=config)
        for split in ("train", "val"):
            documents = decoded(tok, out, split)
            assert all(eot in d for d in documents), name
            stream = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16)
                                     for s in manifest["splits"][split]["shards"]])
            assert int((stream == tok.eot_id).sum()) == manifest["splits"][split]["documents"], name
        assert sum(manifest["splits"][s]["documents"] for s in ("train", "val")) == 30


def test_problems_in_the_input_are_summarised_once(tmp_path, tok_dir, capsys, recwarn):
    rng = np.random.default_rng(0)
    good = [{"text": f"Document {i} has plenty of ordinary words in it, as documents do."} for i in range(60)]
    lines = [json.dumps(r) for r in good] + ["{broken"] * 3000
    noise = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes().decode("latin-1")
    lines.append(json.dumps({"text": noise.encode("latin-1").decode("utf-8", "replace")}))  # binary junk
    (tmp_path / "in.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9 ok"}\n')
    assert main(["data", "prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tok_dir),
                 "-o", str(tmp_path / "data"), "--no-filter", "all", "--no-dedup", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "3,000 malformed record(s) skipped" in captured.out and "in.jsonl:61" in captured.out
    assert "1 byte(s) of invalid UTF-8" in captured.out
    assert "binary 1" in captured.out  # the junk record, dropped by the always-on binary filter
    assert captured.err.count("malformed") == 0 and len(recwarn) == 0
    manifest = read_manifest(tmp_path / "data")
    assert manifest["filters"]["binary"] == {"enabled": True, "profiles": ["prose", "code"], "dropped": 1}


def test_cli_prepare_and_errors(tmp_path, tok_dir, capsys):
    c4 = shared_file("corpora/c4_demo.jsonl")
    out = tmp_path / "data"
    code = main(["data", "prepare", "--input", str(c4), "--tokenizer", str(tok_dir), "-o", str(out),
                 "--workers", "1", "--no-filter", "c4_curly_brace", "--scrub-pii", "--val-fraction", "0.05"])
    assert code == 0
    table = capsys.readouterr().out
    assert "near dedup" in table and "bytes/token" in table
    manifest = read_manifest(out)
    assert not manifest["filters"]["c4_curly_brace"]["enabled"] and manifest["config"]["scrub_pii"]
    assert main(["data", "prepare", "--input", str(c4), "--tokenizer", str(tok_dir), "-o", str(out)]) == 1
    assert "scratchlm: error:" in capsys.readouterr().err
    assert main(["data", "download", "no-such-corpus", "-o", str(tmp_path / "dl")]) == 1
    assert "unknown corpus" in capsys.readouterr().err


def test_training_copies_of_validation_documents_are_removed(tmp_path, tok_dir, tok):
    stories = shared_file("corpora/tinystories_train_head.txt").read_text().split("\n\n")[:30]
    (tmp_path / "val.txt").write_text("<|endoftext|>".join(stories[:3]))
    leaked = stories[3:] + [stories[0], stories[1].upper()]  # exact and case-changed copies
    (tmp_path / "train.txt").write_text("<|endoftext|>".join(leaked))
    config = PrepareConfig(val_inputs=(str(tmp_path / "val.txt"),), filter=False, progress=False)
    manifest = prepare_data([str(tmp_path / "train.txt")], tok_dir, tmp_path / "data", config=config)
    train = decoded(tok, tmp_path / "data", "train")
    assert decoded(tok, tmp_path / "data", "val") == [s.strip() for s in stories[:3]]
    assert stories[0].strip() not in train and stories[1].upper().strip() not in train
    assert manifest["splits"]["train"]["documents"] == len(stories) - 3
