"""Bad input on every command, as a new user meets it: one line naming the problem, a non-zero
exit, nothing of the user's lost, nothing half-written left."""

from __future__ import annotations

import gzip
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scratchlm.cli import main
from scratchlm.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT
from tests.test_train_fixtures import tiny_config, train_corpus  # noqa: F401

TEXT = "".join(f"Line {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n" for i in range(600))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def tok_dir(corpus) -> Path:
    out = corpus.parent / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "-o", str(out),
                 "--no-progress"]) == 0
    return out


def one_line_error(capsys, code: int, *needles: str, exit_code: int = 1) -> str:
    assert code == exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--input", "x", "--vocab-size", "abc", "-o", "out"])
    one_line_error(capsys, exit_info.value.code, "invalid int value: 'abc'", "--help", exit_code=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer"])
    one_line_error(capsys, exit_info.value.code, "required: COMMAND", exit_code=2)


def test_corrupt_and_undecodable_inputs_name_the_file(corpus, tok_dir, tmp_path, capsys):
    (tmp_path / "fake.zst").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(TEXT.encode())[:-20])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)
    for name, needle in (("fake.zst", "fake.zst"), ("cut.txt.gz", "cut.txt.gz")):
        code = main(["tokenizer", "train", "--input", str(tmp_path / name), "--vocab-size", "280", "-o",
                     str(tmp_path / "t"), "--no-progress"])
        one_line_error(capsys, code, "cannot read", needle)  # the real reason, not "no text"
        code = main(["data", "prepare", "--input", str(tmp_path / name), "--tokenizer", str(tok_dir), "-o",
                     str(tmp_path / "d"), "--no-progress"])
        one_line_error(capsys, code, "cannot read", needle)
    code = main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "-o", str(tmp_path / "d"),
                 "--blocklist-words", str(tmp_path / "latin1.txt"), "--no-progress"])
    one_line_error(capsys, code, "latin1.txt is not UTF-8 text")
    config = tmp_path / "config.yaml"
    config.write_bytes(b"model:\n  preset: \xff\n")
    one_line_error(capsys, main(["train", "--config", str(config), "--out", str(tmp_path / "r")]),
                   "config.yaml: not a YAML or TOML text file")
    one_line_error(capsys, main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r")]), "is a directory")
    assert not any((tmp_path / name).exists() for name in ("t", "d", "r"))


def test_a_missing_json_field_says_why_there_is_no_text(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(50)))
    code = main(["tokenizer", "train", "--input", str(tmp_path / "docs.jsonl"), "--vocab-size", "280", "-o",
                 str(tmp_path / "t"), "--no-progress"])
    one_line_error(capsys, code, "no text to train on", "50 malformed record(s)", "missing field 'text'")


def test_binary_input_is_refused_by_encode(tok_dir, tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(random.Random(1).randbytes(20_000))
    one_line_error(capsys, main(["tokenizer", "encode", "-t", str(tok_dir), "--input", str(tmp_path / "x.bin")]),
                   "x.bin looks like binary data")


def test_a_vocabulary_the_corpus_cannot_fill_is_said(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "100000", "-o", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    assert "not the 100000 asked for" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["tokenizer", "decode", "-t", "TOK", "--input", "IDS", "72"], "not both"),
    (["model", "info", "tiny", "--batch-size", "-3"], "--batch-size must be at least 1"),
    (["tokenizer", "train", "--input", "CORPUS", "--vocab-size", "300", "-o", ""], "empty path"),
    (["tokenizer", "train", "--input", "CORPUS", "--vocab-size", "300", "-o", "NEW", "--workers", "0"],
     "--workers must be at least 1"),
    (["generate", "MODEL", "--prompt", "x", "--seed", "-1"], "seed must be between 0"),
    (["tokenizer", "info", "CORPUS"], "is a file, not a tokenizer"),
])
def test_option_values_are_checked(args, needle, corpus, tok_dir, tmp_path, capsys):
    (tmp_path / "ids.txt").write_text("72 73")
    names = {"TOK": str(tok_dir), "IDS": str(tmp_path / "ids.txt"), "CORPUS": str(corpus),
             "NEW": str(tmp_path / "new"), "MODEL": str(tmp_path / "model")}
    one_line_error(capsys, main([names.get(a, a) for a in args]), needle)


def test_jsonl_with_a_byte_order_mark(tmp_path):
    from scratchlm.sources import SourceStats, iter_documents_from

    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    stats = SourceStats("bom")
    assert [d.text for d in iter_documents_from(str(tmp_path / "bom.jsonl"), stats=stats)] == ["first", "second"]
    assert stats.malformed == 0


# --------------------------------------------------------------------------- nothing of the user's lost
def test_train_never_takes_over_a_users_files(train_corpus, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "exp"
    mine.mkdir()
    config = tiny_config(train_corpus, run={"max_steps": 2, "eval_every": 0, "sample_tokens": 0})
    (mine / "config.yaml").write_text(yaml.safe_dump(config) + "# mine\n")
    (mine / "metrics.jsonl").write_text("my own metrics\n")
    # Files of a run's names are still the user's when the directory is not a training run.
    one_line_error(capsys, main(["train", "--config", str(mine / "config.yaml"), "--out", str(mine)]),
                   "not a training run", "--overwrite")
    one_line_error(capsys, main(["train", "--config", str(mine / "config.yaml"), "--out", str(mine), "--overwrite"]),
                   "where the run writes its effective config")
    assert (mine / "config.yaml").read_text().endswith("# mine\n")
    assert (mine / "metrics.jsonl").read_text() == "my own metrics\n"

    # --overwrite starting over removes the earlier run's files, never the user's beside them.
    run = tmp_path / "run"
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(config_path), "--out", str(run)]) == 0
    for path in (run / "final" / "notes.txt", run / "checkpoints" / "keep.txt", run / "checkpoints" / "mine" / "x"):
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    assert main(["train", "--config", str(config_path), "--out", str(run), "--overwrite"]) == 0
    capsys.readouterr()
    for path in (run / "final" / "notes.txt", run / "checkpoints" / "keep.txt", run / "checkpoints" / "mine" / "x"):
        assert path.read_text() == "mine"
    assert stat.S_IMODE((run / "final" / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_run_whose_download_fails_leaves_nothing(tmp_path):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), SCRATCHLM_GITHUB_ENDPOINT=f"http://127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-m", "scratchlm", "run", "--corpus", "tinyshakespeare",
                             "--split-by-position", "--no-progress"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "tinyshakespeare" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # no runs/, no run.json


def test_an_interrupted_prepare_leaves_no_temporary_directory(corpus, tok_dir, tmp_path, monkeypatch):
    from scratchlm.data import PrepareConfig, prepare_data
    from scratchlm.data.tasks import TaskWriter

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TaskWriter, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([str(corpus)], tok_dir, tmp_path / "out", config=PrepareConfig(workers=1, progress=False))
    assert not (tmp_path / "out").exists()  # it made the directory, and nothing was finished in it
    Tokenizer.load(tok_dir)  # the tokenizer it read is untouched
