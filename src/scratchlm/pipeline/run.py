"""`scratchlm run`: raw text to an evaluated, instruction-tuned, exported model, in one command.

The job is a fixed chain of stages, each writing into its own place in the run directory:

    tokenizer -> data -> pretrain -> sft -> [dpo] -> eval -> export -> report

`run.json` records the settings the run was created with and, per stage, when it finished,
how long it took and what it measured. Every setting is checked before any stage writes.
Re-running the same command skips every finished stage; an interrupted stage starts again
(tokenizer, data: they write atomically, so nothing half-done is ever mistaken for done) or
resumes (pretrain, sft, dpo: from their last checkpoint). A stage that finishes makes the
stages after it stale, and a stage whose inputs changed (the model it evaluates, the suite's
task files) runs again. A larger `--minutes` continues pretraining from the last checkpoint
with the schedule re-planned for the new budget, then redoes what follows; a smaller one
changes nothing (a run cannot be untrained). `--stages` and `--skip` run part of the chain.

SFT data: `--sft-data FILE...` (any format `scratchlm sft` reads), or, by default, pairs
derived from the corpus itself (scratchlm.post.code_instructions: a documented function's
docstring asks for it, its body answers), the held-out pairs from the held-out files. A
prose corpus without --sft-data has no instruction data: SFT is skipped, and said so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_write_json, check_output_directory, make_directory, remove_outputs
from scratchlm.pipeline.report import closing_message

STAGES = ("tokenizer", "data", "pretrain", "sft", "dpo", "eval", "export", "report")
OPTIONAL_STAGES = {"dpo"}  # in the chain only when asked for (--dpo-data)
# What each stage reads: it runs only when these are done or run before it in the same call.
NEEDS = {"tokenizer": (), "data": ("tokenizer",), "pretrain": ("data",), "sft": ("pretrain",), "dpo": ("sft",),
         "eval": ("pretrain",), "export": ("pretrain",), "report": ()}

# Prompts for the closing samples, by the kind of text the model was trained on (the data
# stage records each source's filter profile).
SAMPLE_PROMPTS = {
    "code": ("def ", "import ", "class ", "    return "),
    "prose": ("Once upon a time", "The ", "She said", "\n"),
}
SAMPLE_INSTRUCTIONS = 3  # held-out instructions answered by the base and the chat model in the report


@dataclass
class RunSettings:
    """Everything that determines what a run produces (recorded in run.json)."""

    corpus: tuple[str, ...] = ("stdlib",)
    val_corpus: tuple[str, ...] = ()
    preset: str = "tiny"
    minutes: float = 5.0  # pretraining budget (wall clock)
    sft_minutes: float = 2.5
    sft_data: tuple[str, ...] = ()  # conversation files; default: pairs derived from the corpus
    dpo_data: tuple[str, ...] = ()  # preference pairs; none: no DPO stage
    dpo_minutes: float = 1.5
    stages: tuple[str, ...] = ()  # run only these (default: the whole chain)
    skip: tuple[str, ...] = ()  # run the chain without these
    out_dir: str = ""  # default: runs/<name of the first corpus>
    vocab_size: int = 2048
    context_length: int = 256
    tokenizer_sample_mb: float = 4.0  # BPE is trained on at most this much of the corpus
    val_fraction: float = 0.03  # ~20 stdlib files held out: enough bytes for a stable estimate
    split_by_position: bool = False  # val = the last val_fraction of the text (one long document)
    # Small batches and a high learning rate: a ~1M-parameter model on a CPU budget learns far
    # more per token from many small steps than from few large ones (docs/LOG.md, 2026-11-21).
    micro_batch_size: int = 16
    global_batch_tokens: int = 4096
    lr: float = 2e-3
    warmup_steps: int = 20
    eval_documents: int = 400  # held-out documents scored at the end (the first N)
    # The benchmark suite (`scratchlm eval --tasks core`) on task files in this directory ("":
    # the download cache of `scratchlm eval`, when it holds them; a run never downloads them).
    suite_data: str = ""
    suite_limit: int = 200  # items per task (per subject for MMLU)
    sample_tokens: int = 120
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    progress: bool = True  # progress bars on stderr

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        name = Path(self.corpus[0].rstrip("/")).stem or "run"
        return Path("runs") / name

    def validate(self) -> None:
        """Check every setting before anything is written (a typo must not cost a tokenizer
        and a data stage first): numbers in range, the preset, the model shape, the batch
        arithmetic, the device, the inputs."""
        from scratchlm.data.hub import CORPORA
        from scratchlm.model import PRESETS, ModelConfig
        from scratchlm.sources import resolve_input
        from scratchlm.train.config import check_seed
        from scratchlm.train.distributed import pick_device

        if not self.corpus:
            raise ScratchLMError("--corpus: give at least one corpus")
        for spec in (*self.corpus, *self.val_corpus):
            if spec not in CORPORA:
                resolve_input(spec)
        if self.preset not in PRESETS:
            raise ScratchLMError(f"--preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for name in ("minutes", "sft_minutes", "dpo_minutes", "lr", "tokenizer_sample_mb"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ScratchLMError(f"--{name.replace('_', '-')}: must be a number > 0, got {value!r}")
        check_seed(self.seed, "--seed")
        for name, low in (("micro_batch_size", 1), ("global_batch_tokens", 1), ("context_length", 1),
                          ("eval_documents", 1), ("warmup_steps", 0), ("sample_tokens", 0),
                          ("suite_limit", 1)):
            if getattr(self, name) < low:
                raise ScratchLMError(f"--{name.replace('_', '-')}: must be at least {low}, got {getattr(self, name)!r}")
        if self.vocab_size < 257:
            raise ScratchLMError(f"--vocab-size: must be at least 257 (256 bytes + <|endoftext|>), "
                                 f"got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ScratchLMError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.split_by_position and self.val_corpus:
            raise ScratchLMError("--split-by-position and --val-corpus exclude each other")
        ModelConfig.from_preset(self.preset, vocab_size=self.vocab_size, context_length=self.context_length)
        per_step = self.micro_batch_size * self.context_length
        if self.global_batch_tokens % per_step:
            raise ScratchLMError(f"--global-batch-tokens: {self.global_batch_tokens} is not a multiple of "
                                 f"--micro-batch-size x --context-length = {per_step}")
        pick_device(self.device)
        for path in (*self.sft_data, *self.dpo_data):
            if not Path(path).is_file():
                raise ScratchLMError(f"{path}: no such file (--sft-data/--dpo-data take files)")
        # Read now, not after minutes of pretraining: a malformed record is reported at once.
        from scratchlm.post.formats import read_preference_file, read_sft_file

        for path in self.sft_data:
            read_sft_file(path)
        for path in self.dpo_data:
            read_preference_file(path)
        chain = self.chain()
        if "export" in chain and importlib.util.find_spec("gguf") is None:  # it writes a GGUF file
            raise ScratchLMError("the export stage needs the gguf package: pip install 'scratchlm[export]', "
                                 "or --skip export")

    def chain(self) -> list[str]:
        """The stages this invocation runs, in order, after checking --stages and --skip."""
        for option, names in (("--stages", self.stages), ("--skip", self.skip)):
            unknown = [name for name in names if name not in STAGES]
            if unknown:
                raise ScratchLMError(f"{option}: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
        if "dpo" in self.stages and not self.dpo_data:
            raise ScratchLMError("--stages dpo: DPO needs preference pairs: give --dpo-data FILE")
        wanted = [st for st in STAGES if st not in OPTIONAL_STAGES or self.dpo_data]
        return [st for st in wanted if (not self.stages or st in self.stages) and st not in self.skip]


# Settings that may change between invocations of the same run without invalidating it.
# (A stage that depends on one of them records what it used and runs again when it changes.)
_MAY_CHANGE = {"out_dir", "device", "minutes", "progress", "suite_data", "suite_limit", "stages", "skip",
               "dpo_data", "dpo_minutes"}
# Files the run writes at the top of its directory; its stages' directories are removed by
# their own owners (only their outputs). Downloads are kept: a cache of public corpora,
# expensive to fetch again.
RUN_FILES = ("run.json", "samples.json", "report.md", "report.json", "report.html")
INSTRUCTIONS = "instructions"  # the SFT pairs derived from the corpus: train.jsonl, val.jsonl
EXPORT, GGUF_FILE = "export", "model-f16.gguf"  # export/hf/ and export/model-f16.gguf


class _Run:
    def __init__(self, settings: RunSettings, progress: Callable[[str], None], overwrite: bool = False):
        settings.validate()
        self.settings = settings
        self.dir = check_output_directory(settings.resolved_out_dir(), overwrite=True, what="run")
        self.say = progress
        self.state_path = self.dir / "run.json"
        if overwrite:
            self._start_over()
        self.state = self._load_state(may_hold_other_files=overwrite)
        self.resuming = False  # whether the running stage started on the same inputs before

    # ------------------------------------------------------------------ state
    def _start_over(self) -> None:
        """Remove what an earlier run wrote here (its files only, never the user's)."""
        from scratchlm.data.finalize import remove_data_directory
        from scratchlm.post.finetune import remove_finetune_run
        from scratchlm.tokenizer import TOKENIZER_FILES
        from scratchlm.train.loop import remove_training_run

        remove_outputs(self.dir / "tokenizer", TOKENIZER_FILES)
        remove_data_directory(self.dir / "data")
        if (self.dir / "pretrain").is_dir():
            remove_training_run(self.dir / "pretrain")
            remove_outputs(self.dir / "pretrain", ())
        remove_outputs(self.dir / INSTRUCTIONS, ("train.jsonl", "val.jsonl"))
        for stage in ("sft", "dpo"):
            remove_finetune_run(self.dir / stage)
        remove_outputs(self.dir / EXPORT, ("hf", GGUF_FILE))
        remove_outputs(self.dir, RUN_FILES)

    def _load_state(self, may_hold_other_files: bool) -> dict[str, Any]:
        wanted = dataclasses.asdict(self.settings)
        fresh = {"settings": wanted, "stages": {}, "command": _command_line()}
        if not self.state_path.exists():
            foreign = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            if foreign and foreign != ["downloads"] and not may_hold_other_files:
                raise ScratchLMError(f"{self.dir} is not empty and holds no run ({', '.join(foreign[:3])}); "
                                     f"use --overwrite to run there anyway (its files are kept), "
                                     f"or another -o directory")
            return fresh
        try:
            state = json.loads(self.state_path.read_text())
            recorded = state["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ScratchLMError(f"{self.state_path}: unreadable run state ({exc}); use --overwrite "
                                 "to start over") from None
        if not any(stage.get("done") for stage in state.get("stages", {}).values()):
            return fresh  # nothing finished: nothing to protect
        differing = sorted(k for k in wanted if k not in _MAY_CHANGE
                           and _normal(recorded.get(k)) != _normal(wanted[k]))
        if differing:
            details = ", ".join(f"{k} (run has {recorded.get(k)!r}, asked {wanted[k]!r})" for k in differing)
            raise ScratchLMError(f"{self.dir} holds a run with other settings: {details}; "
                                 "use --overwrite to start it over, or another -o directory")
        state["settings"] = wanted
        return state

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def done(self, stage: str) -> bool:
        return bool(self.state["stages"].get(stage, {}).get("done"))

    def inputs(self, stage: str) -> dict[str, Any]:
        """What a stage's result depends on beyond the fixed settings: when each stage it reads
        finished (a stage run again makes its readers stale) and the settings that may change
        between invocations. A done stage whose inputs differ from these runs again."""
        s = self.settings
        read = list(NEEDS[stage])
        if stage in ("eval", "export"):
            read.append(self.final_stage())  # the model they evaluate or export
        inputs: dict[str, Any] = {f"{name}_finished": self.state["stages"].get(name, {}).get("finished")
                                  for name in dict.fromkeys(read)}
        if stage == "dpo":
            inputs.update(data=list(s.dpo_data), minutes=s.dpo_minutes)
        if stage == "eval":
            inputs.update(suite_data=s.suite_data, suite_limit=s.suite_limit)
        return inputs

    def due(self, stage: str) -> bool:
        entry = self.state["stages"].get(stage, {})
        return stage == "report" or not entry.get("done") or entry.get("inputs") != self.inputs(stage)

    def interrupted(self, stage: str) -> bool:
        """Whether `stage` started on the same inputs and did not finish (so it resumes)."""
        entry = self.state["stages"].get(stage, {})
        return not entry.get("done") and entry.get("inputs") == self.inputs(stage)

    def start(self, stage: str) -> None:
        entry = self.state["stages"].setdefault(stage, {})
        if entry.get("inputs") != self.inputs(stage):  # a new start: earlier figures and time no longer apply
            entry.clear()
        entry.update(done=False, inputs=self.inputs(stage))
        self._save_state()

    def record(self, stage: str, seconds: float, /, **figures: Any) -> None:
        """A stage that reports "skipped" (SFT without instruction data) is not done: the next
        invocation tries it again."""
        entry = self.state["stages"].setdefault(stage, {})
        entry.update(figures, done="skipped" not in figures, seconds=entry.get("seconds", 0.0) + seconds,
                     finished=time.time())
        self._save_state()

    def add_time(self, stage: str, seconds: float) -> None:
        """Time spent in a stage that did not finish (interrupted), still counted in the report."""
        entry = self.state["stages"].setdefault(stage, {})
        entry["seconds"] = entry.get("seconds", 0.0) + seconds
        self._save_state()

    # ------------------------------------------------------------------ models
    def base_dir(self) -> Path:
        return self.dir / "pretrain" / "final"

    def final_stage(self) -> str:
        """The stage whose model is the run's result: DPO's, else SFT's, else pretraining's."""
        for stage in ("dpo", "sft"):
            if self.done(stage) and (stage not in OPTIONAL_STAGES or self.settings.dpo_data):
                return stage
        return "pretrain"

    def model_dir(self) -> Path:
        """The run's final model: the chat model when post-training ran, else the base."""
        stage = self.final_stage()
        return self.base_dir() if stage == "pretrain" else self.dir / stage

    # ------------------------------------------------------------------ stages
    def stage_tokenizer(self) -> dict[str, Any]:
        from scratchlm.data.clean import clean_text
        from scratchlm.sources import hash_fraction
        from scratchlm.tokenizer.commands import train_tokenizer

        s = self.settings
        train_inputs, val_inputs = self.corpus_inputs()

        def held_out_by_data_stage(doc) -> bool:
            # The data stage splits cleaned text by this same hash: the tokenizer never
            # learns from a validation document.
            return hash_fraction(clean_text(doc.text, doc.profile)) < s.val_fraction

        hash_split = not (val_inputs or s.split_by_position)
        summary = train_tokenizer(train_inputs, s.vocab_size, self.dir / "tokenizer", progress=s.progress,
                                  sample_mb=s.tokenizer_sample_mb, overwrite=True,
                                  exclude=held_out_by_data_stage if hash_split else None)
        self.say(summary.describe())
        return {"vocab_size": summary.vocab_size, "sample_bytes": summary.input_bytes,
                "bytes_per_token": summary.bytes_per_token, "train_seconds": summary.seconds,
                "train_mb_per_s": summary.mb_per_s}

    def stage_data(self) -> dict[str, Any]:
        from scratchlm.data import PrepareConfig, format_stats_table, prepare_data

        s = self.settings
        train_inputs, val_inputs = self.corpus_inputs()
        config = PrepareConfig(val_inputs=tuple(val_inputs), val_fraction=s.val_fraction,
                               split_by_position=s.split_by_position, progress=s.progress)
        manifest = prepare_data(train_inputs, self.dir / "tokenizer", self.dir / "data",
                                config=config, overwrite=True)
        self.say(format_stats_table(manifest))
        splits = manifest["splits"]
        return {"train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
                "train_documents": splits["train"]["documents"], "val_documents": splits["val"]["documents"]}

    def train_config(self):
        from scratchlm.train import load_train_config

        s = self.settings
        return load_train_config(None, [
            f"model.preset={s.preset}",
            f"model.context_length={s.context_length}",
            f"data.dir={self.dir / 'data'}",
            f"data.tokenizer={self.dir / 'tokenizer'}",
            f"optimizer.lr={s.lr}",
            f"schedule.warmup_steps={s.warmup_steps}",
            f"run.max_minutes={s.minutes}",
            f"run.micro_batch_size={s.micro_batch_size}",
            f"run.global_batch_tokens={s.global_batch_tokens}",
            f"run.seed={s.seed}",
            f"run.device={s.device}",
            f"run.compile={str(s.compile).lower()}",
            f"run.progress={str(s.progress).lower()}",
            "run.eval_every=250",
            "run.checkpoint_every=100",
            "run.checkpoint_minutes=1.0",
            "run.keep_checkpoints=2",
        ])

    def stage_pretrain(self) -> dict[str, Any]:
        from scratchlm.train import train

        summary = train(self.train_config(), self.dir / "pretrain", resume=True)
        figures = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
        return {**figures, "minutes": self.settings.minutes}

    def _extend_training(self) -> None:
        """A larger --minutes than the finished pretraining had: continue it (what reads its
        model then runs again); a smaller one is reported, never silently claimed."""
        trained = self.state["stages"].get("pretrain", {}).get("minutes")
        asked = self.settings.minutes
        if not self.done("pretrain") or trained is None or asked == trained:
            return
        if asked < trained:
            self.say(f"== pretrain: trained {trained:g} min already; --minutes {asked:g} cannot shorten a "
                     f"finished run (use --overwrite to start over)")
            return
        self.say(f"== pretrain: budget raised from {trained:g} to {asked:g} min: training continues from "
                 f"its last checkpoint")
        self.state["stages"]["pretrain"]["done"] = False
        self._save_state()

    def corpus_profile(self) -> str:
        """"code" or "prose": the profile of most training bytes, from the data manifest."""
        from scratchlm.data import read_manifest

        bytes_by_profile: dict[str, int] = {}
        for source in read_manifest(self.dir / "data")["sources"]:
            if source["role"] == "train":
                profile = source["profile"] if source["profile"] in SAMPLE_PROMPTS else "prose"
                bytes_by_profile[profile] = bytes_by_profile.get(profile, 0) + source["bytes"]
        return max(bytes_by_profile, key=bytes_by_profile.get, default="prose")

    def hint_prompt(self) -> str:
        """A prompt that suits a base model of this corpus (for the commands the run prints)."""
        return SAMPLE_PROMPTS[self.corpus_profile()][0]

    def instruction_files(self) -> tuple[list[str], list[str], dict[str, Any]]:
        """(training files, held-out files, figures) of the SFT stage: --sft-data (held out by
        `scratchlm sft`'s own split), else pairs derived from the data directory's documents,
        each split's pairs from that split's files."""
        from scratchlm.data import iter_documents
        from scratchlm.post.chat import render_conversation, with_chat_tokens
        from scratchlm.post.code_instructions import write_code_instructions
        from scratchlm.tokenizer import Tokenizer

        s = self.settings
        if s.sft_data:
            return list(s.sft_data), [], {"instructions": "--sft-data"}
        tokenizer = Tokenizer.load(self.dir / "tokenizer")
        chat_tokenizer = with_chat_tokens(tokenizer)  # what SFT renders the pairs with

        def fits(messages: list[dict[str, str]]) -> bool:
            return len(render_conversation(chat_tokenizer, messages).ids) <= s.context_length

        out = self.dir / INSTRUCTIONS
        figures: dict[str, Any] = {"instructions": "documented functions of the corpus"}
        for split in ("train", "val"):
            sources = (tokenizer.decode_bytes(doc).decode("utf-8", "replace")
                       for doc in iter_documents(self.dir / "data", split))
            counts = write_code_instructions(sources, out / f"{split}.jsonl", fits)
            figures[f"{split}_pairs"] = counts["pairs"]
            figures[f"{split}_pairs_too_long"] = counts["too_long"]
        return [str(out / "train.jsonl")], [str(out / "val.jsonl")], figures

    def finetune_settings(self, minutes: float):
        from scratchlm.post import FinetuneSettings

        s = self.settings
        return FinetuneSettings(minutes=minutes, seed=s.seed, device=s.device, progress=s.progress)

    def stage_sft(self) -> dict[str, Any]:
        from scratchlm.post import sft

        train_files, val_files, figures = self.instruction_files()
        if not val_files or (figures["val_pairs"] and figures["train_pairs"]):
            summary = sft(self.base_dir(), train_files, self.dir / "sft", self.finetune_settings(self.settings.sft_minutes),
                          val_files=val_files, resume=self.resuming, overwrite=not self.resuming)
            return {**figures, **{k: v for k, v in summary.items() if k not in ("replies", "seconds")}}
        reason = (f"no instruction data: the corpus gave {figures['train_pairs']} training and "
                  f"{figures['val_pairs']} held-out pairs (documented Python functions); give --sft-data FILE")
        self.say(f"sft skipped: {reason}")
        return {**figures, "skipped": reason}

    def stage_dpo(self) -> dict[str, Any]:
        from scratchlm.post import dpo

        s = self.settings
        summary = dpo(self.dir / "sft", list(s.dpo_data), self.dir / "dpo", self.finetune_settings(s.dpo_minutes),
                      resume=self.resuming, overwrite=not self.resuming)
        return {k: v for k, v in summary.items() if k != "seconds"}

    def stage_eval(self) -> dict[str, Any]:
        """Bits per byte of the base beside gzip and xz; the post-training figures (held-out
        reply loss before and after, replies that end their turn); samples from the base and
        the chat model for the same prompts; the benchmark suite on a prose corpus."""
        from scratchlm.model import load_model
        from scratchlm.train.distributed import pick_device

        base, tokenizer = load_model(self.base_dir(), device=pick_device(self.settings.device))
        figures = {"bits_per_byte": self.bits_per_byte(base, tokenizer), "suite": self.suite()}
        if self.final_stage() != "pretrain":
            figures["chat"] = self.chat_figures()
        figures["samples"] = self.samples(base, tokenizer, figures.get("chat", {}).get("replies", []))
        return figures

    def bits_per_byte(self, model, tokenizer) -> dict[str, Any]:
        from itertools import islice

        from scratchlm.data import iter_documents
        from scratchlm.eval import compression_bits_per_byte, evaluate_bits_per_byte

        s = self.settings
        docs = list(islice(iter_documents(self.dir / "data", "val"), s.eval_documents))
        result = evaluate_bits_per_byte(model, tokenizer, docs, context_length=model.config.context_length,
                                        batch_size=16)
        texts = [tokenizer.decode_bytes(doc) for doc in docs]
        baselines = {name: compression_bits_per_byte(texts, name) for name in ("gzip", "xz")}
        for name, b in baselines.items():
            if b.raw_bytes != result.bytes:
                raise RuntimeError(f"{name} saw {b.raw_bytes} bytes, the model {result.bytes}")
        figures = {"val_bpb": result.bits_per_byte, "val_loss": result.loss_per_token,
                   "gzip_bpb": baselines["gzip"].bits_per_byte, "xz_bpb": baselines["xz"].bits_per_byte,
                   "eval_documents": result.documents, "eval_bytes": result.bytes, "eval_tokens": result.tokens}
        self.say(f"held-out bits per byte on {result.documents} documents ({result.bytes:,} bytes): "
                 f"model {figures['val_bpb']:.3f}, gzip -9 {figures['gzip_bpb']:.3f}, xz -9 {figures['xz_bpb']:.3f}")
        return figures

    def suite(self) -> dict[str, Any]:
        """`scratchlm eval --tasks core` on the base model when the corpus is prose (the tasks are
        English prose; a code model's scores would say nothing) and the task files are there."""
        from scratchlm.eval.datasets import TASK_FILES, eval_cache_dir
        from scratchlm.eval.suite import evaluate, parse_tasks, results_table

        s = self.settings
        if self.corpus_profile() != "prose":
            return {"skipped": "the corpus is code; the benchmarks (HellaSwag, ARC, ...) are English prose"}
        tasks = [task for task in parse_tasks("core") if task in TASK_FILES]
        data_dir = Path(s.suite_data) if s.suite_data else eval_cache_dir()
        missing = [task for task in tasks if not any((data_dir / name).exists() for name in TASK_FILES[task])]
        if missing:
            reason = (f"no task files for {', '.join(missing)} in {data_dir} (download them once with "
                      f"`scratchlm eval MODEL_DIR --tasks core`, or give --suite-data DIR)")
            self.say(f"benchmark suite skipped: {reason}")
            return {"skipped": reason}
        report = evaluate(self.base_dir(), "core", limit=s.suite_limit, data_dir=data_dir, device=s.device,
                          progress=s.progress)
        self.say(results_table(report))
        return {"tasks": report["tasks"], "data_dir": str(data_dir), "limit": s.suite_limit}

    def chat_figures(self) -> dict[str, Any]:
        """SFT's held-out figures and, for the final chat model, the share of greedy replies to
        held-out instructions that end their turn (SFT measured it for its own model)."""
        from scratchlm.model import load_model
        from scratchlm.post.chat import render_prompt, stop_ids
        from scratchlm.post.finetune import greedy_replies

        sft = json.loads((self.dir / "sft" / "summary.json").read_text())
        replies = sft["replies"]
        figures = {"sft_base_val_loss": sft["base_val_loss"], "sft_val_loss": sft["val_loss"]}
        if self.final_stage() == "dpo":
            dpo = json.loads((self.dir / "dpo" / "summary.json").read_text())
            figures.update({k: dpo[k] for k in ("base_val_preference_accuracy", "val_preference_accuracy",
                                                 "base_val_reward_margin", "val_reward_margin")})
            model, tokenizer = load_model(self.dir / "dpo")
            answers = greedy_replies(model, tokenizer, [render_prompt(tokenizer, r["messages"]) for r in replies],
                                     stop_ids(tokenizer)[0])
            replies = [{**r, "reply": tokenizer.decode(ids), "ended": ended} for r, (ids, ended) in zip(replies, answers)]
        figures["replies"] = replies
        figures["replies_ended"] = sum(r["ended"] for r in replies) / max(len(replies), 1)
        self.say(f"held-out reply loss {figures['sft_base_val_loss']:.3f} before SFT, {figures['sft_val_loss']:.3f} "
                 f"after; {figures['replies_ended']:.0%} of {len(replies)} greedy replies end their turn")
        return figures

    def samples(self, model, tokenizer, chat_replies: list[dict[str, Any]]) -> dict[str, Any]:
        """Base-model continuations of prompts suited to the corpus, and, with a chat model, the
        base model's greedy answer (plain-text format) beside the chat model's to the first
        SAMPLE_INSTRUCTIONS held-out instructions."""
        from scratchlm.infer import generate_text
        from scratchlm.post.chat import render_prompt, stop_ids
        from scratchlm.post.finetune import greedy_replies

        s = self.settings
        continuations = [{"prompt": prompt, "completion": generate_text(model, tokenizer, prompt,
                                                                         max_new_tokens=s.sample_tokens,
                                                                         temperature=0.8, top_k=50, seed=s.seed + i)}
                         for i, prompt in enumerate(SAMPLE_PROMPTS[self.corpus_profile()])]
        shown = chat_replies[:SAMPLE_INSTRUCTIONS]
        base_answers = greedy_replies(model, tokenizer, [render_prompt(tokenizer, r["messages"]) for r in shown],
                                      stop_ids(tokenizer)[0], max_new_tokens=s.sample_tokens)
        answers = [{"instruction": r["messages"][-1]["content"], "base": tokenizer.decode(ids), "chat": r["reply"]}
                   for r, (ids, _) in zip(shown, base_answers)]
        samples = {"continuations": continuations, "answers": answers}
        atomic_write_json(self.dir / "samples.json", samples)
        return {"continuations": len(continuations), "answers": len(answers)}

    def stage_export(self) -> dict[str, Any]:
        """The final model as a Hugging Face directory and a GGUF file (f16), for transformers,
        llama.cpp and Ollama."""
        from scratchlm.export import export_gguf, export_hf

        model_dir = self.model_dir()
        hf_dir = export_hf(model_dir, self.dir / EXPORT / "hf", overwrite=True)
        gguf = export_gguf(model_dir, self.dir / EXPORT / GGUF_FILE, "f16", overwrite=True)
        files = {str(path.relative_to(self.dir)): path.stat().st_size
                 for path in [*sorted(p for p in hf_dir.iterdir() if p.is_file()), gguf]}
        self.say(f"exported {model_dir.relative_to(self.dir)} to {hf_dir.relative_to(self.dir)}/ and "
                 f"{gguf.relative_to(self.dir)} ({gguf.stat().st_size / 1e6:.1f} MB)")
        return {"model": str(model_dir.relative_to(self.dir)), "files": files}

    def stage_report(self) -> dict[str, Any]:
        from scratchlm.pipeline.report import write_report

        write_report(self)
        return {}

    # ------------------------------------------------------------------ driver
    def corpus_inputs(self) -> tuple[list[str], list[str]]:
        """(training inputs, validation inputs). Named corpora are downloaded (once: files already
        complete are not fetched again), and the files a corpus publishes as its own validation
        split are held out; paths and `stdlib` pass through."""
        from scratchlm.data.hub import CORPORA, download_corpus

        train, val = [], list(self.settings.val_corpus)
        for spec in self.settings.corpus:
            if spec not in CORPORA:
                train.append(spec)
                continue
            for path in download_corpus(spec, self.dir / "downloads" / spec):
                is_val = any(path.as_posix().endswith(name) for name in CORPORA[spec].val_files)
                (val if is_val else train).append(str(path))
        return train, val

    def check_needs(self, chain: list[str]) -> None:
        """Refuse, before anything runs, a stage whose inputs neither exist nor are made first."""
        for i, stage in enumerate(chain):
            for need in NEEDS[stage]:
                if need not in chain[:i] and not self.done(need):
                    raise ScratchLMError(f"the {stage} stage needs {need}, which has not run in {self.dir}: "
                                         f"add it to --stages (or leave it out of --skip)")

    def execute(self) -> dict[str, Any]:
        chain = self.settings.chain()
        self.check_needs(chain)
        created = [path for path in (self.dir, *self.dir.parents) if not path.exists()]
        make_directory(self.dir)
        self._save_state()
        self._extend_training()
        try:
            self._execute_stages(chain)
        except ScratchLMError:
            # Failed before any stage finished (a download, say): the run leaves nothing.
            if not any(stage.get("done") for stage in self.state["stages"].values()):
                remove_outputs(self.dir / "downloads", ())
                remove_outputs(self.dir, ["run.json"])
                for path in created[1:]:  # the parents it made (runs/), if left empty
                    remove_outputs(path, ())
            raise
        report = json.loads((self.dir / "report.json").read_text()) if (self.dir / "report.json").exists() else {}
        self.say(closing_message(self))
        return report

    def _execute_stages(self, chain: list[str]) -> None:
        for stage in chain:
            if not self.due(stage):
                self.say(f"== {stage}: done already, skipped")
                continue
            missing = [need for need in NEEDS[stage] if not self.done(need)]
            if missing:  # skipped this time (SFT without instruction data, say)
                self.say(f"== {stage}: not run, it needs {', '.join(missing)}, which did not finish")
                continue
            self.say(f"== {stage}")
            # An interrupted SFT or DPO continues from its checkpoint; a stale one starts over.
            self.resuming = self.interrupted(stage)
            self.start(stage)
            started = time.perf_counter()
            try:
                figures = getattr(self, f"stage_{stage}")()
            except BaseException:
                self.add_time(stage, time.perf_counter() - started)
                raise
            self.record(stage, time.perf_counter() - started, **figures)


def run_pipeline(settings: RunSettings, progress: Callable[[str], None] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the figures written to report.json.

    `overwrite` starts over in a directory that holds an earlier run (its outputs are replaced,
    downloads kept) or other files (they stay)."""
    say = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    return _Run(settings, say, overwrite).execute()


# ---------------------------------------------------------------------- helpers
def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _command_line() -> str:
    return "scratchlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "scratchlm run"
