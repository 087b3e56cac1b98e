"""The benchmark tasks, with lm-evaluation-harness's prompts, targets and metrics.

Each task turns its file (layout: scratchlm.eval.datasets) into `Item`s: the (context,
continuation) requests to score and which one is right. The prompts are the harness's own
task definitions, reproduced from its YAML/utils:

  hellaswag       "{activity_label}: {ctx_a} {ctx_b.capitalize()}" after the harness's
                  `preprocess` (strip, " [title]" -> ". ", drop [bracketed] artifacts, double
                  spaces); continuations " {ending}" (also preprocessed). acc, acc_norm.
  arc_easy/_challenge, piqa
                  "Question: {question}\\nAnswer:", continuations " {choice}". acc, acc_norm.
  winogrande      partial scoring: one context per option, "{sentence up to the blank}{option}",
                  the same continuation " {rest of the sentence}" scored under each. acc.
  lambada_openai  "{text without its last word}" -> " {last word}": acc is "the greedy
                  continuation is exactly the word", perplexity exp(-mean log-likelihood).
  mmlu            "The following are multiple choice questions (with answers) about
                  {subject}.\\n\\n" + K solved dev examples + "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..
                  \\nAnswer:", continuations " A".." D". acc over all items of all subjects. Files:
                  CSV with the header question,choice0,choice1,choice2,choice3,answer (0-3).

acc picks the choice with the highest log-likelihood; acc_norm divides each by the length of
its choice string in characters (the harness's `acc_norm`). Standard errors are the sample
standard deviation over items / sqrt(n), as the harness reports them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from scratchlm.errors import ScratchLMError

MULTIPLE_CHOICE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu")
LOGLIKELIHOOD_TASKS = (*MULTIPLE_CHOICE, "lambada_openai")
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


@dataclass(frozen=True)
class Item:
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    choices: tuple[str, ...]  # the choice strings (acc_norm divides by their length)
    gold: int
    text: str  # the item itself, without few-shot examples: what contamination looks for
    where: str  # file:line, for --log-samples and errors


# --------------------------------------------------------------------------- readers
def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise ScratchLMError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ScratchLMError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ScratchLMError(f"{where}: expected a JSON object")
            yield where, record


def _field(record: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in record:
        raise ScratchLMError(f"{where}: missing field {name!r}")
    value = record[name]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # HellaSwag's original files store the label as a string
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ScratchLMError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _choices(record: dict[str, Any], name: str, where: str) -> list[str]:
    values = _field(record, name, list, where)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise ScratchLMError(f"{where}: field {name!r} must be a list of at least two strings")
    return values


def _gold(record: dict[str, Any], name: str, count: int, where: str) -> int:
    gold = _field(record, name, int, where)
    if not 0 <= gold < count:
        raise ScratchLMError(f"{where}: field {name!r} = {gold} is not the index of one of the {count} choices")
    return gold


def _multiple_choice(context: str, choices: list[str], gold: int, where: str) -> Item:
    return Item(tuple((context, " " + choice) for choice in choices), tuple(choices), gold,
                f"{context} {choices[gold]}", where)


# --------------------------------------------------------------------------- tasks
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow section markers
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Item]:
    items = []
    for where, record in _json_lines(path):
        context = (_field(record, "ctx_a", str, where) + " "
                   + _field(record, "ctx_b", str, where).capitalize())
        query = _hellaswag_preprocess(_field(record, "activity_label", str, where) + ": " + context)
        choices = [_hellaswag_preprocess(e) for e in _choices(record, "endings", where)]
        items.append(_multiple_choice(query, choices, _gold(record, "label", len(choices), where), where))
    return items


def load_question_answer(path: Path) -> list[Item]:
    """ARC and PIQA in the layout's {"query": "Question: ...", "choices", "gold"} records."""
    items = []
    for where, record in _json_lines(path):
        query = _field(record, "query", str, where)
        if not query.startswith("Question: "):
            raise ScratchLMError(f"{where}: field 'query' should start with 'Question: '")
        # The layout keeps "Question: {question}" (PIQA's with a newline after it); the
        # harness's prompt is "Question: {question}\nAnswer:".
        context = query.removesuffix("\n") + "\nAnswer:"
        choices = _choices(record, "choices", where)
        items.append(_multiple_choice(context, choices, _gold(record, "gold", len(choices), where), where))
    return items


