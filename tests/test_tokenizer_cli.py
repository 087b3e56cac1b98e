"""`scratchlm tokenizer train|encode|decode|info` through cli.main."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import TOKENIZER_FILES, Tokenizer

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
                 "--no-progress"]) == 0
    return out


def test_train_writes_files_and_summary(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "290",
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
    (["train", "--input", "MISSING", "--vocab-size", "300", "-o", "OUT"], "input file not found"),
    (["train", "--input", "EMPTY", "--vocab-size", "300", "-o", "OUT"], "input file is empty"),
    (["train", "--input", "CORPUS", "--vocab-size", "256", "-o", "OUT"], "below 256 bytes + 1 special"),
    (["info", "MISSING"], "tokenizer directory not found"),
    (["encode", "-t", "BROKEN", "--text", "x"], "tokenizer file missing"),
    (["decode", "-t", "TOK", "1", "x2"], "'x2' is not a token id"),
])
def test_bad_input_one_line_error(args, message, tmp_path, corpus, trained_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text((trained_dir / "tokenizer.json").read_text())
    names = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty.txt"),
             "CORPUS": str(corpus), "OUT": str(tmp_path / "out"), "BROKEN": str(broken), "TOK": str(trained_dir)}
    assert main(["tokenizer", *[names.get(a, a) for a in args], *(["--no-progress"] if args[0] == "train" else [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scratchlm: error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()  # nothing half-written
