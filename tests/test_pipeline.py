"""`scratchlm run` end to end on a tiny budget: artifacts, skipping finished stages, interrupts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.pipeline import STAGES, RunSettings, _Run, run_pipeline
from tests.conftest import REPO_ROOT
from tests.stop_at import wait_until_stopped

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


def _run_cli(corpus: Path, out: Path, stop_at: str | None = None, **popen) -> subprocess.Popen:
    launcher = ["-m", "tests.stop_at", stop_at, "--"] if stop_at else ["-m", "scratchlm"]
    args = [sys.executable, *launcher, "run", "--corpus", str(corpus), "-o", str(out),
            "--minutes", "0.5", "--vocab-size", "512", "--context-length", "64",
            "--micro-batch-size", "8", "--global-batch-tokens", "1024"]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO_ROOT, **popen)


def write_tiny_eval_data(directory: Path) -> Path:
    """Three items of each `core` task in scratchlm eval's layout (scratchlm.eval.datasets)."""
    directory.mkdir()
    lines = {
        "hellaswag_val.jsonl": [{"activity_label": "Cooking", "ctx_a": f"A man cuts onion {i}.", "ctx_b": "he",
                                 "endings": ["fries it.", "sings.", "flies.", "sleeps."], "label": i % 4}
                                for i in range(3)],
        "arc_easy.jsonl": [{"query": f"Question: What is {i}+1?", "choices": [str(i + 1), "7", "9"], "gold": 0}
                           for i in range(3)],
        "piqa.jsonl": [{"query": f"Question: Open jar {i}\n", "choices": ["twist the lid", "eat the lid"], "gold": 0}
                       for i in range(3)],
        "winogrande.jsonl": [{"context_options": [f"Ann helped Bo {i} so Ann", f"Ann helped Bo {i} so Bo"],
                              "continuation": "said thanks.", "gold": 1} for i in range(3)],
    }
    lines["arc_challenge.jsonl"] = lines["arc_easy.jsonl"]
    for name, records in lines.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "mmlu" / "dev").mkdir(parents=True)
    (directory / "mmlu" / "dev" / "arithmetic_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n" + "".join(f"{i}+1?,{i + 1},0,5,9,0\n" for i in range(3)))
    return directory


@pytest.mark.slow
def test_whole_chain_writes_every_artifact_and_rerun_skips(corpus, tmp_path, monkeypatch):
    from scratchlm.data import read_manifest
    from scratchlm.model import load_model
    from scratchlm.tokenizer import Tokenizer

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))  # no benchmark files there
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
    # Without benchmark files the suite is skipped, said so in the report, and not done.
    assert "## Benchmarks" in markdown and "Not run: no task files for hellaswag" in markdown

    # Given task files, a re-run scores the suite and skips everything else.
    data = write_tiny_eval_data(tmp_path / "eval_data")
    messages: list[str] = []
    run_pipeline(_settings(corpus, out, suite_data=str(data), suite_limit=2), progress=messages.append)
    assert [m for m in messages if m.startswith("==")] == [
        f"== {s}" if s == "suite" else f"== {s}: done already, skipped" for s in STAGES]
    markdown = (out / "report.md").read_text()
    assert "| core | - | centered accuracy |" in markdown and "| hellaswag | 2 | acc_norm |" in markdown
    assert json.loads((out / "train" / "final" / "eval.json").read_text())["tasks"]["core"]

    # Re-running the same settings skips every stage and keeps their records untouched.
    before = json.loads((out / "run.json").read_text())["stages"]
    messages = []
    run_pipeline(_settings(corpus, out, suite_data=str(data), suite_limit=2), progress=messages.append)
    assert [m for m in messages if m.startswith("==")] == [f"== {s}: done already, skipped" for s in STAGES]
    assert json.loads((out / "run.json").read_text())["stages"] == before


