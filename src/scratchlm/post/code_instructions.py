"""Instruction data from Python source: each documented function becomes one request and its answer.

The offline main job pretrains on the Python standard library, so its instruction tuning
data comes from the same place. A function whose docstring says what it does is a real
instruction written by a person, and its body is a real answer:

    user:       Write a Python function `dedent(text)`: Remove any common leading whitespace
                from every line in `text`.
    assistant:  def dedent(text):
                    ...the body, without the docstring...

Methods name their class ("Write the `Fraction` method `limit_denominator(self, ...)`").
The summary is the docstring's first paragraph on one line. Functions whose body is only
`pass`, `...` or `raise NotImplementedError` answer nothing and are left out, as are
summaries too short to say anything (fewer than MIN_WORDS words) and repeats of an
instruction already taken (overloads, copies across modules).

Pairs come from the documents of a data directory's splits, so the held-out pairs are
functions of held-out files: the model is asked about code it never saw in pretraining.
"""

from __future__ import annotations

import ast
import json
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from scratchlm.fsutil import atomic_write_text

MIN_WORDS = 4  # "Return the value." says too little to write a function from
MAX_WORDS = 80  # longer summaries are usually several paragraphs run together


def code_instruction_pairs(source: str) -> Iterator[tuple[str, str]]:
    """(instruction, reply) for each documented function of one Python file, in source order.
    A file that does not parse (Python 2 code in a corpus, say) gives none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node, owner in _functions(tree, None):
        docstring = ast.get_docstring(node, clean=True)
        summary = " ".join(docstring.split("\n\n")[0].split()) if docstring else ""
        if not MIN_WORDS <= len(summary.split()) <= MAX_WORDS:
            continue
        reply = _body_without_docstring(node, lines)
        if reply is None:
            continue
        kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
        signature = f"`{node.name}({ast.unparse(node.args)})`"
        what = f"the `{owner}` method {signature}" if owner else f"a Python {kind} {signature}"
        yield f"Write {what}: {summary}", reply


def _functions(node: ast.AST, owner: str | None) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]]:
    """Functions and methods in source order (not those nested inside other functions: their
    meaning depends on the enclosing function's locals), each with its class, if any."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, owner
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, child.name)
        elif not isinstance(child, ast.expr):  # if/try blocks at module or class level hold definitions too
            yield from _functions(child, owner)


def _body_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source from `def` to its last line, the docstring's lines cut out and the
    whole dedented; None when nothing but a placeholder is left."""
    docstring, rest = node.body[0], node.body[1:]
    if not rest or all(_is_placeholder(statement) for statement in rest):
        return None
    first = node.lineno - 1  # the `def` line (decorators are left out: the instruction names no decorator)
    kept = lines[first:docstring.lineno - 1] + lines[docstring.end_lineno:node.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def _is_placeholder(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True  # `...` or a second string
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        raised = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"
    return False


def write_code_instructions(sources: Iterable[str], out_file: Path,
                            fits: Callable[[list[dict[str, str]]], bool] | None = None) -> dict[str, int]:
    """Write the pairs of `sources` (Python files' text) to `out_file` as OpenAI-messages JSON
    lines, leaving out repeated instructions and the pairs `fits` rejects (given the messages:
    a conversation longer than the model's context teaches it nothing about where an answer
    ends). Returns counts of what was kept and left out."""
    seen: set[str] = set()
    records: list[str] = []
    counts = {"files": 0, "pairs": 0, "repeated": 0, "too_long": 0}
    for source in sources:
        counts["files"] += 1
        for instruction, reply in code_instruction_pairs(source):
            if instruction in seen:
                counts["repeated"] += 1
                continue
            seen.add(instruction)
            messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": reply}]
            if fits is not None and not fits(messages):
                counts["too_long"] += 1
                continue
            records.append(json.dumps({"messages": messages}, ensure_ascii=False))
    counts["pairs"] = len(records)
    atomic_write_text(out_file, "".join(record + "\n" for record in records))
    return counts
