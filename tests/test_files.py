"""Output files and directories on every command: nothing of the user's deleted, modes that
honour the umask, one-line errors for OS failures (a full disk, `-o .`, a path under a file)
with nothing half-written left behind."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_text, check_output_directory
from tests.conftest import REPO_ROOT

TEXT = "".join(f"Line {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n" for i in range(2000))


def _cli(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(corpus) -> Path:
    out = corpus.parent / "tok"
    assert _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "-o", str(out),
                "--no-progress").returncode == 0
    return out


@pytest.fixture()
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to about 40 KiB of free space (root only; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill it (needs root): {result.stderr.strip()}")
    try:
        (mount / "filler").write_bytes(b"\0" * (1024 * 1024 - 40 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("scratchlm: error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1]


# --------------------------------------------------------------------------- full disk
def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(corpus, tokenizer_dir, full_disk):
    before = sorted(os.listdir(full_disk))
    result = _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "3000", "-o",
                  str(full_disk / "tok"), "--no-progress")
    _one_line_error(result, "No space left on device", str(full_disk))
    assert sorted(os.listdir(full_disk)) == before  # no half-written directory, no temporaries

    big = corpus.parent / "big.txt"
    big.write_text(TEXT * 20)
    result = _cli("data", "prepare", "--input", str(big), "--tokenizer", str(tokenizer_dir), "-o",
                  str(full_disk / "data"), "--no-filter", "all", "--no-dedup", "--workers", "1")
    _one_line_error(result, "No space left on device")
    assert sorted(os.listdir(full_disk)) == before


def test_a_full_disk_while_saving_a_model_is_a_clear_error(tokenizer_dir, full_disk):
    from scratchlm.model import ModelConfig, Transformer, save_model
    from scratchlm.tokenizer import Tokenizer

    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))  # ~4 MB of weights
    with pytest.raises(ScratchLMError, match="cannot write .*model.safetensors"):
        save_model(full_disk / "model", model, Tokenizer.load(tokenizer_dir))
    assert sorted(os.listdir(full_disk)) == ["filler"]


# --------------------------------------------------------------------------- odd output paths
def test_output_to_the_current_directory(corpus, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "-o", ".",
                "--no-progress", cwd=work).returncode == 0
    assert sorted(os.listdir(work)) == ["merges.txt", "tokenizer.json", "vocab.txt"]
    (work / "notes.txt").write_text("mine")
    _one_line_error(_cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "-o", ".",
                         "--no-progress", cwd=work), "not empty", "--overwrite")
    assert _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "290", "-o", ".",
                "--no-progress", "--overwrite", cwd=work).returncode == 0
    assert sorted(os.listdir(work)) == ["merges.txt", "notes.txt", "tokenizer.json", "vocab.txt"]
    assert "290" in (work / "tokenizer.json").read_text()


def test_an_output_path_under_a_regular_file(corpus, tokenizer_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _one_line_error(_cli("data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir),
                         "-o", str(blocker / "data")), "is a regular file")
    _one_line_error(_cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "-o",
                         str(blocker)), "not a directory")
    with pytest.raises(ScratchLMError, match="regular file"):
        atomic_write_text(blocker / "sub" / "x.txt", "y")
    assert blocker.read_text() == "x"


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_files_and_directories_honour_the_umask(corpus, tokenizer_dir, tmp_path, umask, file_mode, dir_mode):
    tok, data = tmp_path / "tok", tmp_path / "data"
    assert _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "-o", str(tok),
                "--no-progress", umask=umask).returncode == 0
    assert _cli("data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "-o", str(data),
                "--no-filter", "all", "--no-dedup", "--workers", "1", umask=umask).returncode == 0
    for directory in (tok, data):
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode
        for path in directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == file_mode, path


# --------------------------------------------------------------------------- the rule itself
def test_atomic_directory_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.bin").write_text("1")
        (tmp / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match="not empty"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True, commit_last=("manifest.json",), replaces=["a.bin", "b.bin"]) as tmp:
        (tmp / "b.bin").write_text("2")
        (tmp / "manifest.json").write_text('{"v": 2}')
    # a.bin: the earlier output's, not rewritten, so removed; notes.txt: the user's, kept.
    assert sorted(os.listdir(out)) == ["b.bin", "manifest.json", "notes.txt"]
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "manifest.json").read_text() == '{"v": 2}'
    assert sorted(os.listdir(out)) == ["b.bin", "manifest.json", "notes.txt"]  # no temporary left
    assert check_output_directory(tmp_path / "new", overwrite=False) == (tmp_path / "new").absolute()
    shutil.rmtree(out)