def load_winogrande(path: Path) -> list[Item]:
    items = []
    for where, record in _json_lines(path):
        contexts = _choices(record, "context_options", where)
        continuation = " " + _field(record, "continuation", str, where)
        gold = _gold(record, "gold", len(contexts), where)
        items.append(Item(tuple((context, continuation) for context in contexts), tuple(contexts), gold,
                          contexts[gold] + continuation, where))
    return items


def load_lambada(path: Path) -> list[Item]:
    items = []
    for where, record in _json_lines(path):
        context = _field(record, "context", str, where)
        word = _field(record, "continuation", str, where).strip()
        if not word:
            raise ScratchLMError(f"{where}: field 'continuation' is empty")
        items.append(Item(((context, " " + word),), (word,), 0, f"{context} {word}", where))
    return items


def load_mmlu(directory: Path, shots: int) -> list[Item]:
    """The test split when the data has one (mmlu/test/*_test.csv), else the dev split; the
    few-shot examples are the first `shots` dev questions of the subject, never the item."""
    dev = {path.name.removesuffix("_dev.csv"): _read_mmlu_csv(path) for path in sorted((directory / "dev").glob("*_dev.csv"))}
    tests = {path.name.removesuffix("_test.csv"): _read_mmlu_csv(path)
             for path in sorted((directory / "test").glob("*_test.csv"))}
    scored = tests or dev
    if not scored:
        raise ScratchLMError(f"{directory}: no MMLU files (expected dev/<subject>_dev.csv, test/<subject>_test.csv)")
    items = []
    for subject, questions in scored.items():
        examples = dev.get(subject, [])
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for where, question in questions:
            pool = [example for example in examples if example[0] != where]
            if shots > len(pool):
                raise ScratchLMError(f"--shots {shots} is more than the {len(pool)} dev examples of MMLU subject "
                                     f"{subject!r} available for {where}")
            solved = "".join(_mmlu_prompt(example) + " " + MMLU_LETTERS[example["answer"]] + "\n\n"
                             for _, example in pool[:shots])
            prompt = _mmlu_prompt(question)
            items.append(Item(tuple((header + solved + prompt, " " + letter) for letter in MMLU_LETTERS),
                              MMLU_LETTERS, question["answer"], f"{prompt} {MMLU_LETTERS[question['answer']]}", where))
    return items


def _mmlu_prompt(question: dict[str, Any]) -> str:
    options = "".join(f"\n{letter}. {question[f'choice{i}']}" for i, letter in enumerate(MMLU_LETTERS))
    return f"{question['question'].strip()}{options}\nAnswer:"


def _read_mmlu_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise ScratchLMError(f"{path}: cannot read ({exc.strerror or exc})") from None
    rows = []
    with handle:
        reader = csv.DictReader(handle)
        missing = [name for name in MMLU_COLUMNS if name not in (reader.fieldnames or [])]
        if missing:
            raise ScratchLMError(f"{path}:1: header lacks column(s) {', '.join(missing)} (expected "
                                 f"{','.join(MMLU_COLUMNS)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if any(row[name] is None for name in MMLU_COLUMNS):
                raise ScratchLMError(f"{where}: too few columns")
            answer = row["answer"].strip()
            if answer in MMLU_LETTERS:
                answer = str(MMLU_LETTERS.index(answer))
            if answer not in ("0", "1", "2", "3"):
                raise ScratchLMError(f"{where}: answer {row['answer']!r} is not 0-3 (or A-D)")
            rows.append((where, {**row, "answer": int(answer)}))
    return rows


LOADERS: dict[str, Callable[[Path], list[Item]]] = {
    "hellaswag": load_hellaswag,
    "arc_easy": load_question_answer,
    "arc_challenge": load_question_answer,
    "piqa": load_question_answer,
    "winogrande": load_winogrande,
    "lambada_openai": load_lambada,
}


def load_items(task: str, path: Path, shots: int = 0) -> list[Item]:
    if task == "mmlu":
        return load_mmlu(path, shots)
    if shots:
        raise ScratchLMError(f"--shots applies to mmlu only (the harness draws {task}'s few-shot examples from a "
                             f"training split this data does not have)")
    return LOADERS[task](path)


# --------------------------------------------------------------------------- metrics
def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as the harness."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def chance(items: list[Item]) -> float:
    """Expected accuracy of guessing: the mean of 1/choices over items."""
    return sum(1 / len(item.choices) for item in items) / len(items)
