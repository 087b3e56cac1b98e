"""SFT and preference data files: every format from small files, every shared file with its
expected count, one-line errors naming file:line, record and field, and the held-out split."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.post.chat import Message
from scratchlm.post.formats import PreferencePair, read_preference_file, read_sft_file, split_held_out
from tests.conftest import REPO_ROOT, shared_file


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str, train: bool = True) -> Message:
    return Message("assistant", text, train)


# --------------------------------------------------------------------------- SFT formats
ALPACA = [
    {"instruction": "Translate to French.", "input": "Where is it?", "output": "Où est-il ?"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Continue.", "output": "Done.", "system": "Be terse.",
     "history": [["Say hi.", "Hi."], ["Say bye.", "Bye."]]},
]
ALPACA_CONVERSATIONS = [
    [user("Translate to French.\n\nWhere is it?"), assistant("Où est-il ?")],
    [user("Name a color."), assistant("Blue.")],
    [Message("system", "Be terse."), user("Say hi."), assistant("Hi."), user("Say bye."), assistant("Bye."),
     user("Continue."), assistant("Done.")],
]


@pytest.mark.parametrize("writer, name", [(write_json, "alpaca.json"), (write_jsonl, "alpaca.jsonl")])
def test_alpaca_as_json_list_or_json_lines(tmp_path, writer, name):
    assert read_sft_file(writer(tmp_path / name, ALPACA)) == ALPACA_CONVERSATIONS


def test_openai_chat_messages_with_weights(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "You help."}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "3", "weight": 0}, {"role": "user", "content": "Really?"},
                      {"role": "assistant", "content": "2", "weight": 1}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    assert read_sft_file(write_jsonl(tmp_path / "chat.jsonl", records)) == [
        [Message("system", "You help."), user("1+1?"), assistant("3", train=False), user("Really?"), assistant("2")],
        [user("Hi"), assistant("Hello")],
    ]


def test_sharegpt_conversations_with_system_field(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be kind."},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
    ]
    assert read_sft_file(write_json(tmp_path / "sharegpt.json", records)) == [
        [Message("system", "Be kind."), user("Hi"), assistant("Hello")],
        [Message("system", "S"), user("Q"), assistant("A")],
    ]


def test_llama_factory_content_parts_and_loss_weights(tmp_path):
    records = [{"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Tell "}, {"type": "text", "value": "me."}],
         "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "Skipped."}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "value": "Again."}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "Trained."}], "loss_weight": 1.0},
    ]}]
    assert read_sft_file(write_jsonl(tmp_path / "lf.jsonl", records)) == [
        [user("Tell me."), assistant("Skipped.", train=False), user("Again."), assistant("Trained.")]]


# --------------------------------------------------------------------------- preference formats
def test_alpaca_preference_skips_and_counts_equal_pairs(tmp_path):
    records = [
        {"instruction": "Fix: he go.", "input": "", "output": "He goes.", "chosen": "He goes.", "rejected": "He go."},
        {"instruction": "Same?", "input": "x", "output": "y", "chosen": "y", "rejected": "y"},
        {"instruction": "Add.", "input": "1+1", "output": "2", "chosen": "2", "rejected": "11", "system": "Math."},
    ]
    pairs, skipped = read_preference_file(write_json(tmp_path / "pref.json", records))
    assert skipped == 1
    assert pairs == [PreferencePair([user("Fix: he go.")], "He goes.", "He go."),
                     PreferencePair([Message("system", "Math."), user("Add.\n\n1+1")], "2", "11")]
    assert pairs[0].conversation(pairs[0].rejected) == [user("Fix: he go."), assistant("He go.")]


def test_sharegpt_preference(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                  {"from": "human", "value": "Q2"}],
                "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}]
    pairs, skipped = read_preference_file(write_json(tmp_path / "dpo.json", records))
    assert skipped == 0
    assert pairs == [PreferencePair([user("Q1"), assistant("A1"), user("Q2")], "good", "bad")]


def test_openai_style_preference_with_string_or_message_prompts(tmp_path):
    records = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    pairs, _ = read_preference_file(write_jsonl(tmp_path / "trl.jsonl", records))
    assert pairs == [PreferencePair([user("Hi?")], "Hello!", "Go away."),
                     PreferencePair([Message("system", "S"), user("Q")], "yes", "no")]


# --------------------------------------------------------------------------- the shared files
@pytest.mark.parametrize("relative, count", [
    ("sft/instruction_data_1k.json", 1100), ("sft/alpaca_en_demo.json", 999), ("sft/chat_demo.jsonl", 500)])
def test_shared_sft_files_load(relative, count):
    conversations = read_sft_file(shared_file(relative))
    assert len(conversations) == count
    assert all(c[-1].role == "assistant" and c[-1].train for c in conversations)


@pytest.mark.parametrize("relative, count, skipped", [
    ("preference/instruction_preference_1k.json", 1094, 6), ("preference/dpo_en_demo.json", 300, 0)])
def test_shared_preference_files_load(relative, count, skipped):
    pairs, equal = read_preference_file(shared_file(relative))
    assert (len(pairs), equal) == (count, skipped)
    assert all(p.prompt[-1].role == "user" and p.chosen != p.rejected for p in pairs)


# --------------------------------------------------------------------------- errors
def _alpaca_list_with(bad: dict) -> str:
    """A pretty-printed JSON list whose second record (starting on line 7) is `bad`."""
    return json.dumps([{"instruction": "i", "input": "", "output": "o"}, bad], indent=2)


SFT_ERRORS = [
    ("missing-field", "a.json", _alpaca_list_with({"instruction": "i", "input": ""}),
     r"^{path}:7: record 2: missing field 'output'$"),
    ("wrong-type", "a.json", _alpaca_list_with({"instruction": "i", "output": 5}),
     r"^{path}:7: record 2: field 'output': expected a string, got a number$"),
    ("empty-reply", "a.json", _alpaca_list_with({"instruction": "i", "output": "  "}),
     r"^{path}:7: record 2: field 'output': empty assistant reply$"),
    ("nothing-asked", "a.json", _alpaca_list_with({"instruction": "", "input": "", "output": "o"}),
     r"^{path}:7: record 2: fields 'instruction' and 'input' are both empty"),
    ("invalid-json-list", "a.json", '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": }\n]',
     r"^{path}:3: invalid JSON \(Expecting value, column 19\)$"),
    ("invalid-jsonl", "a.jsonl", '{"instruction": "i", "output": "o"}\n\n{"instruction": "i",\n',
     r"^{path}:3: invalid JSON \(Expecting property name enclosed in double quotes, column 21\)$"),
    ("missing-comma", "a.json", '[{"instruction": "i", "output": "o"}\n {"instruction": "j", "output": "p"}]',
     r"^{path}:2: invalid JSON \(expected ',' or '\]' after a record\)$"),
    ("extra-data", "a.json", '[{"instruction": "i", "output": "o"}]\n[]', r"^{path}:2: invalid JSON \(extra data"),
    ("unknown-role", "a.jsonl",
     '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     r"^{path}:1: record 1: messages\[0\]\.role: unknown role 'bot' \(valid: system, user, assistant\)$"),
    ("content-type", "a.jsonl", '{"messages": [{"role": "user", "content": null}]}',
     r"^{path}:1: record 1: messages\[0\]: field 'content' is null$"),
    ("no-assistant", "a.jsonl", '{"messages": [{"role": "user", "content": "x"}]}',
     r"^{path}:1: record 1: messages: no assistant turn to train on$"),
    ("system-late", "a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
                               '{"role": "assistant", "content": "y"}]}',
     r"^{path}:1: record 1: messages\[1\]\.role: a system message may only come first$"),
    ("fractional-weight", "a.jsonl", '{"messages": [{"role": "user", "content": "x"}, '
                                     '{"role": "assistant", "content": "y", "loss_weight": 0.5}]}',
     r"^{path}:1: record 1: messages\[1\]\.loss_weight: only 0 or 1 is supported"),
    ("image-part", "a.jsonl", '{"messages": [{"role": "user", "content": [{"type": "image", "value": "a.png"}]}]}',
     r"^{path}:1: record 1: messages\[0\]: content\[0\]: part of type 'image' is not supported \(text only\)$"),
    ("sharegpt-role", "a.json", '[{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}]',
     r"^{path}:1: record 1: conversations\[1\]\.from: unknown role 'bot' \(valid: human, gpt, system\)$"),
    ("sharegpt-empty", "a.json", '[{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}]',
     r"^{path}:1: record 1: conversations\[1\]\.value: empty assistant message$"),
    ("unknown-format", "a.jsonl", '{"text": "just a document"}',
     r"^{path}:1: record 1: not in any SFT format scratchlm reads \(tried OpenAI chat / LLaMA-Factory \{messages\}; "
     r"ShareGPT \{conversations\}; Alpaca \{instruction, input, output\}\); its fields are 'text'$"),
    ("not-an-object", "a.json", '[["user", "hi"]]', r"^{path}:1: record 1: expected a JSON object, got a list$"),
    ("one-object", "a.json", '{\n  "data": []\n}',
     r"^{path}: a single JSON value \(an object\); expected a JSON list of records or JSON Lines"),
    ("empty-list", "a.json", "[ ]", r"^{path}: no records$"),
    ("empty-file", "a.jsonl", "\n", r"^{path}: no records$"),
]


@pytest.mark.parametrize("case, name, text, match", SFT_ERRORS, ids=[c[0] for c in SFT_ERRORS])
def test_bad_sft_files_give_one_line_errors(tmp_path, case, name, text, match):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScratchLMError, match=match.replace("{path}", re.escape(str(path)))) as error:
        read_sft_file(path)
    assert "\n" not in str(error.value)


PREFERENCE_ERRORS = [
    ("reply-not-gpt", '[{"conversations": [{"from": "human", "value": "q"}], '
                      '"chosen": {"from": "human", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]',
     r"^{path}:1: record 1: chosen\.from: the reply must come from 'gpt', not 'user'$"),
    ("prompt-ends-with-gpt", '[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '
                             '"chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]',
     r"^{path}:1: record 1: conversations\[1\]\.from: the conversation must end with a user message"),
    ("empty-rejected", '[{"instruction": "q", "chosen": "a", "rejected": ""}]',
     r"^{path}:1: record 1: field 'rejected': empty assistant reply$"),
    ("two-replies", '[{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}], "rejected": "c"}]',
     r"^{path}:1: record 1: field 'chosen': expected one assistant message, got 2 messages$"),
    ("unknown-format", '[{"question": "q", "answer": "a"}]',
     r"^{path}:1: record 1: not in any preference format scratchlm reads \(tried ShareGPT"),
]


@pytest.mark.parametrize("case, text, match", PREFERENCE_ERRORS, ids=[c[0] for c in PREFERENCE_ERRORS])
def test_bad_preference_files_give_one_line_errors(tmp_path, case, text, match):
    path = tmp_path / "pref.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScratchLMError, match=match.replace("{path}", re.escape(str(path)))):
        read_preference_file(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ScratchLMError, match="nope.json: not found"):
        read_sft_file(tmp_path / "nope.json")
    with pytest.raises(ScratchLMError, match="is a directory"):
        read_sft_file(tmp_path)


# --------------------------------------------------------------------------- held-out split
def test_split_held_out_is_deterministic_and_stable_when_data_is_added():
    items = [[user(f"question {i}"), assistant(f"answer {i}")] for i in range(2000)]
    train, held_out = split_held_out(items, 0.1, seed=7)
    assert len(train) + len(held_out) == 2000 and 150 < len(held_out) < 250
    assert split_held_out(items, 0.1, seed=7) == (train, held_out)
    assert split_held_out(items[::-1], 0.1, seed=7) == (train[::-1], held_out[::-1])
    more = items + [[user(f"new {i}"), assistant("x")] for i in range(500)]
    _, more_held_out = split_held_out(more, 0.1, seed=7)
    assert more_held_out[:len(held_out)] == held_out  # old items keep their side
    assert split_held_out(items, 0.1, seed=8)[1] != held_out
    assert split_held_out(items, 0.0, seed=7) == (items, [])
    with pytest.raises(ScratchLMError, match="fraction must be at least 0 and below 1, got 1.0"):
        split_held_out(items, 1.0, seed=7)


def test_split_held_out_is_the_same_in_another_process():
    pairs = [PreferencePair([user(f"q{i}")], f"good {i}", f"bad {i}") for i in range(200)]
    _, held_out = split_held_out(pairs, 0.2, seed=1)
    script = ("from scratchlm.post.formats import PreferencePair, split_held_out\n"
              "from scratchlm.post.chat import Message\n"
              "pairs = [PreferencePair([Message('user', f'q{i}')], f'good {i}', f'bad {i}') for i in range(200)]\n"
              "print([p.chosen for p in split_held_out(pairs, 0.2, seed=1)[1]])\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                         check=True).stdout
    assert out.strip() == repr([p.chosen for p in held_out])
