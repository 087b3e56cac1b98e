"""The `scratchlm` command line.

Thin by design: each subcommand parses its arguments and calls one public function of the
stage it belongs to, so everything here can be done from Python with the same names.
Stage imports happen inside the handlers so `scratchlm --help` stays fast.

Each pipeline stage owns one `_add_<stage>_commands` function below. Every option has help
text, and the help shows its default (`_HelpFormatter`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from scratchlm import __version__
from scratchlm.errors import ScratchLMError

DEVICES = ("auto", "cuda", "mps", "cpu")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else repr(default) \
            if isinstance(default, str) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _EpilogHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """Keeps the line breaks of a table in the epilog."""


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser: argparse creates sub-parsers of the parent's class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line, like every other error, pointing at --help instead of printing the usage."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_overwrite_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"write the {what} into a directory that is not empty (files of the {what} "
                        f"are replaced, all others kept)")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    """How raw inputs are read: the same options wherever raw text is read (scratchlm.sources)."""
    from scratchlm.sources import DOC_MODES

    p.add_argument("--text-field", default="text", help="JSON/JSONL/Parquet field holding the text")
    p.add_argument("--doc-mode", default="auto", choices=DOC_MODES,
                   help="how plain text files are cut into documents: auto (from the first MB), "
                        "file, eot (<|endoftext|>-separated), blank (blank-line blocks), line")


# --------------------------------------------------------------------------- tokenizer
def _add_tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train and use a byte-level BPE tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)

    p = tsub.add_parser("train", help="train a BPE tokenizer on text",
                        description="Train byte-level BPE on documents read as every command reads "
                                    "them; 1 in 100 documents is held out to measure compression.")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="files, directories, globs (.txt/.jsonl/.json/.parquet, .gz/.zst), or 'stdlib'")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens, including the special tokens")
    p.add_argument("--special-token", action="append", default=None, metavar="T",
                   help="special token (repeatable; default: <|endoftext|>)")
    p.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2", help="pre-tokenization regex")
    p.add_argument("--sample-mb", type=float, default=None,
                   help="train on a deterministic sample of a huge corpus: its first documents, taken "
                        "round-robin across inputs, up to about this many MB (default: all of the input)")
    _add_source_options(p)
    p.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all CPUs)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="tokenizer directory to write")
    _add_overwrite_option(p, "tokenizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_tokenizer_train)

    p = tsub.add_parser("encode", help="print the token ids of text (a file, --text, or stdin)")
    p.add_argument("-t", "--tokenizer", required=True, metavar="DIR", help="tokenizer (or model) directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="FILE", help="text file to encode (default: stdin)")
    source.add_argument("--text", help="text to encode")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token strings (e.g. <|endoftext|>) in the text as their ids "
                        "(default: they are ordinary text)")
    p.set_defaults(func=_tokenizer_encode)

    p = tsub.add_parser("decode", help="print the text of token ids (arguments, a file, or stdin)")
    p.add_argument("-t", "--tokenizer", required=True, metavar="DIR", help="tokenizer (or model) directory")
    p.add_argument("ids", nargs="*", type=str, help="token ids (default: whitespace-separated ids on stdin)")
    p.add_argument("--input", metavar="FILE", help="file of whitespace-separated ids (default: the ids given, "
                                                   "else stdin)")
    p.set_defaults(func=_tokenizer_decode)

    p = tsub.add_parser("info", help="describe a saved tokenizer")
    p.add_argument("directory", metavar="DIR", help="tokenizer (or model) directory")
    p.set_defaults(func=_tokenizer_info)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from scratchlm.tokenizer.commands import train_tokenizer

    summary = train_tokenizer(args.input, args.vocab_size, args.out, special_tokens=args.special_token,
                              pattern=args.pattern, workers=args.workers, progress=not args.no_progress,
                              sample_mb=args.sample_mb, text_field=args.text_field, doc_mode=args.doc_mode,
                              overwrite=args.overwrite)
    print(summary.describe())


def _open_text_input(path: str | None):
    """A text stream from `path` (invalid UTF-8 becomes U+FFFD) or stdin."""
    if path is None:
        return contextlib.nullcontext(sys.stdin)
    try:
        return open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror}") from None


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from scratchlm.sources import file_head, looks_binary, non_text_fraction
    from scratchlm.tokenizer.commands import encode_text

    if args.input is not None and looks_binary(head := file_head(Path(args.input))):
        raise ScratchLMError(f"{args.input} looks like binary data, not text ({non_text_fraction(head):.0%} "
                             f"invalid UTF-8 or control characters)")
    with _open_text_input(None if args.text is not None else args.input) as f:
        ids = encode_text(args.tokenizer, [args.text] if args.text is not None else f,
                          allow_special=args.allow_special)
        line: list[str] = []
        for token_id in ids:
            line.append(str(token_id))
            if len(line) == 4096:
                sys.stdout.write(" ".join(line) + " ")
                line.clear()
        sys.stdout.write(" ".join(line) + "\n")


def _tokenizer_decode(args: argparse.Namespace) -> None:
    from scratchlm.tokenizer.commands import decode_ids

    if args.ids and args.input:
        raise ScratchLMError("give token ids or --input FILE, not both")
    if args.ids:
        sys.stdout.write(decode_ids(args.tokenizer, [" ".join(args.ids)]))
        return
    with _open_text_input(args.input) as f:
        sys.stdout.write(decode_ids(args.tokenizer, f))


def _tokenizer_info(args: argparse.Namespace) -> None:
    from scratchlm.tokenizer.commands import tokenizer_info

    for key, value in tokenizer_info(args.directory).items():
        print(f"{key}: {value}")


# --------------------------------------------------------------------------- data
def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    from scratchlm.data.hub import CORPORA

    data = sub.add_parser("data", help="prepare token shards from raw corpora; download corpora")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = dsub.add_parser("prepare", help="clean, filter, dedup, split, tokenize and pack into shards")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="files, directories, globs (.txt/.jsonl/.json/.parquet, .gz/.zst), or 'stdlib'")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer (or model) directory")
    p.add_argument("-o", "--out", required=True, metavar="DATA_DIR", help="data directory to write")
    _add_overwrite_option(p, "data directory")
    p.add_argument("--val-input", nargs="+", default=[], metavar="SRC",
                   help="explicit validation inputs (replace the hash split)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="validation share of the documents")
    p.add_argument("--split-by-position", action="store_true",
                   help="validation = the last --val-fraction of the text (one long document)")
    _add_source_options(p)
    p.add_argument("--profile", choices=["prose", "code"], default=None,
                   help="filter profile for all inputs (default: code for source files, else prose)")
    p.add_argument("--workers", type=int, default=None, help="processes running tasks (default: all CPUs)")
    p.add_argument("--num-tasks", type=int, default=_slurm("SLURM_ARRAY_TASK_COUNT"),
                   help="cut the inputs into this many tasks; with --task-index, run only that one (a Slurm "
                        "array job: defaults from SLURM_ARRAY_TASK_COUNT), then `data finalize` "
                        "(default: one task per worker, all run, then finalized)")
    p.add_argument("--task-index", type=int, default=_slurm_task_index(),
                   help="the task to run, 0-based (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="run the tasks on local processes or on a Ray cluster (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--keep-tasks", action="store_true", help="keep the tasks' files after finalizing")
    p.add_argument("--no-filter", nargs="+", default=[], metavar="NAME",
                   help="switch off filters by name (the names in the closing table), or 'all' "
                        "(default: none, every filter on)")
    p.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard similarity above which documents are near-duplicates")
    p.add_argument("--blocklist-words", metavar="FILE",
                   help="drop documents containing these words, one per line (default: none)")
    p.add_argument("--blocklist-urls", metavar="FILE",
                   help="drop documents linking these domains, one per line (default: none)")
    p.add_argument("--scrub-pii", action="store_true", help="replace e-mails, IPv4 addresses, phone numbers")
    p.add_argument("--strict-json", action="store_true", help="malformed JSONL records are fatal")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_data_prepare)

    p = dsub.add_parser("finalize", help="after every task of `data prepare --num-tasks N --task-index I`: "
                                         "dedup across tasks, split, shards, manifest")
    p.add_argument("out", metavar="DATA_DIR", help="the -o directory the tasks wrote into")
    p.add_argument("--keep-tasks", action="store_true", help="keep the tasks' files after finalizing")
    p.set_defaults(func=_data_finalize)

    table = "\n".join(f"  {name:<20}{corpus.description}\n  {'':<20}[{corpus.source}]"
                      for name, corpus in CORPORA.items())
    d = dsub.add_parser("download", help="download a named corpus (Hugging Face Hub or GitHub)",
                        description="Download a named corpus into DIR. Files already there and "
                                    "complete are not fetched again.",
                        epilog=f"corpora:\n{table}", formatter_class=_EpilogHelpFormatter)
    d.add_argument("name", help="one of the corpora listed below")
    d.add_argument("-o", "--out", required=True, metavar="DIR", help="directory to download into")
    d.set_defaults(func=_data_download)


def _data_prepare(args: argparse.Namespace) -> None:
    from scratchlm.data import PrepareConfig, format_stats_table, prepare_data

    disable_all = "all" in args.no_filter
    config = PrepareConfig(
        text_field=args.text_field, doc_mode=args.doc_mode, strict_json=args.strict_json, profile=args.profile,
        filter=not disable_all, disabled_filters=tuple(n for n in args.no_filter if n != "all"),
        blocklist_words=args.blocklist_words, blocklist_urls=args.blocklist_urls, scrub_pii=args.scrub_pii,
        dedup=not args.no_dedup, near_dup_threshold=args.near_dup_threshold, val_inputs=tuple(args.val_input),
        val_fraction=args.val_fraction, split_by_position=args.split_by_position, workers=args.workers,
        progress=not args.no_progress,
    )
    if args.task_index is not None:
        from scratchlm.data import prepare_task

        if args.num_tasks is None:
            raise ScratchLMError("--task-index needs --num-tasks (or SLURM_ARRAY_TASK_COUNT)")
        record = prepare_task(args.input, args.tokenizer, args.out, task_index=args.task_index,
                              num_tasks=args.num_tasks, config=config, overwrite=args.overwrite)
        print(f"task {args.task_index} of {args.num_tasks}: {record['documents']:,} documents kept, "
              f"{record['seconds']:.1f} s; when all are done: scratchlm data finalize {args.out}")
        return
    manifest = prepare_data(args.input, args.tokenizer, args.out, config=config, overwrite=args.overwrite,
                            num_tasks=args.num_tasks, executor=args.executor, keep_tasks=args.keep_tasks)
    print(format_stats_table(manifest))
    print(f"wrote {args.out}")


def _data_finalize(args: argparse.Namespace) -> None:
    from scratchlm.data import finalize_data, format_stats_table

    print(format_stats_table(finalize_data(args.out, keep_tasks=args.keep_tasks)))
    print(f"wrote {args.out}")


def _slurm(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def _slurm_task_index() -> int | None:
    """This array element's 0-based index (arrays may be numbered from 1, or any --array=M-N)."""
    task = _slurm("SLURM_ARRAY_TASK_ID")
    return None if task is None else task - (_slurm("SLURM_ARRAY_TASK_MIN") or 0)


