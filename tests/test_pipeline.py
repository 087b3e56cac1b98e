"""`scratchlm run` end to end on a tiny budget: artifacts, skipping finished stages, interrupts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.pipeline import STAGES, RunSettings, run_pipeline

# A corpus of real Python files small enough for a test: the stdlib's own modules.
_STDLIB_MODULES = ("argparse.py", "ast.py", "calendar.py", "csv.py", "dataclasses.py", "difflib.py",
                   "fractions.py", "gettext.py", "glob.py", "heapq.py", "inspect.py", "ipaddress.py",
                   "json/decoder.py", "json/encoder.py", "locale.py", "pprint.py", "shlex.py",
                   "statistics.py", "string.py", "textwrap.py", "tokenize.py", "uuid.py", "zipfile.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for name in _STDLIB_MODULES:
        source = stdlib / name
        if source.exists():
            (out / name.replace("/", "_")).write_bytes(source.read_bytes())
    return out


def _settings(corpus: Path, out: Path, **overrides) -> RunSettings:
    values = dict(corpus=(str(corpus),), out_dir=str(out), preset="tiny", minutes=0.15, vocab_size=512,
                  context_length=64, micro_batch_size=8, global_batch_tokens=1024, warmup_steps=5,
                  val_fraction=0.15, eval_documents=3, sample_tokens=16)
    values.update(overrides)
    return RunSettings(**values)


def _run_cli(corpus: Path, out: Path, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "scratchlm", "run", "--corpus", str(corpus), "-o", str(out),
            "--minutes", "0.5", "--vocab-size", "512", "--context-length", "64",
            "--micro-batch-size", "8", "--global-batch-tokens", "1024"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


@pytest.mark.slow
def test_whole_chain_writes_every_artifact_and_rerun_skips(corpus, tmp_path):
    from scratchlm.data import read_manifest
    from scratchlm.model import load_model
    from scratchlm.tokenizer import Tokenizer

    out = tmp_path / "run"
    report = run_pipeline(_settings(corpus, out), progress=lambda message: None)

    tokenizer = Tokenizer.load(out / "tokenizer")
    assert tokenizer.vocab_size == 512 and tokenizer.eot_id is not None
    manifest = read_manifest(out / "data")
    assert manifest["vocab_size"] == 512 and manifest["splits"]["train"]["tokens"] > 0
    assert manifest["tokenizer_hash"] == tokenizer.fingerprint()
    assert list((out / "data").glob("train_*.bin")) and list((out / "data").glob("val_*.bin"))
    assert list((out / "train" / "checkpoints").glob("step_*"))
    model, loaded_tokenizer = load_model(out / "train" / "final")
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert report["params"] == sum(p.numel() for p in model.parameters())

    figures = json.loads((out / "report.json").read_text())
    for key in ("val_bpb", "gzip_bpb", "xz_bpb", "train_tokens_per_s", "params", "stage_seconds"):
        assert figures[key] is not None, key
    assert set(figures["stage_seconds"]) == set(STAGES)
    assert 0 < figures["xz_bpb"] < figures["gzip_bpb"] < 8
    assert 0 < figures["val_bpb"] < 12

    markdown = (out / "report.md").read_text()
    for heading in ("## Evaluation", "## Training", "## Model", "## Data", "## Tokenizer", "## Samples",
                    "## Time per stage", "## Hardware", "## Reproduce"):
        assert heading in markdown
    assert "(loss.png)" in markdown
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "loss.png").ndim == 3
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) >= 3 and all(isinstance(s["completion"], str) for s in samples)

    # Re-running the same settings skips every stage and keeps their records untouched.
    before = json.loads((out / "run.json").read_text())["stages"]
    messages: list[str] = []
    run_pipeline(_settings(corpus, out), progress=messages.append)
    assert [m for m in messages if m.startswith("==")] == [f"== {s}: done already, skipped" for s in STAGES]
    assert json.loads((out / "run.json").read_text())["stages"] == before


def test_other_settings_in_an_existing_run_directory_are_refused(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = {"settings": {**vars(_settings(corpus, out)), "preset": "small", "corpus": [str(corpus)]},
             "stages": {}}
    (out / "run.json").write_text(json.dumps(state))
    with pytest.raises(ScratchLMError, match="preset"):
        run_pipeline(_settings(corpus, out), progress=lambda message: None)


def test_missing_corpus_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scratchlm", "run", "--corpus", str(tmp_path / "nope.txt"),
                             "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("scratchlm: error:") and "nope.txt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _interrupt_during_training(corpus: Path, out: Path, sig: int) -> None:
    """Start the CLI, wait until training has written a checkpoint, then send `sig`."""
    proc = _run_cli(corpus, out, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list((out / "train" / "checkpoints").glob("step_*")):
            assert proc.poll() is None, f"run ended before training checkpointed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    state = json.loads((out / "run.json").read_text())["stages"]
    assert state["tokenizer"]["done"] and state["data"]["done"] and not state.get("train", {}).get("done")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_without_redoing_finished_stages(corpus, tmp_path, sig):
    out = tmp_path / "run"
    _interrupt_during_training(corpus, out, sig)
    tokenizer_files = {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer").iterdir()}

    proc = _run_cli(corpus, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "== tokenizer: done already, skipped" in output
    assert "== data: done already, skipped" in output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer").iterdir()} == tokenizer_files
    state = json.loads((out / "run.json").read_text())["stages"]
    assert all(state[s]["done"] for s in STAGES)
    assert (out / "report.md").exists() and (out / "train" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_named_corpus_is_downloaded_and_its_validation_file_held_out(tmp_path, monkeypatch):
    """`--corpus tinystories` against a local server that mimics the Hugging Face Hub."""
    import http.server
    import threading

    from scratchlm.data import read_manifest
    from scratchlm.data.hub import CORPORA
    from tests.conftest import shared_file
    from tests.test_data_hub import FakeHub

    corpus = CORPORA["tinystories"]
    train_file, val_file = corpus.files
    assert corpus.val_files == (val_file,)
    FakeHub.files = {
        f"{corpus.repo_id}/{train_file}": shared_file("corpora/tinystories_train_head.txt").read_bytes(),
        f"{corpus.repo_id}/{val_file}": shared_file("corpora/tinystories_valid_head.txt").read_bytes()[:60_000],
    }
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    try:
        out = tmp_path / "run"
        settings = RunSettings(corpus=("tinystories",), out_dir=str(out), minutes=0.05, vocab_size=400,
                               context_length=64, micro_batch_size=8, global_batch_tokens=512,
                               warmup_steps=2, eval_documents=5, sample_tokens=8)
        report = run_pipeline(settings, progress=lambda message: None)
    finally:
        server.shutdown()
        server.server_close()

    roles = {Path(s["input"]).name: s["role"] for s in read_manifest(out / "data")["sources"]}
    assert roles == {train_file: "train", val_file: "val"}
    assert (out / "downloads" / "tinystories" / train_file).exists()
    assert report["val_bpb"] is not None
