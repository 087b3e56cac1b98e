"""The `scratchlm` command line.

Thin by design: each subcommand parses its arguments and calls one public function of the
stage it belongs to, so everything here can be done from Python with the same names.
Stage imports happen inside the handlers so `scratchlm --help` stays fast.

Each pipeline stage owns one `_add_<stage>_commands` function below.
"""

from __future__ import annotations

import argparse
import sys

from scratchlm import __version__
from scratchlm.errors import ScratchLMError


# --------------------------------------------------------------------------- tokenizer
def _add_tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train and use a byte-level BPE tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)

    p = tsub.add_parser("train", help="train a BPE tokenizer on text files")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--special-token", action="append", default=None, metavar="T",
                   help="special token (repeatable); default: <|endoftext|>")
    p.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2",
                   help="pre-tokenization regex")
    p.add_argument("--workers", type=int, default=None, help="pre-tokenization processes")
    p.add_argument("-o", "--out", required=True, metavar="DIR")
    p.set_defaults(func=_tokenizer_train)


def _tokenizer_train(args: argparse.Namespace) -> None:
    raise ScratchLMError("tokenizer train is not available yet")


# --------------------------------------------------------------------------- dispatch
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="From raw text to a language model you trained yourself.",
    )
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenizer_commands(sub)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
