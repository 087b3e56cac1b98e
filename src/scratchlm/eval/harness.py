"""lm-evaluation-harness adapter: a scratchlm model directory as the harness's `--model scratchlm`.

    python -m scratchlm.eval.harness --model scratchlm --model_args path=runs/x/pretrain/final \\
        --tasks hellaswag --batch_size 32 --device cpu

    import lm_eval, scratchlm.eval.harness  # registers "scratchlm"
    lm_eval.simple_evaluate(model="scratchlm", model_args={"path": "runs/x/pretrain/final"}, tasks=[...])

Any of the harness's tasks then runs on our model, with our scorer, without exporting it.
lm-eval 0.4.13 finds models only in its own registry (its CLI reads no entry points), so
`python -m scratchlm.eval.harness` registers the model and then runs the harness's own CLI,
arguments unchanged. lm-eval is the optional extra `eval` (`pip install 'scratchlm[eval]'`).

model_args: `path=MODEL_DIR` (required), `batch_size=N` (continuations per forward pass, 32),
`device=auto|cpu|cuda|cuda:N|mps` (auto), `max_gen_toks=N` (generation's default length, 256,
as the harness's HF model). The harness's own --batch_size and --device apply when model_args
do not name them; model_args win, because its CLI passes those flags with their defaults
(batch size 1, device cuda:0) whether or not they were given. Like the harness's HF model, a
--device that is not available here means auto.

The three request types:
  loglikelihood          (context, continuation) pairs, all of a task's at once through
                         scoring.loglikelihoods: the harness's `_encode_pair` token boundaries
                         after <|endoftext|> (its HF model with add_bos_token), and the choices of
                         one question share their context in the batch.
  loglikelihood_rolling  a whole text, in the harness's own rolling windows
                         (get_rolling_token_windows + make_disjoint_window, prefix <|endoftext|>,
                         windows of the model's context), scored through scoring.score_tokens.
  generate_until         generation.generate_until: greedy unless do_sample, stopping at `until`,
                         <|endoftext|> or max_gen_toks (the harness's own kwarg normalisation).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from scratchlm.errors import ScratchLMError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "lm_eval":
        raise  # lm-eval is there but one of its dependencies is not: its own error says which
    raise ScratchLMError("scratchlm.eval.harness needs lm-evaluation-harness: pip install 'scratchlm[eval]'") from None

MODEL_ARGS = ("path", "batch_size", "device", "max_gen_toks")
GENERATION_ARGS = ("until", "max_gen_toks", "do_sample", "temperature")


class ScratchLM(LM):
    """A scratchlm model directory behind lm-eval's LM interface (module docstring)."""

    def __init__(self, path: str | None = None, batch_size: int | str = 32, device: str = "auto",
                 max_gen_toks: int | str = 256, max_batch_size: int | None = None, **unknown: Any) -> None:
        # max_batch_size only bounds the harness's `--batch_size auto`, which is refused below.
        super().__init__()
        if unknown:
            raise ScratchLMError(f"--model scratchlm: unknown model argument(s) {', '.join(sorted(unknown))} "
                                 f"(valid: {', '.join(MODEL_ARGS)})")
        if path is None:
            raise ScratchLMError("--model scratchlm needs --model_args path=MODEL_DIR")
        from scratchlm.model.directory import load_model
        from scratchlm.model.onednn import route_linears_through_onednn

        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._device = _device(device)
        self.model, self.tokenizer = load_model(str(path), device=self._device)
        route_linears_through_onednn(self.model)  # the harness only scores and generates

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ScratchLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> ScratchLM:
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" in harness:
            harness["device"] = _harness_device(str(harness["device"]))
        return cls(**{**harness, **arg_dict})  # model_args win (module docstring)

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from scratchlm.eval.scoring import loglikelihoods

        pairs = [tuple(request.args) for request in requests]
        # All at once, not in the harness's chunks: the scorer batches choices sharing a context.
        scores = loglikelihoods(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                                progress=not disable_tqdm)
        results = [(score.loglikelihood, score.is_greedy) for score in scores]
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from scratchlm.eval.scoring import score_tokens

        prefix = self.tokenizer.eot_id
        if prefix is None:
            raise ScratchLMError("loglikelihood_rolling needs a tokenizer with <|endoftext|> (the first "
                                 "token is predicted from it)")
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tokenizer.encode_ordinary(text)
            for window in get_rolling_token_windows(tokens, prefix_token=prefix,
                                                    max_seq_len=self.model.config.context_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, score_tokens(self.model, windows, batch_size=self.batch_size,
                                                     progress=not disable_tqdm)):
            totals[owner] += score.loglikelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(request.args), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm

        from scratchlm.eval.generation import generate_until

        outputs = []
        for request in tqdm(requests, desc="generating", file=sys.stderr, disable=disable_tqdm):
            context, gen_kwargs = request.args
            # The harness's own normalisation: max_new_tokens and the other aliases, a single
            # `until` string, temperature 0 unless do_sample.
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            unsupported = sorted(set(kwargs) - set(GENERATION_ARGS))
            if unsupported:
                raise ScratchLMError(f"--model scratchlm: generation argument(s) {', '.join(unsupported)} not "
                                     f"supported (supported: {', '.join(GENERATION_ARGS)})")
            temperature = float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0
            # generator=None: sampling draws from torch's global generator, which the harness
            # seeds (its --seed), so sampled runs repeat.
            text = generate_until(self.model, self.tokenizer, context, stop=kwargs["until"],
                                  max_new_tokens=kwargs["max_gen_toks"], temperature=temperature)
            self.cache_hook.add_partial("generate_until", tuple(request.args), text)
            outputs.append(text)
        return outputs


# --------------------------------------------------------------------------- arguments
def _positive_int(value: int | str, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        automatic = name == "batch_size" and str(value).startswith("auto")
        hint = " (the harness's automatic batch size is not supported: give a number)" if automatic else ""
        raise ScratchLMError(f"--model scratchlm: {name} must be a positive integer, got {value!r}{hint}")
    return value


def _device(name: str) -> torch.device:
    from scratchlm.train.distributed import pick_device

    kind, _, index = str(name).partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise ScratchLMError(f"--model scratchlm: device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return pick_device(kind, int(index or 0))


def _harness_device(name: str) -> str:
    """The harness's --device (cuda:0 unless given): an unavailable one means auto, as in its HF model."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return name if available.get(name.partition(":")[0], True) else "auto"


# --------------------------------------------------------------------------- command line
def main() -> int:
    """The harness's own CLI (`lm_eval ARGS`) with `--model scratchlm` registered."""
    from lm_eval.__main__ import cli_evaluate

    import scratchlm.eval.harness  # noqa: F401  (registers the model when this file runs as __main__)

    try:
        cli_evaluate()
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return 1
    return 0


# Registered by the importable module only: under `python -m` this file also runs as __main__,
# and a second ScratchLM class under the same name would collide in the harness's registry.
if __name__ == "__main__":
    sys.exit(main())
else:
    register_model("scratchlm")(ScratchLM)
