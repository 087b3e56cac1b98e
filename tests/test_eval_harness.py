"""The lm-evaluation-harness adapter (`--model scratchlm`): the harness's own HellaSwag task through
it scores item for item as `scratchlm eval` does; rolling log-likelihoods equal a direct
computation of the harness's windows; generation stops at `until`; bad arguments are one-line
errors. Offline throughout: the task reads the shared HellaSwag file (benchmarks/lm_eval_tasks),
and the Hugging Face caches point into a temporary directory."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import save_model
from scratchlm.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT, shared_file

pytest.importorskip("lm_eval")

TASKS_DIR = REPO_ROOT / "benchmarks" / "lm_eval_tasks"
ITEMS = 40
BATCH = 8


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    values = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
              "HF_DATASETS_CACHE": str(home / "datasets")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random model on GPT-2's tokenizer (realistic token boundaries); every weight is
    perturbed so the log-likelihoods of the choices are well apart."""
    tokenizer = Tokenizer.from_gpt2(shared_file("tokenizers/gpt2/encoder.json"),
                                    shared_file("tokenizers/gpt2/vocab.bpe"))
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=128, d_model=64,
                                     n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(tmp_path_factory.mktemp("model") / "m", model, tokenizer)


@pytest.fixture(scope="module")
def adapter(model_dir, offline):
    from scratchlm.eval.harness import ScratchLM

    return ScratchLM(path=str(model_dir), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def both_runs(model_dir, offline, tmp_path_factory):
    """The first ITEMS HellaSwag items through `scratchlm eval` and through the harness."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import scratchlm.eval.harness  # noqa: F401  (registers --model scratchlm)
    from scratchlm.eval.suite import evaluate

    data = shared_file("eval/hellaswag_val_1k.jsonl")
    logs = tmp_path_factory.mktemp("logs") / "samples.jsonl"
    ours = evaluate(model_dir, "hellaswag", data_dir=data.parent, limit=ITEMS, batch_size=BATCH, log_samples=logs,
                    progress=False, update_model_dir=False)
    # The harness's default task index holds thousands of YAML files: only the local one is read.
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"hellaswag_file": str(data)})
    theirs = lm_eval.simple_evaluate(model="scratchlm", model_args={"path": str(model_dir), "batch_size": BATCH},
                                     tasks=["hellaswag_local"], task_manager=tasks, limit=ITEMS, log_samples=True,
                                     bootstrap_iters=0)
    records = [json.loads(line) for line in logs.read_text(encoding="utf-8").splitlines()]
    return ours["tasks"]["hellaswag"], records, theirs["results"]["hellaswag_local"], \
        sorted(theirs["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])


# --------------------------------------------------------------------------- the harness's task
def test_harness_prompts_are_ours_item_by_item(both_runs):
    _, records, _, samples = both_runs
    assert len(samples) == len(records) == ITEMS
    for record, sample in zip(records, samples):
        assert [tuple(pair) for pair in sample["arguments"]] == [(record["prompt"], c) for c in record["choices"]]
        assert sample["target"] == record["gold"]


def test_harness_scores_and_accuracy_equal_scratchlm_eval(both_runs):
    metrics, records, results, samples = both_runs
    for record, sample in zip(records, samples):
        harness_lls = [ll for ll, _ in sample["filtered_resps"]]
        assert harness_lls == pytest.approx(record["loglikelihoods"], rel=1e-5, abs=1e-5)
        assert sample["acc"] == float(record["correct"])
        # acc_norm divides by the length of the choice string (its leading space is the delimiter).
        normalised = [ll / (len(c) - 1) for ll, c in zip(record["loglikelihoods"], record["choices"])]
        assert sample["acc_norm"] == float(normalised.index(max(normalised)) == record["gold"])
    assert results["acc,none"] == metrics["acc"]
    assert results["acc_norm,none"] == metrics["acc_norm"]
    assert results["sample_len"] == metrics["n"] == ITEMS


# --------------------------------------------------------------------------- rolling, generation
def _direct_rolling(model, ids: list[int], eot: int, window: int) -> float:
    """Each token predicted once, from at most `window` inputs; every window after the first
    predicts up to `window` new tokens from a full window of inputs (the harness's scheme)."""
    inputs, total, done = [eot] + ids, 0.0, 0
    while done < len(ids):
        end = min(len(ids), done + window)
        start = max(0, end - window)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs[start:end]])).float(), dim=-1)[0]
        targets = torch.tensor(ids[done:end])
        total += float(logp[done - start:].gather(1, targets[:, None]).sum())
        done = end
    return total


