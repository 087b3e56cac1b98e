"""`scratchlm run` end to end on a tiny budget: artifacts, skipping finished stages, stale
stages run again, part of the chain (--stages, --skip), interrupts, the report in Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.pipeline import STAGES, RunSettings, run_pipeline
from scratchlm.pipeline.run import _Run
from tests.chromium import require_chromium, screenshot
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
    values = dict(corpus=(str(corpus),), out_dir=str(out), preset="tiny", minutes=0.1, sft_minutes=0.1,
                  vocab_size=512, context_length=128, micro_batch_size=8, global_batch_tokens=1024,
                  warmup_steps=5, val_fraction=0.15, eval_documents=3, sample_tokens=16, progress=False)
    values.update(overrides)
    return RunSettings(**values)


def _run_cli(corpus: Path, out: Path, stop_at: str | None = None, **popen) -> subprocess.Popen:
    launcher = ["-m", "tests.stop_at", stop_at, "--"] if stop_at else ["-m", "scratchlm"]
    args = [sys.executable, *launcher, "run", "--corpus", str(corpus), "-o", str(out),
            "--minutes", "0.5", "--sft-minutes", "0.05", "--vocab-size", "512", "--context-length", "128",
            "--micro-batch-size", "8", "--global-batch-tokens", "1024", "--no-progress"]
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


def write_preference_pairs(path: Path) -> Path:
    pairs = [{"instruction": f"Write a function that returns {i}.", "input": "",
              "chosen": f"def f():\n    return {i}\n", "rejected": "no"} for i in range(40)]
    path.write_text(json.dumps(pairs))
    return path


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A run made in two calls: first without SFT (the chain on the base model), then the whole
    chain with a DPO stage. Returns (run directory, each call's progress messages)."""
    where = tmp_path_factory.mktemp("chain")
    out = where / "run"
    calls: list[list[str]] = [[], []]
    run_pipeline(_settings(corpus, out, skip=("sft",)), progress=calls[0].append)
    first = json.loads((out / "report.json").read_text())
    pairs = write_preference_pairs(where / "pairs.json")
    run_pipeline(_settings(corpus, out, dpo_data=(str(pairs),), dpo_minutes=0.05), progress=calls[1].append)
    return out, calls, first


def _stage_lines(messages: list[str]) -> list[str]:
    return [m for m in messages if m.startswith("==")]