def _data_download(args: argparse.Namespace) -> None:
    from scratchlm.data.hub import download_corpus

    for path in download_corpus(args.name, args.out):
        print(path)


# --------------------------------------------------------------------------- train
_OVERRIDE_PREFIX = "override:"


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    from scratchlm.train.config import SECTIONS, field_help, field_types, type_name

    p = sub.add_parser(
        "train", help="pretrain a model (torchrun for DDP/FSDP2)",
        description="Train from a YAML/TOML config. Every config field can be overridden as "
                    "--section.key=value ('null' for none). Multi-GPU: torchrun "
                    "--nproc_per_node=N -m scratchlm train ...",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="YAML or TOML config")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (fresh start if none); a changed "
                        "budget re-plans the learning-rate schedule")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a directory holding other files (they are kept); without --resume, "
                        "an earlier run there starts over")
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} section (config overrides)")
        helps = field_help(section)
        for key, type_ in field_types(section).items():
            text, default = helps[key]
            # The file's value wins over the dataclass default, so the default is shown as
            # text and the option itself stays unset unless given.
            group.add_argument(f"--{section}.{key}", dest=f"{_OVERRIDE_PREFIX}{section}.{key}",
                               metavar=type_name(type_), default=argparse.SUPPRESS,
                               help=f"{text} (default: {'null' if default is None else repr(default)})")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    import json

    from scratchlm.train import load_train_config, train

    overrides = [f"{dest[len(_OVERRIDE_PREFIX):]}={value}" for dest, value in vars(args).items()
                 if dest.startswith(_OVERRIDE_PREFIX)]
    summary = train(load_train_config(args.config, overrides), args.out, resume=args.resume,
                    overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, not one per process
        print(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------- model, plan, generate
def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    from scratchlm.model import PRESETS

    model = sub.add_parser("model", help="inspect model presets and model directories")
    msub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    p = msub.add_parser("info", help="architecture, parameter counts, FLOPs/token, memory")
    p.add_argument("model", metavar="PRESET|DIR",
                   help=f"a preset ({', '.join(PRESETS)}) or a model directory")
    p.add_argument("--vocab-size", type=int, default=None, help="override a preset's vocab_size (default: the preset's)")
    p.add_argument("--context-length", type=int, default=None,
                   help="override a preset's context_length (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch for the memory estimate")
    p.set_defaults(func=_model_info)


def _model_info(args: argparse.Namespace) -> None:
    from pathlib import Path

    from scratchlm.model import PRESETS, ModelConfig, load_config
    from scratchlm.model.report import model_info

    overrides = {k: v for k, v in (("vocab_size", args.vocab_size),
                                   ("context_length", args.context_length)) if v is not None}
    if args.batch_size < 1:
        raise ScratchLMError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.model in PRESETS:
        config, title = ModelConfig.from_preset(args.model, **overrides), f"preset {args.model}"
    elif Path(args.model).is_dir():
        if overrides:
            raise ScratchLMError("--vocab-size/--context-length only apply to presets")
        config, title = load_config(args.model)[0], f"model directory {args.model}"
    else:
        raise ScratchLMError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    print(model_info(config, title, batch_size=args.batch_size))


def _add_plan_command(sub: argparse._SubParsersAction) -> None:
    from scratchlm.model.accounting import GPU_PEAK_FLOPS

    p = sub.add_parser(
        "plan", help="compute-optimal model size, tokens, training time and memory",
        description="Chinchilla planning from a compute budget or a model size. Numbers take "
                    "suffixes: 5.9e23, 124M, 70B, 1.4T.")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", help="total training compute in FLOPs")
    budget.add_argument("--gpu-hours", help="total GPU-hours on --gpu at --mfu")
    budget.add_argument("--params", help="model size; the budget is training it on 20 tokens/param")
    p.add_argument("--gpu", default="H100", help=f"GPU model ({', '.join(GPU_PEAK_FLOPS)})")
    p.add_argument("--gpus", type=int, default=8, help="GPUs to train on (time and memory per GPU)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--vocab-size", type=int, default=50257,
                   help="vocabulary size (GPT-2's by default); its embedding sets the smallest model")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="estimate memory with activations recomputed in the backward pass")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> None:
    from scratchlm.model import plan
    from scratchlm.model.report import parse_quantity, plan_table

    quantities = {name: parse_quantity(getattr(args, name), f"--{name.replace('_', '-')}")
                  for name in ("flops", "gpu_hours", "params") if getattr(args, name) is not None}
    result = plan(**quantities, gpu=args.gpu, gpus=args.gpus, mfu=args.mfu, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, vocab_size=args.vocab_size,
                  activation_checkpointing=args.activation_checkpointing)
    print(plan_table(result))


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model (streams text)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory (e.g. runs/stdlib/pretrain/final)")
    p.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens only (default: off, all tokens)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    from scratchlm.infer import check_generation_args, generate
    from scratchlm.model import load_model
    from scratchlm.train.distributed import pick_device

    # Everything the user typed is checked before the seconds spent loading the model.
    check_generation_args(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model_dir, device=device)

    def notice(message: str) -> None:
        print(f"scratchlm: {message}", file=sys.stderr)

    for piece in generate(model, tokenizer, args.prompt, max_new_tokens=args.max_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, notice=notice):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _add_chat_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (streamed replies, history kept)",
                       description="A terminal chat: a chat model (from `scratchlm sft`) in its ChatML "
                                   "template, a base model in a plain 'User:/Assistant:' format. The "
                                   "oldest exchanges are dropped when the conversation outgrows the "
                                   "context. Commands: /reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C "
                                   "stops a reply.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model or adapter directory")
    p.add_argument("--system", default=None, help="system prompt (default: none; /system changes it)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per reply at most (default: 256, at most half the model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only (default: off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min-p times the most likely one (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise every token already in the conversation (CTRL: a positive logit is divided "
                        "by it, a negative one multiplied; 1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible session (default: random)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> None:
    from scratchlm.infer.chat import chat

    chat(args.model_dir, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
         repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
         system=args.system, device=args.device)


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
                       description="Serve MODEL_DIR at /v1/completions, /v1/chat/completions and /v1/models "
                                   "(OpenAI's API: its clients work unchanged, streaming included), /health, "
                                   "and a chat page at /. SIGTERM or Ctrl-C lets the requests in flight "
                                   "finish, then exits. Needs the serve extra: pip install 'scratchlm[serve]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model or adapter directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 listens on every interface (then set an API key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SCRATCHLM_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together at most")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="generation requests in flight at most, waiting ones included; beyond it a 503 "
                        "(default: 4 x --max-batch)")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the directory's name)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from scratchlm.infer.server import serve

    serve(args.model_dir, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_concurrent=args.max_concurrent, model_name=args.model_name, device=args.device)