def test_other_settings_in_an_existing_run_directory_are_refused(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = {"settings": {**vars(_settings(corpus, out)), "preset": "small", "corpus": [str(corpus)]},
             "stages": {"tokenizer": {"done": True}}}
    (out / "run.json").write_text(json.dumps(state))
    with pytest.raises(ScratchLMError, match="preset.*--overwrite"):
        run_pipeline(_settings(corpus, out), progress=lambda message: None)


@pytest.mark.parametrize("overrides, message", [
    (dict(preset="nosuch"), "unknown preset 'nosuch'"),
    (dict(lr=-1.0), "--lr: must be a number > 0"),
    (dict(minutes=float("inf")), "--minutes: must be a number > 0, got inf"),
    (dict(seed=-1), "--seed: must be between 0 and 2"),
    (dict(vocab_size=10), "--vocab-size: must be at least 257"),
    (dict(minutes=0.0), "--minutes: must be a number > 0"),
    (dict(global_batch_tokens=1000), "--global-batch-tokens: 1000 is not a multiple"),
    (dict(context_length=0), "--context-length: must be at least 1"),
    (dict(device="cuda"), "cuda requested"),
    (dict(val_corpus=("/nonexistent/val.txt",)), "input not found: /nonexistent/val.txt"),
])
def test_every_setting_is_checked_before_anything_is_written(corpus, tmp_path, overrides, message):
    if overrides.get("device") == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    with pytest.raises(ScratchLMError, match=message):
        run_pipeline(_settings(corpus, out, **overrides), progress=lambda message: None)
    assert not out.exists()


def test_a_mistyped_command_line_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    for args, code, message in ((["--lr", "-1"], 1, "--lr: must be a number > 0"),
                                (["--vocab-size", "10"], 1, "--vocab-size"),
                                (["--preset", "nosuch"], 2, "invalid choice: 'nosuch'")):
        result = subprocess.run([sys.executable, "-m", "scratchlm", "run", "-o", str(out), *args],
                                capture_output=True, text=True)
        assert result.returncode == code and message in result.stderr
        assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
        assert not out.exists()


def test_a_directory_where_no_stage_finished_is_not_protected(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    state = {"settings": {**vars(_settings(corpus, out)), "preset": "small"}, "stages": {"tokenizer": {}}}
    (out / "run.json").write_text(json.dumps(state))
    run = _Run(_settings(corpus, out), progress=lambda message: None)
    assert run.state["settings"]["preset"] == "tiny" and run.state["stages"] == {}


def test_a_directory_holding_other_files_needs_overwrite(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match="holds no run.*--overwrite"):
        run_pipeline(_settings(corpus, out), progress=lambda message: None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_missing_corpus_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scratchlm", "run", "--corpus", str(tmp_path / "nope.txt"),
                             "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("scratchlm: error:") and "nope.txt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _interrupt_during_training(corpus: Path, out: Path, sig: int) -> None:
    """Start the CLI, which stops itself once training has written its first checkpoint
    (tests.stop_at), then send `sig` there: the interrupt lands at the same point every time."""
    proc = _run_cli(corpus, out, stop_at="after-checkpoint", start_new_session=True)
    try:
        wait_until_stopped(proc)
        os.killpg(proc.pid, sig)
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGINT once it runs
        proc.communicate()
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
    # Every stage done but the benchmark suite, which has no task files here (skipped, not done).
    assert all(state[s]["done"] for s in STAGES if s != "suite") and "skipped" in state["suite"]
    assert (out / "report.md").exists() and (out / "train" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_named_corpus_is_downloaded_and_its_validation_file_held_out(tmp_path, monkeypatch):
    """`--corpus tinystories` against a local server that mimics the Hugging Face Hub."""
    from scratchlm.data import read_manifest
    from scratchlm.data.hub import CORPORA
    from tests.conftest import shared_file
    from tests.fake_hub import serving

    corpus = CORPORA["tinystories"]
    train_file, val_file = corpus.files
    assert corpus.val_files == (val_file,)
    files = {
        f"{corpus.repo_id}/{train_file}": shared_file("corpora/tinystories_train_head.txt").read_bytes(),
        f"{corpus.repo_id}/{val_file}": shared_file("corpora/tinystories_valid_head.txt").read_bytes()[:60_000],
    }
    with serving(files, monkeypatch, tmp_path / "hf_home"):
        out = tmp_path / "run"
        settings = RunSettings(corpus=("tinystories",), out_dir=str(out), minutes=0.05, vocab_size=400,
                               context_length=64, micro_batch_size=8, global_batch_tokens=512,
                               warmup_steps=2, eval_documents=5, sample_tokens=8)
        report = run_pipeline(settings, progress=lambda message: None)

    roles = {Path(s["input"]).name: s["role"] for s in read_manifest(out / "data")["sources"]}
    assert roles == {train_file: "train", val_file: "val"}
    assert (out / "downloads" / "tinystories" / train_file).exists()
    assert report["val_bpb"] is not None


@pytest.mark.slow
def test_more_minutes_continue_training_and_overwrite_starts_over(corpus, tmp_path):
    out = tmp_path / "run"
    messages: list[str] = []
    run_pipeline(_settings(corpus, out, minutes=0.03), progress=messages.append)
    first = json.loads((out / "run.json").read_text())["stages"]
    assert first["train"]["minutes"] == 0.03

    # A larger budget: training continues from its checkpoint, eval and samples are redone.
    messages.clear()
    run_pipeline(_settings(corpus, out, minutes=0.06), progress=messages.append)
    assert any("budget raised from 0.03 to 0.06 min" in m for m in messages)
    assert "== tokenizer: done already, skipped" in messages and "== eval" in messages
    second = json.loads((out / "run.json").read_text())["stages"]
    assert second["train"]["minutes"] == 0.06 and second["train"]["steps"] > first["train"]["steps"]
    assert second["train"]["elapsed_s"] >= 0.06 * 60
    assert "trained 0.1 min" in (out / "report.md").read_text()

    # A smaller one cannot untrain: said, and the report keeps the truth.
    messages.clear()
    run_pipeline(_settings(corpus, out, minutes=0.03), progress=messages.append)
    assert any("cannot shorten a finished run" in m for m in messages)
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["steps"] == second["train"]["steps"]
    assert "trained 0.1 min" in (out / "report.md").read_text()

    # Other settings need --overwrite, which starts over and keeps files that are not the run's.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match="other settings: seed"):
        run_pipeline(_settings(corpus, out, minutes=0.03, seed=7), progress=messages.append)
    run_pipeline(_settings(corpus, out, minutes=0.03, seed=7), progress=messages.append, overwrite=True)
    state = json.loads((out / "run.json").read_text())
    assert state["settings"]["seed"] == 7 and state["stages"]["train"]["steps"] < second["train"]["steps"]
    assert (out / "notes.txt").read_text() == "mine"