def test_loglikelihood_rolling_equals_direct_computation(adapter):
    from lm_eval.api.instance import Instance

    text = shared_file("corpora/tinystories_valid_head.txt").read_text(encoding="utf-8")[:2500]
    texts = [text, text[:200], "Hello", ""]
    ids = [adapter.tokenizer.encode_ordinary(t) for t in texts]
    assert len(ids[0]) > 3 * adapter.model.config.context_length  # several windows, a partial last one
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = adapter.loglikelihood_rolling(requests, disable_tqdm=True)
    expected = [_direct_rolling(adapter.model, i, adapter.tokenizer.eot_id, adapter.model.config.context_length)
                for i in ids]
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[-1] == 0.0


def test_generate_until_stops_at_until(adapter):
    from lm_eval.api.instance import Instance

    from scratchlm.eval.generation import generate_until

    prompt = "Once upon a time"

    def run(gen_kwargs):
        return adapter.generate_until([Instance("generate_until", {}, (prompt, gen_kwargs), 0)], disable_tqdm=True)[0]

    free = run({"until": [], "max_gen_toks": 24, "do_sample": False})
    assert free == generate_until(adapter.model, adapter.tokenizer, prompt, max_new_tokens=24)
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop and run({"until": ["\x00never", stop], "max_gen_toks": 24}) == free[:free.find(stop)]
    # A single string, and the harness's alias max_new_tokens; temperature without do_sample is greedy.
    assert run({"until": stop, "max_new_tokens": 24, "temperature": 0.0}) == free[:free.find(stop)]
    assert run({"until": [], "max_gen_toks": 24, "do_sample": False, "temperature": 0.9}) == free
    with pytest.raises(ScratchLMError, match="generation argument.*top_p not supported"):
        run({"until": [], "top_p": 0.9})


# --------------------------------------------------------------------------- arguments, import
def test_model_args_win_over_the_harness_flags(model_dir, offline):
    from scratchlm.eval.harness import ScratchLM

    # The harness's CLI always passes its --batch_size (default 1) and --device (default cuda:0).
    lm = ScratchLM.create_from_arg_string(f"path={model_dir},batch_size=3", {"batch_size": 1, "device": "cuda:0"})
    assert lm.batch_size == 3
    assert lm.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert ScratchLM.create_from_arg_obj({"path": str(model_dir)}, {"batch_size": 5, "max_batch_size": 64}).batch_size == 5


@pytest.mark.parametrize("args, message", [
    ("batch_size=auto", "batch_size must be a positive integer, got 'auto'"),
    ("max_gen_toks=0", "max_gen_toks must be a positive integer"),
    ("device=tpu", "device 'tpu' is not one of"),
    ("pretrained=gpt2", r"unknown model argument\(s\) pretrained \(valid: path, batch_size"),
])
def test_bad_model_args_are_one_line_errors(model_dir, offline, args, message):
    from scratchlm.eval.harness import ScratchLM

    with pytest.raises(ScratchLMError, match=message):
        ScratchLM.create_from_arg_string(f"path={model_dir},{args}")


def test_a_model_directory_is_required(offline):
    from scratchlm.eval.harness import ScratchLM

    with pytest.raises(ScratchLMError, match="needs --model_args path=MODEL_DIR"):
        ScratchLM.create_from_arg_string("batch_size=2")


def test_import_without_lm_eval_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("lm_eval.")] + ["scratchlm.eval.harness"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # None in sys.modules: "not installed"
    with pytest.raises(ScratchLMError, match=r"pip install 'scratchlm\[eval\]'"):
        importlib.import_module("scratchlm.eval.harness")


def test_documented_command_runs_the_harness_cli(model_dir, offline, tmp_path):
    """`python -m scratchlm.eval.harness` is lm_eval's CLI with --model scratchlm registered."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "scratchlm.eval.harness", "--model", "scratchlm", "--model_args",
               f"path={model_dir}", "--tasks", "hellaswag_local", "--include_path", str(TASKS_DIR),
               "--metadata", f'{{"hellaswag_file": "{shared_file("eval/hellaswag_val_1k.jsonl")}"}}',
               "--limit", "2", "--batch_size", "4", "--output_path", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hellaswag_local" in done.stdout and "acc_norm" in done.stdout
    assert list(out.rglob("results_*.json"))


def test_command_line_errors_are_one_line(monkeypatch, capsys):
    import lm_eval.__main__

    from scratchlm.eval import harness

    def fail():
        raise ScratchLMError("--model scratchlm: batch_size must be a positive integer, got 0")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fail)
    assert harness.main() == 1
    assert capsys.readouterr().err == "scratchlm: error: --model scratchlm: batch_size must be a positive integer, got 0\n"