# --------------------------------------------------------------------------- eval
def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    from scratchlm.eval.suite import TASKS

    p = sub.add_parser("eval", help="score a model on HellaSwag, ARC, PIQA, WinoGrande, LAMBADA, MMLU, HumanEval",
                       description="Benchmarks scored as lm-evaluation-harness scores them (its prompts, token "
                                   "boundaries and metrics). Results: a table here, --json, and eval.json in "
                                   "the model directory.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory")
    p.add_argument("--tasks", required=True, metavar="T1,T2,...",
                   help=f"comma-separated: {', '.join(TASKS)} (core = the six multiple-choice tasks and "
                        f"their centered accuracy)")
    p.add_argument("--limit", type=int, default=None, help="score the first N items of each task (default: all)")
    p.add_argument("--shots", type=int, default=0, help="MMLU: solved dev examples before each question")
    p.add_argument("--batch-size", type=int, default=32, help="continuations scored per forward pass")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="task files in scratchlm's eval layout (default: download the full sets once into "
                        "the cache, $SCRATCHLM_CACHE or ~/.cache/scratchlm)")
    p.add_argument("--bpb-data", default=None, metavar="DIR",
                   help="task bpb: a data directory (scratchlm data prepare) whose val split is scored")
    p.add_argument("--contamination", default=None, metavar="DATA_DIR",
                   help="report the share of items sharing a 13-gram with DATA_DIR's training shards")
    p.add_argument("--samples", type=int, default=1, help="HumanEval: completions per problem for pass@k")
    p.add_argument("--k", default="1", help="HumanEval: comma-separated k of pass@k (each <= --samples)")
    p.add_argument("--temperature", type=float, default=0.8, help="HumanEval: sampling temperature for --samples > 1")
    p.add_argument("--seed", type=int, default=0, help="HumanEval: seed of the sampled completions")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--log-samples", default=None, metavar="FILE",
                   help="write one JSON line per item: prompt, choices, log-likelihoods, prediction, gold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> None:
    from scratchlm.eval.suite import evaluate, results_table

    try:
        k = tuple(int(x) for x in args.k.split(","))
    except ValueError:
        raise ScratchLMError(f"--k must be comma-separated integers, got {args.k!r}") from None
    report = evaluate(args.model_dir, args.tasks, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                      data_dir=args.data_dir, bpb_data=args.bpb_data, contamination=args.contamination,
                      samples=args.samples, k=k, temperature=args.temperature, seed=args.seed, device=args.device,
                      json_path=args.json, log_samples=args.log_samples, progress=not args.no_progress)
    print(results_table(report))


