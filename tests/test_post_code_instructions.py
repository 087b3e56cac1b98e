"""Instruction pairs derived from Python source (the offline main job's SFT data)."""

from __future__ import annotations

import ast
import json
import sysconfig
import textwrap
from pathlib import Path

from scratchlm.post.code_instructions import code_instruction_pairs, write_code_instructions
from scratchlm.post.formats import read_sft_file

SOURCE = textwrap.dedent('''\
    """A module."""
    import os


    def area(width, height=1):
        """Return the area of a rectangle of the given sides.

        More detail that is not part of the instruction.
        """
        # the product of the sides
        return width * height


    class Stack:
        """A stack."""

        def push(self, item, *, check=False):
            """Put an item on top of the stack, checking its type if asked."""
            def helper():
                """A nested helper is no instruction on its own."""
                return item
            self.items.append(helper())

        def peek(self):
            """Short doc."""
            return self.items[-1]

        def pop(self):
            """Remove and return the item on top of the stack."""
            raise NotImplementedError("subclasses pop")

        def clear(self):
            """Remove every item from the stack at once."""
            ...


    if os.name == "posix":
        async def fetch(url):
            """Fetch the resource at this address and return its bytes."""
            return await get(url)
    ''')


def test_documented_functions_become_instructions_answered_by_their_bodies():
    pairs = list(code_instruction_pairs(SOURCE))
    instructions = [instruction for instruction, _ in pairs]
    assert instructions == [
        "Write a Python function `area(width, height=1)`: Return the area of a rectangle of the given sides.",
        "Write the `Stack` method `push(self, item, *, check=False)`: Put an item on top of the stack, "
        "checking its type if asked.",
        "Write a Python async function `fetch(url)`: Fetch the resource at this address and return its bytes.",
    ]  # not: the nested helper, a 2-word docstring, placeholder bodies (raise NotImplementedError, ...)
    area = pairs[0][1]
    assert area == "def area(width, height=1):\n    # the product of the sides\n    return width * height\n"
    push = pairs[1][1]
    assert push.startswith("def push(self, item, *, check=False):\n    def helper():")
    assert '"""Put an item' not in push and '"""A nested helper' in push  # only its own docstring is cut
    for _, reply in pairs:
        ast.parse(reply)  # every answer is Python that parses, dedented


def test_unparsable_source_gives_no_pairs():
    assert list(code_instruction_pairs("print 'python 2'\n")) == []
    assert list(code_instruction_pairs("")) == []


def test_written_pairs_are_an_sft_file_without_repeats_or_what_does_not_fit(tmp_path):
    out = tmp_path / "pairs.jsonl"
    counts = write_code_instructions([SOURCE, SOURCE], out, fits=lambda messages: "area" not in messages[1]["content"])
    assert counts == {"files": 2, "pairs": 2, "repeated": 3, "too_long": 1}
    conversations = read_sft_file(out)
    assert [[m.role for m in c] for c in conversations] == [["user", "assistant"]] * 2
    assert conversations[0][1].content.startswith("def push(")
    json.loads(out.read_text().splitlines()[0])  # one JSON record per line


def test_the_standard_library_gives_thousands_of_pairs(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("[a-f]*.py"))]
    counts = write_code_instructions(sources, tmp_path / "pairs.jsonl")
    assert counts["pairs"] > 500
    for line in (tmp_path / "pairs.jsonl").read_text().splitlines()[:200]:
        reply = json.loads(line)["messages"][1]["content"]
        ast.parse(reply)
