"""The README's commands, as a newcomer copies them: every `scratchlm` line parses, and the
stage-by-stage Tiny Shakespeare example runs as written (downloads served by a local server)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from scratchlm.cli import build_parser
from tests.conftest import REPO_ROOT, shared_file
from tests.test_data_hub import SHAKESPEARE_PATH, FakeGitHub, fake_github  # noqa: F401

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Logical lines (backslash continuations joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _scratchlm_args(command: str) -> list[str] | None:
    words = shlex.split(command)
    if "scratchlm" in words and words[0] in ("scratchlm", "srun", "torchrun"):
        return words[words.index("scratchlm") + 1:]
    return None


ALL = [args for block in _bash_blocks(README) for command in _commands(block)
       if (args := _scratchlm_args(command)) is not None]


@pytest.mark.parametrize("args", ALL, ids=[" ".join(a[:2]) for a in ALL])
def test_every_readme_command_parses(args):
    build_parser().parse_args(args)  # exits (a failed test) on an unknown option or value


@pytest.mark.slow
def test_the_stage_by_stage_example_runs_as_written(fake_github, tmp_path):  # noqa: F811
    FakeGitHub.files = {SHAKESPEARE_PATH: shared_file("corpora/tinyshakespeare.txt").read_bytes()}
    block = next(b for b in _bash_blocks(README) if "scratchlm data download tinyshakespeare" in b)
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")  # "from the repository root"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), OMP_NUM_THREADS="1")
    for command in _commands(block):
        args = _scratchlm_args(command)
        if args[0] == "train":  # as written, plus a budget a test can afford
            args += ["--run.max_minutes=null", "--run.max_steps=3", "--run.eval_every=0"]
        result = subprocess.run([sys.executable, "-m", "scratchlm", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert (tmp_path / "runs" / "shakespeare" / "final" / "model.safetensors").is_file()