# --------------------------------------------------------------------------- post-training
def _add_finetune_options(p: argparse.ArgumentParser, item: str) -> None:
    """Budget, batch, LoRA and run options shared by sft and dpo (scratchlm.post.FinetuneSettings)."""
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=f"{item} files (.json or .jsonl)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR",
                   help="the tuned model (or adapter) directory; the run's data, checkpoints and metrics go inside")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    budget.add_argument("--epochs", type=float, default=None, help="passes over the training split (default 1)")
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: sft 3e-4, dpo 5e-6, each times 768 / d_model; x10 with LoRA)")
    p.add_argument("--batch-size", type=int, default=16, help=f"{item}s per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"{item}s per forward pass (default: 8, or the largest power of two dividing --batch-size)")
    p.add_argument("--val-fraction", type=float, default=0.05, help=f"held-out share of the {item}s")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at the end)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the held-out split, data order and dropout")
    p.add_argument("--lora-rank", type=int, default=0, help="train low-rank adapters of this rank (0: all weights)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter output scale alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="projections that get adapters")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its last checkpoint")
    _add_overwrite_option(p, "run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _finetune_settings(args: argparse.Namespace):
    from scratchlm.post.finetune import FinetuneSettings

    return FinetuneSettings(minutes=args.minutes, epochs=args.epochs, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                            val_fraction=args.val_fraction, seed=args.seed, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            lora_targets=args.lora_targets, eval_every=args.eval_every,
                            checkpoint_every=args.checkpoint_every, device=args.device,
                            threads=args.threads, progress=not args.no_progress)


def _add_post_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations: a base model becomes a chat model",
                       description="Fine-tune on instruction/chat data (Alpaca, OpenAI messages, ShareGPT): the "
                                   "loss is taken on the assistant's replies only. OUT_DIR becomes the chat "
                                   "model (with --lora-rank, an adapter directory) with summary.json.")
    p.add_argument("base_dir", metavar="BASE_DIR", help="the model directory to start from")
    _add_finetune_options(p, "conversation")
    p.add_argument("--val-data", nargs="+", default=[], metavar="FILE",
                   help="held-out conversations (default: a --val-fraction slice of --data)")
    p.set_defaults(func=_sft)

    p = sub.add_parser("dpo", help="Direct Preference Optimization on chosen/rejected pairs",
                       description="Tune a chat model (from `scratchlm sft`) towards the chosen replies of "
                                   "preference pairs and away from the rejected ones, against the frozen "
                                   "starting model.")
    p.add_argument("sft_dir", metavar="SFT_DIR", help="the chat model to start from (also the frozen reference)")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    _add_finetune_options(p, "pair")
    p.set_defaults(func=_dpo)

    lora = sub.add_parser("lora", help="LoRA adapter directories")
    lsub = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    p = lsub.add_parser("merge", help="fold an adapter directory's adapters into a plain model directory")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="an adapter directory (sft/dpo with --lora-rank)")
    p.add_argument("-o", "--out", required=True, metavar="MODEL_DIR", help="the model directory to write")
    _add_overwrite_option(p, "model")
    p.set_defaults(func=_lora_merge)


