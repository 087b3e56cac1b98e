"""`scratchlm run`: raw text to a trained, evaluated model with a report card, in one command.

The job is a fixed chain of stages, each writing into its own place in the run directory:

    tokenizer -> data -> train -> eval -> suite -> samples -> report

`run.json` records the settings the run was created with and, per stage, when it finished,
how long it took and what it measured. Every setting is checked before any stage writes.
Re-running the same command skips every finished stage; an interrupted stage starts again
(tokenizer, data: they write atomically, so nothing half-done is ever mistaken for done) or
resumes (train: from its last checkpoint). A larger `--minutes` continues training from the
last checkpoint with the schedule re-planned for the new budget, then evaluates again; a
smaller one changes nothing (a run cannot be untrained). The report is rebuilt every time from
what the stages recorded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import (atomic_write_json, atomic_write_text, check_output_directory, make_directory,
                              remove_outputs)

STAGES = ("tokenizer", "data", "train", "eval", "suite", "samples")

# Prompts for the closing samples, by the kind of text the model was trained on (the data
# stage records each source's filter profile).
SAMPLE_PROMPTS = {
    "code": ("def ", "import ", "class ", "    return "),
    "prose": ("Once upon a time", "The ", "She said", "\n"),
}


@dataclass
class RunSettings:
    """Everything that determines what a run produces (recorded in run.json)."""

    corpus: tuple[str, ...] = ("stdlib",)
    val_corpus: tuple[str, ...] = ()
    preset: str = "tiny"
    minutes: float = 6.0  # pretraining budget (wall clock)
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
        for name in ("minutes", "lr", "tokenizer_sample_mb"):
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


# Settings that may change between invocations of the same run without invalidating it.
_MAY_CHANGE = {"out_dir", "device", "minutes", "progress", "suite_data", "suite_limit"}
# Files the run writes at the top of its directory; its stages' directories are removed by
# their own owners (only their outputs). Downloads are kept: a cache of public corpora,
# expensive to fetch again.
RUN_FILES = ("run.json", "samples.json", "report.md", "report.json", "loss.png")


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

    # ------------------------------------------------------------------ state
    def _start_over(self) -> None:
        """Remove what an earlier run wrote here (its files only, never the user's)."""
        from scratchlm.data.finalize import remove_data_directory
        from scratchlm.tokenizer import TOKENIZER_FILES
        from scratchlm.train.loop import remove_training_run

        remove_outputs(self.dir / "tokenizer", TOKENIZER_FILES)
        remove_data_directory(self.dir / "data")
        if (self.dir / "train").is_dir():
            remove_training_run(self.dir / "train")
            remove_outputs(self.dir / "train", ())
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

    def record(self, stage: str, seconds: float, **figures: Any) -> None:
        """A stage that reports "skipped" (the suite without task files) is not done: the next
        invocation tries it again."""
        entry = self.state["stages"].setdefault(stage, {})
        entry.update(figures, done="skipped" not in figures, seconds=entry.get("seconds", 0.0) + seconds)
        self._save_state()

    def add_time(self, stage: str, seconds: float) -> None:
        """Time spent in a stage that did not finish (interrupted), still counted in the report."""
        entry = self.state["stages"].setdefault(stage, {})
        entry["seconds"] = entry.get("seconds", 0.0) + seconds
        self._save_state()

    # ------------------------------------------------------------------ stages
    def stage_tokenizer(self) -> dict[str, Any]:
        from scratchlm.data.clean import clean_text
        from scratchlm.sources import hash_fraction
        from scratchlm.tokenizer.commands import train_tokenizer

        s = self.settings
        train_inputs, val_inputs = self.inputs()

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
        train_inputs, val_inputs = self.inputs()
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

    def stage_train(self) -> dict[str, Any]:
        from scratchlm.train import train

        summary = train(self.train_config(), self.dir / "train", resume=True)
        figures = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
        return {**figures, "minutes": self.settings.minutes}

    def _extend_training(self) -> None:
        """A larger --minutes than the finished training had: continue it (and redo what
        depends on the model); a smaller one is reported, never silently claimed."""
        trained = self.state["stages"].get("train", {}).get("minutes")
        asked = self.settings.minutes
        if not self.done("train") or trained is None or asked == trained:
            return
        if asked < trained:
            self.say(f"== train: trained {trained:g} min already; --minutes {asked:g} cannot shorten a "
                     f"finished run (use --overwrite to start over)")
            return
        self.say(f"== train: budget raised from {trained:g} to {asked:g} min: training continues from "
                 f"its last checkpoint")
        for stage in ("train", "eval", "suite", "samples"):
            self.state["stages"].get(stage, {})["done"] = False
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

    def model_dir(self) -> Path:
        return self.dir / "train" / "final"

    def stage_eval(self) -> dict[str, Any]:
        from itertools import islice

        from scratchlm.data import iter_documents
        from scratchlm.eval import compression_bits_per_byte, evaluate_bits_per_byte
        from scratchlm.model import load_model
        from scratchlm.train.distributed import pick_device

        s = self.settings
        model, tokenizer = load_model(self.model_dir(), device=pick_device(s.device))
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

    def stage_suite(self) -> dict[str, Any]:
        from scratchlm.eval.datasets import TASK_FILES, eval_cache_dir
        from scratchlm.eval.suite import evaluate, parse_tasks, results_table

        s = self.settings
        tasks = [task for task in parse_tasks("core") if task in TASK_FILES]
        data_dir = Path(s.suite_data) if s.suite_data else eval_cache_dir()
        missing = [task for task in tasks if not any((data_dir / name).exists() for name in TASK_FILES[task])]
        if missing:
            reason = (f"no task files for {', '.join(missing)} in {data_dir} (download them once with "
                      f"`scratchlm eval MODEL_DIR --tasks core`, or give --suite-data DIR)")
            self.say(f"benchmark suite skipped: {reason}")
            return {"skipped": reason}
        report = evaluate(self.model_dir(), "core", limit=s.suite_limit, data_dir=data_dir, device=s.device,
                          progress=s.progress)
        self.say(results_table(report))
        return {"tasks": report["tasks"], "data_dir": str(data_dir), "limit": s.suite_limit}

    def stage_samples(self) -> dict[str, Any]:
        from scratchlm.infer import generate_text
        from scratchlm.model import load_model
        from scratchlm.train.distributed import pick_device

        s = self.settings
        model, tokenizer = load_model(self.model_dir(), device=pick_device(s.device))
        samples = []
        for i, prompt in enumerate(SAMPLE_PROMPTS[self.corpus_profile()]):
            text = generate_text(model, tokenizer, prompt, max_new_tokens=s.sample_tokens,
                                 temperature=0.8, top_k=50, seed=s.seed + i)
            samples.append({"prompt": prompt, "completion": text})
        atomic_write_json(self.dir / "samples.json", samples)
        return {"count": len(samples)}

    # ------------------------------------------------------------------ driver
    def inputs(self) -> tuple[list[str], list[str]]:
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

    def execute(self) -> dict[str, Any]:
        created = [path for path in (self.dir, *self.dir.parents) if not path.exists()]
        make_directory(self.dir)
        self._save_state()
        self._extend_training()
        try:
            return self._execute_stages()
        except ScratchLMError:
            # Failed before any stage finished (a download, say): the run leaves nothing.
            if not any(stage.get("done") for stage in self.state["stages"].values()):
                remove_outputs(self.dir / "downloads", ())
                remove_outputs(self.dir, ["run.json"])
                for path in created[1:]:  # the parents it made (runs/), if left empty
                    remove_outputs(path, ())
            raise

    def _execute_stages(self) -> dict[str, Any]:
        for stage in STAGES:
            if self.done(stage):
                self.say(f"== {stage}: done already, skipped")
                continue
            self.say(f"== {stage}")
            started = time.perf_counter()
            try:
                figures = getattr(self, f"stage_{stage}")()
            except BaseException:
                self.add_time(stage, time.perf_counter() - started)
                raise
            self.record(stage, time.perf_counter() - started, **figures)
        report = build_report(self)
        self.say(_closing_message(self, report))
        return report


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


def _hardware() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


# ---------------------------------------------------------------------- the report card
def build_report(run: _Run) -> dict[str, Any]:
    """Write report.json and report.md from run.json and the stages' files."""
    from scratchlm.data import format_stats_table, read_manifest
    from scratchlm.model import load_config
    from scratchlm.model.report import model_info

    stages = run.state["stages"]
    train, evaluation = stages.get("train", {}), stages.get("eval", {})
    config, _ = load_config(run.model_dir())
    params = _count_params(config)
    curve = run.dir / "train" / "loss.png"
    if curve.exists():
        shutil.copyfile(curve, run.dir / "loss.png")
    figures = {
        "val_bpb": evaluation.get("val_bpb"),
        "gzip_bpb": evaluation.get("gzip_bpb"),
        "xz_bpb": evaluation.get("xz_bpb"),
        "val_loss": evaluation.get("val_loss"),
        "train_tokens_per_s": train.get("tokens_per_s"),
        "mfu": train.get("mfu"),
        "params": params,
        "train_tokens": train.get("tokens"),
        "train_steps": train.get("steps"),
        "stage_seconds": {name: round(stages.get(name, {}).get("seconds", 0.0), 2) for name in STAGES},
        "model_dir": str(run.model_dir()),
        "hardware": _hardware(),
        "settings": run.state["settings"],
        "tokenizer": stages.get("tokenizer", {}),
        "data": stages.get("data", {}),
    }
    atomic_write_json(run.dir / "report.json", figures)
    samples = json.loads((run.dir / "samples.json").read_text()) if (run.dir / "samples.json").exists() else []
    manifest = read_manifest(run.dir / "data")
    markdown = _report_markdown(run, figures, model_info(config, "model"), format_stats_table(manifest), samples)
    atomic_write_text(run.dir / "report.md", markdown)
    return figures


def _count_params(config) -> int:
    from scratchlm.model import count_params

    return int(count_params(config).total)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _report_markdown(run: _Run, f: dict[str, Any], model_table: str, data_table: str,
                     samples: list[dict[str, str]]) -> str:
    s = run.state["settings"]
    tok = f["tokenizer"]
    hw = f["hardware"]
    beats = (f["val_bpb"] is not None and f["gzip_bpb"] is not None and f["val_bpb"] < f["gzip_bpb"])
    lines = [
        f"# scratchlm run report: {run.dir}",
        "",
        f"Model: `{f['model_dir']}` ({f['params']:,} parameters, preset `{s['preset']}`), "
        f"trained {_fmt(run.state['stages'].get('train', {}).get('minutes'), '.1f')} min on corpus "
        f"{', '.join(s['corpus'])}.",
        "",
        "## Evaluation (held-out documents, each on its own)",
        "",
        "| | bits per byte |",
        "|---|---|",
        f"| this model | {_fmt(f['val_bpb'])} |",
        f"| gzip -9 | {_fmt(f['gzip_bpb'])} |",
        f"| xz -9 | {_fmt(f['xz_bpb'])} |",
        "",
        f"The model {'beats' if beats else 'does not beat'} gzip -9 on "
        f"{run.state['stages'].get('eval', {}).get('eval_documents', 0)} held-out documents "
        f"({run.state['stages'].get('eval', {}).get('eval_bytes', 0):,} bytes).",
        "",
        *_suite_markdown(run.state["stages"].get("suite", {})),
        "## Training",
        "",
        "![loss curve](loss.png)",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {f['train_steps']} |",
        f"| tokens | {_fmt(f['train_tokens'], ',')} |",
        f"| throughput | {_fmt(f['train_tokens_per_s'], ',.0f')} tokens/s |",
        f"| MFU | {_fmt(f['mfu'], '.1%') if f['mfu'] else 'n/a (no GPU peak known for this device)'} |",
        "",
        "## Model",
        "",
        "```",
        model_table,
        "```",
        "",
        "## Data",
        "",
        "```",
        data_table,
        "```",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE, {tok.get('vocab_size')} tokens, trained on {_fmt(tok.get('sample_bytes'), ',')} bytes "
        f"in {_fmt(tok.get('train_seconds'), '.1f')} s ({_fmt(tok.get('train_mb_per_s'), '.2f')} MB/s); "
        f"{_fmt(tok.get('bytes_per_token'), '.2f')} bytes per token on held-out text.",
        "",
        "## Samples",
        "",
    ]
    for sample in samples:
        lines += [f"**Prompt** `{sample['prompt']!r}`", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    lines += [
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in f["stage_seconds"].items()],
        "",
        "## Hardware",
        "",
        f"{hw['platform']}, Python {hw['python']}, torch {hw['torch']}, {hw['cpu_count']} CPUs, "
        f"GPU: {hw['gpu'] or 'none'}.",
        "",
        "## Reproduce",
        "",
        "```bash",
        run.state.get("command", "scratchlm run"),
        f"scratchlm generate {f['model_dir']} --prompt {shlex.quote(_hint_prompt(run))} --max-tokens 200",
        "```",
        "",
    ]
    return "\n".join(lines)


def _hint_prompt(run: _Run) -> str:
    return SAMPLE_PROMPTS[run.corpus_profile()][0]


def _suite_markdown(suite: dict[str, Any]) -> list[str]:
    from scratchlm.eval.suite import results_table

    lines = ["## Benchmarks (scored as lm-evaluation-harness scores them)", ""]
    if "tasks" not in suite:
        return [*lines, f"Not run: {suite.get('skipped', 'the stage has not run')}.", ""]
    return [*lines, f"The first {suite['limit']} items of each task (of each MMLU subject), from "
                    f"`{suite['data_dir']}`; core = the mean centered accuracy of the six multiple-choice tasks, "
                    f"(accuracy - chance) / (1 - chance).", "",
            results_table({"tasks": suite["tasks"]}), ""]


def _closing_message(run: _Run, f: dict[str, Any]) -> str:
    model_dir = f["model_dir"]
    return "\n".join([
        "",
        f"Done. Held-out bits per byte: model {_fmt(f['val_bpb'])}, gzip -9 {_fmt(f['gzip_bpb'])}, "
        f"xz -9 {_fmt(f['xz_bpb'])}.",
        f"Model:  {model_dir}",
        f"Report: {run.dir / 'report.md'}",
        "Try it:",
        f"  scratchlm generate {model_dir} --prompt {shlex.quote(_hint_prompt(run))} --max-tokens 200 "
        "--temperature 0.8",
        f"  scratchlm model info {model_dir}",
    ])
