"""Every option of every command is documented, with its default, as a new user reads it."""

from __future__ import annotations

import argparse

import pytest

from scratchlm.cli import build_parser, main
from scratchlm.model import PRESETS


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every command that takes options."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_showing_its_default(path, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help text"
        shown = formatter._get_help_string(action)
        has_default = action.default not in (None, False, [], argparse.SUPPRESS)
        if has_default or action.default is argparse.SUPPRESS:  # config overrides show the file default
            assert "default" in shown, f"{' '.join(path)} {action.option_strings[0]}: {shown!r}"


def test_help_lists_presets_defaults_and_value_types(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS)
    assert "(default: 5.0)" in text and "(default: 2048)" in text  # --minutes, --vocab-size
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--run.max_steps INT|null" in text and "budget in optimizer steps (default: null)" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 0.8)" in capsys.readouterr().out  # --temperature


def test_null_works_for_every_optional_field_however_spelled():
    from scratchlm.train import load_train_config

    for spelling in ("null", "None", "none", "~"):
        config = load_train_config(None, ["data.dir=d", "run.max_minutes=1", f"run.max_steps={spelling}",
                                          f"data.tokenizer={spelling}", f"run.threads={spelling}"])
        assert config.run.max_steps is None and config.data.tokenizer is None and config.run.threads is None


def test_building_the_parser_does_not_import_torch():
    # `scratchlm --help` (and every argparse error) stays instant: stages load torch in their
    # handlers, not while the options are declared.
    import subprocess
    import sys

    code = "import sys, scratchlm.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