def _sft(args: argparse.Namespace) -> None:
    from scratchlm.post import sft

    summary = sft(args.base_dir, args.data, args.out, _finetune_settings(args), val_files=args.val_data,
                  resume=args.resume, overwrite=args.overwrite)
    print(f"held-out loss on replies: {summary['base_val_loss']:.4f} before, {summary['val_loss']:.4f} after; "
          f"{summary['replies_ended']:.0%} of held-out replies ended their turn; model in {args.out}")


def _dpo(args: argparse.Namespace) -> None:
    from scratchlm.post import dpo

    summary = dpo(args.sft_dir, args.data, args.out, _finetune_settings(args), beta=args.beta,
                  resume=args.resume, overwrite=args.overwrite)
    print(f"held-out preference accuracy {summary['val_preference_accuracy']:.3f}, reward margin "
          f"{summary['val_reward_margin']:.4f}; model in {args.out}")


def _lora_merge(args: argparse.Namespace) -> None:
    from scratchlm.model.directory import merge_adapter

    out = merge_adapter(args.adapter_dir, args.out, overwrite=args.overwrite)
    print(f"merged {args.adapter_dir} into {out}")


# --------------------------------------------------------------------------- export / import
def _add_export_commands(sub: argparse._SubParsersAction) -> None:
    from scratchlm.export import GGUF_DTYPES, HF_DTYPES

    export = sub.add_parser("export", help="write a model directory for transformers (HF) or llama.cpp (GGUF)")
    esub = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    p = esub.add_parser("hf", help="a Hugging Face checkpoint: AutoModelForCausalLM/AutoTokenizer.from_pretrained "
                                   "(and vLLM, TGI) read it")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a scratchlm model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for the checkpoint")
    p.add_argument("--dtype", default="float32", choices=list(HF_DTYPES), help="dtype of the weights")
    _add_overwrite_option(p, "checkpoint")
    p.set_defaults(func=_export_hf)
    p = esub.add_parser("gguf", help="one GGUF file for llama.cpp, Ollama, LM Studio")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a scratchlm model directory")
    p.add_argument("out_file", metavar="OUT.gguf", help="the file to write")
    p.add_argument("--dtype", default="f16", choices=list(GGUF_DTYPES),
                   help="type of the weight matrices (norms and biases stay f32); q8_0: 8-bit, about half of f16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    p.set_defaults(func=_export_gguf)

    imp = sub.add_parser("import", help="a Hugging Face checkpoint (Llama family, Qwen3, GPT-2) as a model directory")
    isub = imp.add_subparsers(dest="import_command", metavar="FORMAT", required=True)
    p = isub.add_parser("hf", help="from a local Hugging Face directory, or from the Hub with --from-hub",
                        description="Import a transformers checkpoint (safetensors, sharded or not, or "
                                    "pytorch_model.bin) with its tokenizer into a scratchlm model directory "
                                    "that generate, train (--model.init_from), eval and export read.")
    p.add_argument("hf_dir", metavar="HF_DIR", nargs="?", default=None,
                   help="a local checkpoint directory (omit it with --from-hub)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write")
    p.add_argument("--from-hub", metavar="REPO_ID", default=None,
                   help="download from the Hugging Face Hub, e.g. openai-community/gpt2 (HF_ENDPOINT, HF_TOKEN apply)")
    p.add_argument("--revision", default=None, help="with --from-hub: a branch, tag or commit (default: main)")
    p.add_argument("--cache-dir", default=None,
                   help="with --from-hub: where downloads are cached (default: the Hugging Face cache, HF_HOME)")
    _add_overwrite_option(p, "model")
    p.set_defaults(func=_import_hf)


def _export_hf(args: argparse.Namespace) -> None:
    from scratchlm.export import export_hf

    out = export_hf(args.model_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.model_dir} to {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _export_gguf(args: argparse.Namespace) -> None:
    from scratchlm.export import export_gguf

    out = export_gguf(args.model_dir, args.out_file, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.model_dir} to {out} ({args.dtype}, {out.stat().st_size / 1e6:,.1f} MB); run it with "
          f"llama-cli -m {out}")


def _import_hf(args: argparse.Namespace) -> None:
    from scratchlm.export import import_hf

    if args.from_hub is None and args.hf_dir is None:
        raise ScratchLMError("import hf needs HF_DIR OUT_DIR, or OUT_DIR with --from-hub REPO_ID")
    if args.from_hub is None and (args.revision or args.cache_dir):
        raise ScratchLMError("--revision and --cache-dir only apply with --from-hub")
    out = import_hf(args.hf_dir, args.out_dir, from_hub=args.from_hub, revision=args.revision,
                    cache_dir=args.cache_dir, overwrite=args.overwrite)
    print(f"imported {args.from_hub or args.hf_dir} into {out}; try: scratchlm generate {out} --prompt 'Hello'")


# --------------------------------------------------------------------------- run (the main job)
def _add_run_command(sub: argparse._SubParsersAction) -> None:
    from scratchlm.data.hub import CORPORA
    from scratchlm.model import PRESETS
    from scratchlm.pipeline import STAGES, RunSettings

    d = RunSettings()
    p = sub.add_parser("run", help="the main job: raw text to an instruction-tuned, evaluated, exported model",
                       description="Train a tokenizer, prepare data, pretrain, instruction-tune (SFT, and DPO "
                                   "with --dpo-data), evaluate, export (Hugging Face and GGUF) and write a "
                                   "report card (md, json, html). Re-running skips finished stages and resumes "
                                   "an interrupted one; a larger --minutes continues pretraining. "
                                   f"Stages: {', '.join(STAGES)}.")
    p.add_argument("--corpus", nargs="+", default=list(d.corpus), metavar="SRC",
                   help=f"training text: 'stdlib' (the Python standard library, offline), a corpus to "
                        f"download ({', '.join(CORPORA)}), or files/directories/globs")
    p.add_argument("--val-corpus", nargs="+", default=[], metavar="SRC",
                   help="held-out text (default: a deterministic split of the corpus)")
    p.add_argument("--split-by-position", action="store_true",
                   help="hold out the last part of the text (for one long document, e.g. Tiny Shakespeare)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS), help="model preset")
    p.add_argument("--minutes", type=float, default=d.minutes, help="pretraining budget in minutes")
    p.add_argument("--sft-minutes", type=float, default=d.sft_minutes, help="SFT budget in minutes")
    p.add_argument("--sft-data", nargs="+", default=[], metavar="FILE",
                   help="conversations to instruction-tune on (Alpaca, OpenAI messages, ShareGPT; default: "
                        "pairs derived from the corpus's documented functions)")
    p.add_argument("--dpo-data", nargs="+", default=[], metavar="FILE",
                   help="preference pairs: adds a DPO stage after SFT")
    p.add_argument("--dpo-minutes", type=float, default=d.dpo_minutes, help="DPO budget in minutes")
    p.add_argument("--stages", default="", metavar="S1,S2",
                   help="run only these stages (comma-separated), e.g. eval,export,report")
    p.add_argument("--skip", default="", metavar="S1,S2", help="run the chain without these stages, e.g. sft")
    p.add_argument("-o", "--out", default="", metavar="DIR", help="run directory (default: runs/<corpus name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace an earlier run's outputs in DIR, or run in a directory "
                        "holding other files (downloads and other files are kept)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary size")
    p.add_argument("--context-length", type=int, default=d.context_length, help="model context in tokens")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="sequences per forward pass")
    p.add_argument("--global-batch-tokens", type=int, default=d.global_batch_tokens, help="tokens per optimizer step")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="auto: cuda, then mps, then cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the whole run")
    p.add_argument("--suite-data", default=d.suite_data, metavar="DIR",
                   help="benchmark task files for the report's suite (default: scratchlm eval's download "
                        "cache; skipped when they are not there)")
    p.add_argument("--suite-limit", type=int, default=d.suite_limit,
                   help="benchmark items scored per task (per subject for MMLU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from scratchlm.pipeline import RunSettings, run_pipeline

    run_pipeline(RunSettings(
        corpus=tuple(args.corpus), val_corpus=tuple(args.val_corpus), preset=args.preset,
        minutes=args.minutes, sft_minutes=args.sft_minutes, sft_data=tuple(args.sft_data),
        dpo_data=tuple(args.dpo_data), dpo_minutes=args.dpo_minutes, stages=_stage_list(args.stages),
        skip=_stage_list(args.skip), out_dir=args.out, vocab_size=args.vocab_size,
        context_length=args.context_length, split_by_position=args.split_by_position,
        micro_batch_size=args.micro_batch_size, global_batch_tokens=args.global_batch_tokens,
        lr=args.lr, seed=args.seed, device=args.device, compile=args.compile, progress=not args.no_progress,
        suite_data=args.suite_data, suite_limit=args.suite_limit,
    ), overwrite=args.overwrite)


def _stage_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


# --------------------------------------------------------------------------- dispatch
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scratchlm", description="From raw text to a language model you trained yourself.")
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_command(sub)
    _add_tokenizer_commands(sub)
    _add_data_commands(sub)
    _add_train_command(sub)
    _add_model_commands(sub)
    _add_plan_command(sub)
    _add_generate_command(sub)
    _add_chat_command(sub)
    _add_serve_command(sub)
    _add_eval_command(sub)
    _add_post_commands(sub)
    _add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`scratchlm tokenizer encode ... | head`): not an error worth a
        # traceback. Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # An OS error about a file (disk full, permissions) that no stage turned into a
        # message: still one line naming the path. One without a path is a bug: traceback.
        if exc.filename is None:
            raise
        from scratchlm.fsutil import describe_os_error

        print(f"scratchlm: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
