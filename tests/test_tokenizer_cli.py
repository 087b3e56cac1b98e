"""`scratchlm tokenizer train|encode|decode|info` through cli.main."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import TOKENIZER_FILES, Tokenizer
from tests.conftest import shared_file

TEXT = "".join(f"Story {i}: the cat {i * 37} sat on mat {i % 11}; the dog ran.\n" for i in range(400)) + (
    "<|endoftext|>A new story.\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_dir(corpus) -> Path:
    out = corpus.parent / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "-o", str(out),
                 "--doc-mode", "line", "--no-progress"]) == 0
    return out


def test_train_writes_files_and_summary(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "290", "--doc-mode", "line",
                 "--special-token", "<|endoftext|>", "--special-token", "<|pad|>", "-o", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "MB/s" in captured.out and "bytes/token" in captured.out and "held-out" in captured.out
    assert "merge" in captured.err  # progress bar on stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(TOKENIZER_FILES)
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 290 and set(tok.special_tokens) == {"<|endoftext|>", "<|pad|>"}


def test_encode_decode_info(trained_dir, corpus, capsys):
    assert main(["tokenizer", "encode", "-t", str(trained_dir), "--text", "The cat<|endoftext|>"]) == 0
    ids = capsys.readouterr().out.split()
    tok = Tokenizer.load(trained_dir)
    assert [int(i) for i in ids] == tok.encode("The cat<|endoftext|>")
    assert tok.eot_id not in [int(i) for i in ids]  # text is text unless --allow-special
    assert main(["tokenizer", "encode", "-t", str(trained_dir), "--allow-special", "--text",
                 "The cat<|endoftext|>"]) == 0
    special_ids = [int(i) for i in capsys.readouterr().out.split()]
    assert special_ids == tok.encode("The cat<|endoftext|>", allowed_special="all")
    assert special_ids[-1] == tok.eot_id
    assert main(["tokenizer", "decode", "-t", str(trained_dir), *ids]) == 0
    assert capsys.readouterr().out == "The cat<|endoftext|>"

    assert main(["tokenizer", "encode", "-t", str(trained_dir), "--input", str(corpus)]) == 0
    ids_file = corpus.parent / "ids.txt"
    ids_file.write_text(capsys.readouterr().out)
    assert main(["tokenizer", "decode", "-t", str(trained_dir), "--input", str(ids_file)]) == 0
    assert capsys.readouterr().out == TEXT

    assert main(["tokenizer", "info", str(trained_dir)]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 300" in out and "fingerprint: " + tok.fingerprint() in out


@pytest.mark.parametrize("args, message", [
    (["train", "--input", "MISSING", "--vocab-size", "300", "-o", "OUT"], "input not found"),
    (["train", "--input", "EMPTY", "--vocab-size", "300", "-o", "OUT"], "no text to train on"),
    (["train", "--input", "RANDOM", "--vocab-size", "300", "-o", "OUT"], "binary data, not text"),
    (["train", "--input", "CORPUS", "--vocab-size", "300", "-o", "NOTES"], "use --overwrite"),
    (["train", "--input", "CORPUS", "--vocab-size", "300", "-o", "UNDER_FILE"], "is a regular file"),
    (["train", "--input", "CORPUS", "--vocab-size", "256", "-o", "OUT"], "below 256 bytes + 1 special"),
    (["info", "MISSING"], "tokenizer directory not found"),
    (["encode", "-t", "BROKEN", "--text", "x"], "tokenizer file missing"),
    (["decode", "-t", "TOK", "1", "x2"], "'x2' is not a token id"),
])
def test_bad_input_one_line_error(args, message, tmp_path, corpus, trained_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(100_000))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text((trained_dir / "tokenizer.json").read_text())
    names = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty.txt"),
             "CORPUS": str(corpus), "OUT": str(tmp_path / "out"), "BROKEN": str(broken), "TOK": str(trained_dir),
             "RANDOM": str(tmp_path / "random.bin"), "NOTES": str(notes),
             "UNDER_FILE": str(tmp_path / "empty.txt" / "tok")}
    assert main(["tokenizer", *[names.get(a, a) for a in args], *(["--no-progress"] if args[0] == "train" else [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scratchlm: error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"]  # nothing of the user's touched


def test_compression_is_measured_on_held_out_ordinary_text(tmp_path):
    """The held-out figure is bytes over ordinary-text tokens of documents training never saw;
    a document that spells <|endoftext|> counts its 13 bytes as the text they are."""
    import json

    from scratchlm.sources import hash_fraction
    from scratchlm.tokenizer.commands import _HOLDOUT_SALT, HOLDOUT_FRACTION, train_tokenizer

    texts = [f"<|endoftext|> story {i}: the cat sat on the mat {i % 7} times." for i in range(2000)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = train_tokenizer([tmp_path / "docs.jsonl"], 320, tmp_path / "tok")
    heldout = [t for t in texts if hash_fraction(t, _HOLDOUT_SALT) < HOLDOUT_FRACTION]
    assert summary.heldout_documents == len(heldout) > 5 and summary.documents == len(texts) - len(heldout)
    tok = Tokenizer.load(tmp_path / "tok")
    tokens = sum(len(tok.encode_ordinary(t)) for t in heldout)
    assert summary.heldout_tokens == tokens and tok.eot_id not in tok.encode(heldout[0])
    assert summary.bytes_per_token == pytest.approx(sum(len(t.encode()) for t in heldout) / tokens)


def test_summary_reports_invalid_utf8_and_skipped_binary_input(tmp_path, capsys):
    (tmp_path / "text.txt").write_bytes(b"caf\xe9 au lait, the usual order.\n" * 300)
    (tmp_path / "noise.bin").write_bytes(random.Random(2).randbytes(20_000))
    assert main(["tokenizer", "train", "--input", str(tmp_path / "text.txt"), str(tmp_path / "noise.bin"),
                 "--vocab-size", "280", "-o", str(tmp_path / "tok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "300 byte(s) of invalid UTF-8 replaced by U+FFFD" in out
    assert "skipped 1 file(s) that look like binary data" in out and "noise.bin" in out


def test_sample_mb_trains_on_a_deterministic_sample_and_says_so(tmp_path, capsys):
    corpus = shared_file("corpora/tinyshakespeare.txt")  # 1.1 MB
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--sample-mb", "0.2",
            "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "a sample of 0.2" in out and "up to --sample-mb 0.2" in out
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert Tokenizer.load(tmp_path / "a").fingerprint() == Tokenizer.load(tmp_path / "b").fingerprint()
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--no-progress",
                 "-o", str(tmp_path / "all")]) == 0
    assert "a sample" not in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "all").fingerprint() != Tokenizer.load(tmp_path / "a").fingerprint()
