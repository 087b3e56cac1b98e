"""Training configuration: six typed sections loaded from YAML or TOML, plus CLI overrides.

A config file maps onto `TrainConfig` section by section. Unknown keys are refused with the
list of valid ones (a typo must not silently fall back to a default), and every value is
converted to its field's declared type, so `--optimizer.lr=1e-3` on the command line and
`lr: 1e-3` in YAML (which PyYAML reads as a *string*) both end up as the float 0.001.

This module imports no torch: the CLI builds one `--section.key` option per field from it,
and `scratchlm --help` must stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import ScratchLMError


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by `scratchlm train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    """A preset plus optional overrides of its fields (null keeps the preset's value).

    vocab_size is not here: it always comes from the tokenizer, so the two cannot disagree.
    """

    preset: str = option("tiny", "model preset (see `scratchlm model info PRESET`)")
    init_from: str | None = option(None, "a model directory to continue from (its config wins)")
    context_length: int | None = option(None, "tokens of context")
    d_model: int | None = option(None, "width of the residual stream")
    n_layers: int | None = option(None, "transformer blocks")
    n_heads: int | None = option(None, "attention (query) heads")
    n_kv_heads: int | None = option(None, "key/value heads (fewer than n_heads: grouped-query attention)")
    d_ff: int | None = option(None, "hidden width of the MLP")
    norm: str | None = option(None, "layernorm or rmsnorm")
    norm_eps: float | None = option(None, "epsilon of the norms")
    position: str | None = option(None, "learned (GPT-2) or rope (Llama)")
    rope_theta: float | None = option(None, "RoPE base frequency")
    mlp: str | None = option(None, "gelu (GPT-2) or swiglu (Llama)")
    bias: bool | None = option(None, "biases in linear layers and norms")
    tie_embeddings: bool | None = option(None, "the output head reuses the token embedding")
    qk_norm: bool | None = option(None, "normalise queries and keys per head")
    dropout: float | None = option(None, "dropout probability")

    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields this section sets explicitly."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("preset", "init_from") and getattr(self, f.name) is not None}


@dataclass
class DataSection:
    dir: str = option("", "a data directory written by `scratchlm data prepare` (required)")
    tokenizer: str | None = option(None, "tokenizer directory (null: the one in model.init_from)")
    packing: str = option("stream", "stream (consecutive windows) or document (best-fit rows "
                                     "starting at documents)")
    document_mask: bool = option(False, "attention stays within each document of a row, "
                                        "positions restart at each")


@dataclass
class OptimizerSection:
    name: str = option("adamw", "adamw (written here; torch's fused kernel on CUDA), torch-adamw (torch's fused kernel) or muon")
    lr: float = option(3e-4, "peak learning rate (of every parameter group, Muon's too)")
    beta1: float = option(0.9, "Adam's first-moment decay")
    beta2: float = option(0.95, "Adam's second-moment decay")
    eps: float = option(1e-8, "Adam's epsilon")
    weight_decay: float = option(0.1, "decoupled weight decay of the matrices")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping")
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum")
    muon_ns_steps: int = option(5, "Muon's Newton-Schulz iterations")


@dataclass
class ScheduleSection:
    kind: str = option("cosine", "cosine (warmup, cosine to min_lr) or wsd (warmup-stable-decay)")
    warmup_steps: int = option(100, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "min_lr = lr x min_lr_ratio")
    decay_fraction: float = option(0.2, "wsd only: final share of the budget spent decaying")


@dataclass
class RunSection:
    # Budget: any of the three; the run stops at whichever is reached first and the LR
    # schedule follows the same "fraction of budget used" (see schedule.py).
    max_steps: int | None = option(None, "budget in optimizer steps")
    max_tokens: int | None = option(None, "budget in tokens")
    max_minutes: float | None = option(None, "budget in wall-clock minutes")
    global_batch_tokens: int = option(65536, "tokens per optimizer step, across all processes")
    micro_batch_size: int = option(8, "sequences per forward pass per process")
    seed: int = option(1337, "seed of weights, data order and dropout")
    device: str = option("auto", "auto (cuda > mps > cpu), cuda, mps or cpu")
    dtype: str = option("auto", "auto (bf16 on CUDA when supported, else fp32), fp32, bf16 or fp16")
    compile: bool = option(False, "torch.compile each transformer block")
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass")
    distributed: str = option("ddp", "under torchrun with >1 process: ddp or fsdp")
    threads: int | None = option(None, "torch CPU threads (fixed for bit-exact CPU resume)")
    eval_every: int = option(200, "steps between evaluations; 0: only at the end")
    eval_first: bool = option(False, "also evaluate before the first step (a fine-tuning run's starting point)")
    eval_batches: int = option(20, "validation batches per evaluation; 0: the whole val split")
    sample_tokens: int = option(64, "tokens generated at each evaluation; 0 disables samples")
    sample_prompt: str = option("\n", "prompt of those samples")
    checkpoint_every: int = option(500, "steps between checkpoints; 0: none by steps")
    checkpoint_minutes: float | None = option(30.0, "also checkpoint after this much wall time")
    keep_checkpoints: int = option(3, "the last K checkpoints are kept, plus the best by val loss")
    max_bad_steps: int = option(10, "consecutive non-finite steps before the run stops")
    log_every: int = option(10, "steps between metric records")
    progress: bool = option(True, "progress bar on stderr")
    tensorboard: bool = option(True, "write TensorBoard events when tensorboard is installed")


@dataclass
class LoraSection:
    """Low-rank adapters (Hu et al. 2021): the model's weights stay frozen and only small
    matrices beside the chosen projections train (scratchlm.model.lora)."""

    rank: int = option(0, "rank of the adapters; 0: no LoRA, every weight trains")
    alpha: float = option(16.0, "the adapters' output is scaled by alpha / rank")
    dropout: float = option(0.0, "dropout on the adapters' input")
    targets: str = option("q,k,v,o,gate,up,down", "projections that get adapters (comma-separated)")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = field(default="", compare=False, repr=False)  # the file it was read from, if any

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_NAMES}

    def validate(self) -> None:
        """Checks that need no files: one budget set, known choices, positive sizes."""
        run, opt, sched = self.run, self.optimizer, self.schedule
        if run.max_steps is None and run.max_tokens is None and run.max_minutes is None:
            raise ScratchLMError("config: set at least one of run.max_steps, run.max_tokens, "
                                 "run.max_minutes")
        _choose("optimizer.name", opt.name, ("adamw", "torch-adamw", "muon"))
        _choose("schedule.kind", sched.kind, ("cosine", "wsd"))
        _choose("run.device", run.device, ("auto", "cuda", "mps", "cpu"))
        _choose("run.dtype", run.dtype, ("auto", "fp32", "bf16", "fp16"))
        _choose("run.distributed", run.distributed, ("ddp", "fsdp"))
        _choose("data.packing", self.data.packing, ("stream", "document"))
        for name in ("run.max_steps", "run.max_tokens", "run.max_minutes",
                     "run.global_batch_tokens", "run.micro_batch_size",
                     "run.keep_checkpoints", "run.max_bad_steps", "run.log_every",
                     "run.threads", "run.checkpoint_minutes", "optimizer.lr"):
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value is not None and not value > 0:
                raise ScratchLMError(f"config field {name}: must be > 0, got {value!r}")
        for name in ("run.max_minutes", "run.checkpoint_minutes", "optimizer.lr", "optimizer.weight_decay",
                     "optimizer.grad_clip", "optimizer.eps"):
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value is not None and not math.isfinite(value):
                raise ScratchLMError(f"config field {name}: must be a finite number, got {value!r}")
        check_seed(run.seed, "config field run.seed")
        if run.eval_batches < 0:
            raise ScratchLMError(f"config field run.eval_batches: must be >= 0, got {run.eval_batches!r}")
        if not 0.0 <= sched.min_lr_ratio <= 1.0:
            raise ScratchLMError(f"config field schedule.min_lr_ratio: must be in [0, 1], "
                                 f"got {sched.min_lr_ratio!r}")
        if not 0.0 < sched.decay_fraction <= 1.0:
            raise ScratchLMError(f"config field schedule.decay_fraction: must be in (0, 1], "
                                 f"got {sched.decay_fraction!r}")
        if not self.data.dir:
            raise ScratchLMError("config field data.dir: required (a prepared data directory)")
        if self.lora.rank < 0:
            raise ScratchLMError(f"config field lora.rank: must be >= 0, got {self.lora.rank!r}")
        if self.lora.rank and not self.model.init_from:
            raise ScratchLMError("config field lora.rank: adapters need a trained model to adapt (model.init_from)")


SECTION_NAMES = ("model", "data", "optimizer", "schedule", "run", "lora")
SECTIONS: dict[str, type] = {name: typing.get_type_hints(TrainConfig)[name] for name in SECTION_NAMES}


def field_types(section: str) -> dict[str, Any]:
    """Declared type of every key of one section (used for parsing and for the CLI)."""
    return typing.get_type_hints(SECTIONS[section])


def field_help(section: str) -> dict[str, tuple[str, Any]]:
    """(help text, default) of every key of one section, for the CLI."""
    return {f.name: (f.metadata.get("help", ""), f.default) for f in dataclasses.fields(SECTIONS[section])}


def type_name(type_: Any) -> str:
    """INT, FLOAT, BOOL, TEXT; `|null` when the field may be null."""
    names = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}
    members = _members(type_)
    shown = "|".join(names.get(m, "null") for m in members if m is not type(None))
    return shown + ("|null" if type(None) in members else "")


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
                      ) -> TrainConfig:
    """Read a YAML or TOML file (or start from defaults when path is None), apply
    `section.key=value` overrides (a leading `--` is allowed) and validate."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_file(path)
    config = config_from_dict(raw, source)
    config.source = str(path) if path is not None else ""
    for item in overrides:
        apply_override(config, item)
    config.validate()
    return config


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ScratchLMError(f"{source}: expected a mapping of sections at the top level")
    _reject_unknown(raw, SECTIONS, source, "section")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ScratchLMError(f"{source}: section {name!r} must be a mapping")
        types_ = field_types(name)
        _reject_unknown(values, types_, source, f"key in section {name!r}")
        sections[name] = cls(**{key: _coerce(value, types_[key], f"{source}: {name}.{key}")
                                for key, value in values.items()})
    return TrainConfig(**sections)


def apply_override(config: TrainConfig, item: str) -> None:
    """Apply one `section.key=value`; the value is parsed as YAML then converted to the type."""
    text = item[2:] if item.startswith("--") else item
    dotted, sep, value = text.partition("=")
    section, dot, key = dotted.partition(".")
    if not sep or not dot:
        raise ScratchLMError(f"override {item!r}: expected section.key=value")
    _reject_unknown({section: None}, SECTIONS, "override", "section")
    types_ = field_types(section)
    _reject_unknown({key: None}, types_, "override", f"key in section {section!r}")
    setattr(getattr(config, section), key, parse_value(value, types_[key], f"override {dotted}"))


def parse_value(text: str, type_: Any, where: str) -> Any:
    """Turn a command-line string into a value of `type_` (strings stay verbatim)."""
    import yaml

    members = _members(type_)
    if text.strip().lower() in ("null", "none", "~"):
        return _coerce(None, type_, where)
    if str in members:
        return text
    return _coerce(yaml.safe_load(text) if text.strip() else None, type_, where)


def dump_config_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- helpers
def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ScratchLMError(f"config file {path} is a directory")
    if not path.is_file():
        raise ScratchLMError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScratchLMError(f"{path}: not a YAML or TOML text file (invalid UTF-8 at byte {exc.start})") from None
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScratchLMError(f"{path}: invalid TOML: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ScratchLMError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _reject_unknown(values: dict, valid: dict, source: str, what: str) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ScratchLMError(f"{source}: unknown {what} {unknown[0]!r}; valid: "
                             f"{', '.join(valid)}")


def _members(type_: Any) -> tuple[Any, ...]:
    """The alternatives of a union (`int | None` -> (int, NoneType)), else (type_,)."""
    if isinstance(type_, types.UnionType) or typing.get_origin(type_) is typing.Union:
        return typing.get_args(type_)
    return (type_,)


def _coerce(value: Any, type_: Any, where: str) -> Any:
    members = _members(type_)
    if value is None:
        if type(None) in members:
            return None
        raise ScratchLMError(f"{where}: a value is required")
    for member in members:
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is int and isinstance(value, (float, str)):
            number = _number(value)  # 1e6 in a file means a whole number (PyYAML: a string)
            if number is not None and float(number).is_integer():
                return int(number)
        if member is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)  # PyYAML reads "3e-4" as a string
            except ValueError:
                continue
        if member is str and isinstance(value, str):
            return value
    names = " or ".join("null" if m is type(None) else getattr(m, "__name__", str(m))
                        for m in members)
    raise ScratchLMError(f"{where}: expected {names}, got {value!r}")


def _number(value: float | str) -> int | float | None:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return None


def check_seed(seed: int, what: str) -> None:
    """Seeds feed numpy's generators (non-negative) and torch's (64-bit): [0, 2^63)."""
    if not 0 <= seed < 2**63:
        raise ScratchLMError(f"{what}: must be between 0 and 2^63 - 1, got {seed}")


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ScratchLMError(f"config field {name}: must be one of {', '.join(allowed)}, "
                             f"got {value!r}")