@pytest.mark.slow
def test_whole_chain_writes_every_artifact_and_rerun_skips(finished_run, corpus):
    from scratchlm.data import read_manifest
    from scratchlm.model import load_model
    from scratchlm.post.chat import CHATML, chat_format
    from scratchlm.tokenizer import Tokenizer

    out, (without_sft, with_dpo), first_report = finished_run
    # First call: the chain without SFT; eval and export are of the base model.
    assert _stage_lines(without_sft) == [f"== {s}" for s in STAGES if s not in ("sft", "dpo")]
    assert first_report["model_dir"] == str(out / "pretrain" / "final") and not first_report["chat"]
    # Second call: SFT and DPO run, and what reads the final model (eval, export) runs again.
    assert _stage_lines(with_dpo) == [*(f"== {s}: done already, skipped" for s in ("tokenizer", "data", "pretrain")),
                                      "== sft", "== dpo", "== eval", "== export", "== report"]

    tokenizer = Tokenizer.load(out / "tokenizer")
    assert tokenizer.vocab_size == 512 and tokenizer.eot_id is not None
    manifest = read_manifest(out / "data")
    assert manifest["tokenizer_hash"] == tokenizer.fingerprint() and manifest["splits"]["train"]["tokens"] > 0
    assert list((out / "pretrain" / "checkpoints").glob("step_*"))
    model, _ = load_model(out / "pretrain" / "final")

    # SFT trained on the pairs derived from the training files and held out those of the others.
    train_pairs = (out / "instructions" / "train.jsonl").read_text().splitlines()
    val_pairs = (out / "instructions" / "val.jsonl").read_text().splitlines()
    assert len(train_pairs) > 50 and val_pairs
    sft = json.loads((out / "sft" / "summary.json").read_text())
    assert sft["train_conversations"] == len(train_pairs) and sft["val_conversations"] == len(val_pairs)
    assert sft["val_loss"] < sft["base_val_loss"]
    _, chat_tokenizer = load_model(out / "dpo")
    assert chat_format(chat_tokenizer) == CHATML

    figures = json.loads((out / "report.json").read_text())
    assert figures["model_dir"] == str(out / "dpo") and figures["params"] == sum(p.numel() for p in model.parameters())
    for key in ("val_bpb", "gzip_bpb", "xz_bpb", "train_tokens_per_s", "params"):
        assert figures[key] is not None, key
    assert 0 < figures["xz_bpb"] < figures["gzip_bpb"] < 8 and 0 < figures["val_bpb"] < 12
    assert set(figures["stage_seconds"]) == set(STAGES)
    chat = figures["chat"]
    assert chat["sft_val_loss"] < chat["sft_base_val_loss"] and 0 <= chat["replies_ended"] <= 1
    assert 0 <= chat["val_preference_accuracy"] <= 1
    # The exports are of the final (DPO) model: its vocabulary has the chat tokens.
    hf_config = json.loads((out / "export" / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == chat_tokenizer.vocab_size
    assert (out / "export" / "model-f16.gguf").read_bytes()[:4] == b"GGUF"
    assert set(figures["export"]) >= {"export/hf/config.json", "export/hf/model.safetensors", "export/model-f16.gguf"}

    markdown = (out / "report.md").read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == ["## Data", "## Tokenizer", "## Model", "## Pretraining", "## Instruction tuning (SFT)",
                        "## Preference tuning (DPO)", "## Evaluation", "## Samples", "## Export", "## Time per stage",
                        "## Hardware", "## Reproduce and use"]
    for image in ("pretrain/loss.png", "sft/loss.png", "dpo/loss.png"):
        assert f"]({image})" in markdown and (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Not run: the corpus is code" in markdown  # the prose benchmarks say nothing about a code model
    assert f"scratchlm chat {out / 'dpo'}" in markdown and "llama-cli -m" in markdown
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples["continuations"]) == 4 and len(samples["answers"]) == min(3, len(val_pairs))
    assert all(answer["instruction"].startswith("Write ") for answer in samples["answers"])

    # Re-running the same settings skips every stage but the report and keeps their records.
    before = json.loads((out / "run.json").read_text())["stages"]
    messages: list[str] = []
    pairs = str(out.parent / "pairs.json")
    run_pipeline(_settings(corpus, out, dpo_data=(pairs,), dpo_minutes=0.05), progress=messages.append)
    assert _stage_lines(messages) == [f"== {s}: done already, skipped" for s in STAGES if s != "report"] + ["== report"]
    after = json.loads((out / "run.json").read_text())["stages"]
    assert {k: v for k, v in after.items() if k != "report"} == {k: v for k, v in before.items() if k != "report"}


@pytest.mark.slow
def test_the_report_page_shows_its_plots_in_chromium(finished_run, browser, tmp_path):
    require_chromium()
    from selenium.webdriver.common.by import By

    out = finished_run[0]
    page = (out / "report.html").read_text()
    assert "http://" not in page.split("</style>")[0] and 'src="data:image/png;base64,' in page  # self-contained
    browser.get((out / "report.html").as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 3  # pretraining, SFT and DPO curves
    for image in images:
        loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        assert loaded and loaded > 100, image.get_attribute("alt")
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert headings[0] == "Data" and headings[-1] == "Reproduce and use"
    evaluation = browser.find_element(By.XPATH, "//h2[.='Evaluation']/following-sibling::table[1]").text
    assert "bits per byte" in evaluation and "xz -9" in evaluation
    screenshot(browser, tmp_path / "report-page.png")


@pytest.mark.parametrize("overrides, message", [
    (dict(stages=("pretrain", "nosuch")), "--stages: unknown stage 'nosuch'; the stages are tokenizer, data"),
    (dict(skip=("sfft",)), "--skip: unknown stage 'sfft'"),
    (dict(stages=("dpo",)), "--stages dpo: DPO needs preference pairs: give --dpo-data FILE"),
    (dict(stages=("eval", "report")), "the eval stage needs pretrain, which has not run in"),
    (dict(skip=("data",)), "the pretrain stage needs data, which has not run"),
    (dict(sft_data=("/nonexistent/chat.jsonl",)), "/nonexistent/chat.jsonl: no such file"),
    (dict(sft_data=(__file__,)), "test_pipeline.py:1: invalid JSON"),
    (dict(dpo_data=(__file__,)), "test_pipeline.py:1: invalid JSON"),
    (dict(sft_minutes=0.0), "--sft-minutes: must be a number > 0"),
])
def test_part_of_the_chain_is_checked_before_anything_is_written(corpus, tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ScratchLMError, match=message):
        run_pipeline(_settings(corpus, out, **overrides), progress=lambda message: None)
    assert not out.exists()


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
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    state = json.loads((out / "run.json").read_text())["stages"]
    assert state["tokenizer"]["done"] and state["data"]["done"] and not state.get("pretrain", {}).get("done")


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
    assert all(state[s]["done"] for s in STAGES if s != "dpo") and "dpo" not in state
    assert (out / "report.html").exists() and (out / "sft" / "model.safetensors").exists()


@pytest.mark.slow
def test_named_corpus_is_downloaded_and_its_validation_file_held_out(tmp_path, monkeypatch):
    """`--corpus tinystories` against a local server that mimics the Hugging Face Hub: the
    prose path, where the benchmark suite is scored and SFT, without --sft-data, is skipped."""
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
                               warmup_steps=2, eval_documents=5, sample_tokens=8, progress=False,
                               suite_data=str(write_tiny_eval_data(tmp_path / "eval_data")), suite_limit=2)
        messages: list[str] = []
        report = run_pipeline(settings, progress=messages.append)

    roles = {Path(s["input"]).name: s["role"] for s in read_manifest(out / "data")["sources"]}
    assert roles == {train_file: "train", val_file: "val"}
    assert (out / "downloads" / "tinystories" / train_file).exists()
    assert report["val_bpb"] is not None
    assert any("sft skipped: no instruction data" in m and "give --sft-data FILE" in m for m in messages)
    assert report["model_dir"] == str(out / "pretrain" / "final") and report["suite"]["tasks"]["core"]
    markdown = (out / "report.md").read_text()
    assert "| task | items | score | chance |" in markdown and "| piqa (acc_norm) | 2 |" in markdown
    assert re.search(r"\| piqa \(acc_norm\) \| 2 \| [0-9.]+ \| 0.500 \|", markdown)  # two choices: chance 1/2


@pytest.mark.slow
def test_more_minutes_continue_training_and_overwrite_starts_over(corpus, tmp_path):
    out = tmp_path / "run"
    messages: list[str] = []
    run_pipeline(_settings(corpus, out, minutes=0.03, sft_minutes=0.02), progress=messages.append)
    first = json.loads((out / "run.json").read_text())["stages"]
    assert first["pretrain"]["minutes"] == 0.03

    # A larger budget: pretraining continues from its checkpoint; what reads its model runs again.
    messages.clear()
    run_pipeline(_settings(corpus, out, minutes=0.06, sft_minutes=0.02), progress=messages.append)
    assert messages[0].startswith("== pretrain: budget raised from 0.03 to 0.06 min")
    assert _stage_lines(messages[1:]) == ["== tokenizer: done already, skipped", "== data: done already, skipped",
                                      "== pretrain", "== sft", "== eval", "== export", "== report"]
    second = json.loads((out / "run.json").read_text())["stages"]
    assert second["pretrain"]["minutes"] == 0.06 and second["pretrain"]["steps"] > first["pretrain"]["steps"]
    assert second["pretrain"]["elapsed_s"] >= 0.06 * 60
    assert "pretrained 0.1 min" in (out / "report.md").read_text()

    # A smaller one cannot untrain: said, and the report keeps the truth.
    messages.clear()
    run_pipeline(_settings(corpus, out, minutes=0.03, sft_minutes=0.02), progress=messages.append)
    assert any("cannot shorten a finished run" in m for m in messages)
    assert json.loads((out / "run.json").read_text())["stages"]["pretrain"]["steps"] == second["pretrain"]["steps"]
    assert "pretrained 0.1 min" in (out / "report.md").read_text()

    # Other settings need --overwrite, which starts over and keeps files that are not the run's.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match="other settings: seed"):
        run_pipeline(_settings(corpus, out, minutes=0.03, seed=7), progress=messages.append)
    run_pipeline(_settings(corpus, out, minutes=0.03, seed=7, stages=("tokenizer", "data", "pretrain")),
                 progress=messages.append, overwrite=True)
    state = json.loads((out / "run.json").read_text())
    assert state["settings"]["seed"] == 7 and state["stages"]["pretrain"]["steps"] < second["pretrain"]["steps"]
    assert set(state["stages"]) == {"tokenizer", "data", "pretrain"}
    # Starting over removed the earlier run's later stages too: nothing stale is left to mistake.
    assert not (out / "sft").exists() and not (out / "export").exists() and not (out / "report.md").exists()
    assert (out / "notes.txt").read_text() == "mine"
