"""Benchmark data for `scratchlm eval`: one directory layout, filled from the Hub or given as is.

A data directory holds one file (or, for MMLU, one directory) per task, in the layout and the
formats of `shared/data/eval`, so a single reader serves a directory the user passes
(`--data-dir`) and the cache that `download_eval_data` fills from the Hugging Face Hub:

    hellaswag_val.jsonl      HellaSwag validation (10,042), the original HellaSwag JSON lines:
                             ind, activity_label, ctx_a, ctx_b, ctx, split, split_type, label (an
                             int), endings, source_id. (`hellaswag_val_1k.jsonl`, a 1,000-item
                             sample in the same format, is accepted in its place.)
    arc_easy.jsonl           ARC-Easy test (2,376)        } mosaicml/llm-foundry's local_data
    arc_challenge.jsonl      ARC-Challenge test (1,172)   } format: {"query", "choices", "gold"}
    piqa.jsonl               PIQA validation (1,838)      }
    winogrande.jsonl         WinoGrande xl validation (1,267): {"context_options", "continuation", "gold"}
    lambada_openai.jsonl     LAMBADA, OpenAI's version, test (5,153): {"context", "continuation"}
    mmlu/test/<subject>_test.csv, mmlu/dev/<subject>_dev.csv
                             MMLU test (14,042) and dev (57 x 5), one CSV per subject with the
                             header question,choice0,choice1,choice2,choice3,answer (answer 0-3)

These are the splits lm-evaluation-harness scores, from the repositories its task definitions
load. The rules below turn each Hub file into its task file. They reproduce how the shared files
were made (checked on real items found in both forms, and by re-serialising every shared line
byte for byte), and they keep all the harness's prompts need, so its exact requests can be
rebuilt from either kind of directory:

- HellaSwag: the fields unchanged, in the original file's key order (its WikiHow items list
  ctx first, which no JSON reader sees); `label`, a string on the Hub, becomes an int as in the
  original JSON lines.
- ARC: query = "Question: " + question (nothing appended: the harness adds "\\nAnswer:"),
  choices = choices.text (every one, in order), gold = the index of answerKey in
  choices.label (labels are "A".."E" or "1".."5"). The harness scores the few items with 3 or
  5 choices as they are; the shared files show 4 choices throughout, so how llm-foundry
  treated those items could not be confirmed.
- PIQA: query = "Question: " + goal + "\\n" (the harness adds "Answer:"), choices = [sol1,
  sol2], gold = label.
- WinoGrande, as the harness's partial scoring: with i the index of the blank "_" in the
  sentence, context_options = [sentence[:i] + option1, sentence[:i] + option2], continuation =
  sentence[i + 1:].strip() (the harness scores it with a leading space), gold = int(answer) - 1.
- LAMBADA: the text split on single spaces (not on any whitespace: a few last "words" begin
  with line breaks, e.g. "\\n\\nrecorder"); context = all but the last piece joined by spaces,
  continuation = the last piece, without the leading space the harness scores it with.
- MMLU: one CSV per subject, rows in the Hub's order; the Hub's `all` configuration holds every
  subject in one file per split, with a `subject` column. Written as pandas' `to_csv(index=False)`
  writes (how the shared files were made from cais/mmlu): minimal quoting, "\\n" line ends.

JSON lines are `json.dumps(record, ensure_ascii=False)` with the keys in the shared files' order.

Downloads go through huggingface_hub into a temporary directory that is removed afterwards:
what stays is the converted files, each written atomically (a whole MMLU split directory
appears at once), so a failed or interrupted download leaves nothing half-made, and the files
of tasks that completed before a failure are kept. Files already in the cache are not fetched
again, and then the Hub is not contacted at all. The endpoint is `endpoint`, else
`HF_ENDPOINT` (read at call time), else the Hub itself.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import atomic_directory, atomic_write_bytes

# task -> the paths in a data directory that can hold it, in order of preference.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "hellaswag": ("hellaswag_val.jsonl", "hellaswag_val_1k.jsonl"),
    "arc_easy": ("arc_easy.jsonl",),
    "arc_challenge": ("arc_challenge.jsonl",),
    "piqa": ("piqa.jsonl",),
    "winogrande": ("winogrande.jsonl",),
    "lambada_openai": ("lambada_openai.jsonl",),
    "mmlu": ("mmlu",),
}

CACHE_VARIABLE = "SCRATCHLM_CACHE"


def eval_cache_dir() -> Path:
    """Where downloaded benchmark data is kept: $SCRATCHLM_CACHE/eval, else ~/.cache/scratchlm/eval."""
    root = os.environ.get(CACHE_VARIABLE)
    return Path(root) / "eval" if root else Path.home() / ".cache" / "scratchlm" / "eval"


def task_path(data_dir: Path, task: str) -> Path:
    """The file (directory, for mmlu) of `task` in `data_dir`: the first of TASK_FILES[task] there."""
    data_dir = Path(data_dir)
    candidates = TASK_FILES[_check_task(task)]
    if not data_dir.is_dir():
        raise ScratchLMError(f"data directory {data_dir} does not exist")
    for name in candidates:
        if (data_dir / name).exists():
            return data_dir / name
    raise ScratchLMError(f"{data_dir} has no {task} data: expected {' or '.join(candidates)}")


# --------------------------------------------------------------------------- conversions
# Keys in the order of the original HellaSwag files (and of the shared sample).
_HELLASWAG_KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label",
                   "endings", "source_id")
_MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _json_lines(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def _hellaswag(path: Path) -> bytes:
    records = []
    for row in _parquet_rows(path):
        record = {key: row[key] for key in _HELLASWAG_KEYS if key in row}
        record["label"] = int(row["label"])
        records.append(record)
    return _json_lines(records)


def _arc(path: Path) -> bytes:
    return _json_lines({"choices": row["choices"]["text"],
                        "query": f"Question: {row['question']}",
                        "gold": row["choices"]["label"].index(row["answerKey"])}
                       for row in _parquet_rows(path))


def _piqa(path: Path) -> bytes:
    return _json_lines({"choices": [row["sol1"], row["sol2"]], "gold": int(row["label"]),
                        "query": f"Question: {row['goal']}\n"}
                       for row in _parquet_rows(path))


def _winogrande(path: Path) -> bytes:
    records = []
    for row in _parquet_rows(path):
        sentence = row["sentence"]
        blank = sentence.index("_")
        records.append({"context_options": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
                        "continuation": sentence[blank + 1:].strip(),
                        "gold": int(row["answer"]) - 1})
    return _json_lines(records)


def _lambada(path: Path) -> bytes:
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 is text
        if line.strip():
            *context, last = json.loads(line)["text"].split(" ")
            records.append({"context": " ".join(context), "continuation": last})
    return _json_lines(records)


def _mmlu(split: str) -> Callable[[Path], dict[str, bytes]]:
    def convert(path: Path) -> dict[str, bytes]:
        by_subject: dict[str, list[list[Any]]] = {}
        for row in _parquet_rows(path):
            if len(row["choices"]) != 4:
                raise ValueError(f"a {row['subject']} question has {len(row['choices'])} choices, not 4")
            by_subject.setdefault(row["subject"], []).append([row["question"], *row["choices"], row["answer"]])
        files = {}
        for subject, rows in by_subject.items():
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(_MMLU_HEADER)
            writer.writerows(rows)
            files[f"{subject}_{split}.csv"] = text.getvalue().encode("utf-8")
        return files
    return convert


@dataclass(frozen=True)
class _Output:
    """One file (or directory of files) of the data layout, made from one file of a Hub dataset."""

    path: str                    # relative to the data directory
    repo_id: str
    revision: str                # a commit: the content cannot change under the pin
    filename: str
    convert: Callable[[Path], bytes | dict[str, bytes]]  # bytes: a file; {name: bytes}: a directory

    @property
    def source(self) -> str:
        return f"{self.repo_id}/{self.filename}"


# The repositories lm-evaluation-harness's tasks load (dataset_path/dataset_name in its YAMLs;
# PIQA moved to baber/piqa, a Parquet copy of the script-only ybisk/piqa), each at a commit
# that published evaluation setups pin together with this exact file, most of them with its
# sha256 and row count. The LAMBADA pin rests on one such source (with the sha256 of OpenAI's
# own file); the Hub itself could not be reached from where this was written.
_ARC = ("allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453")
_MMLU = ("cais/mmlu", "c30699e8356da336a370243923dbaf21066bb9fe")
OUTPUTS: dict[str, tuple[_Output, ...]] = {
    "hellaswag": (_Output("hellaswag_val.jsonl", "Rowan/hellaswag", "218ec52e09a7e7462a5400043bb9a69a41d06b76",
                          "data/validation-00000-of-00001.parquet", _hellaswag),),
    "arc_easy": (_Output("arc_easy.jsonl", *_ARC, "ARC-Easy/test-00000-of-00001.parquet", _arc),),
    "arc_challenge": (_Output("arc_challenge.jsonl", *_ARC, "ARC-Challenge/test-00000-of-00001.parquet", _arc),),
    "piqa": (_Output("piqa.jsonl", "baber/piqa", "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1",
                     "piqa_validation.parquet", _piqa),),
    "winogrande": (_Output("winogrande.jsonl", "allenai/winogrande", "01e74176c63542e6b0bcb004dcdea22d94fb67b5",
                           "winogrande_xl/validation-00000-of-00001.parquet", _winogrande),),
    # The "default" configuration, OpenAI's own lambada_test.jsonl, which the harness's
    # lambada_openai loads ("en" belongs to its multilingual variant).
    "lambada_openai": (_Output("lambada_openai.jsonl", "EleutherAI/lambada_openai",
                               "900124bf3b8235c6daf21033af9948b3f07346c4", "data/lambada_test.jsonl", _lambada),),
    "mmlu": (_Output("mmlu/test", *_MMLU, "all/test-00000-of-00001.parquet", _mmlu("test")),
             _Output("mmlu/dev", *_MMLU, "all/dev-00000-of-00001.parquet", _mmlu("dev"))),
}


# --------------------------------------------------------------------------- download
def download_eval_data(tasks: Iterable[str], cache_dir: str | os.PathLike | None = None, *,
                       endpoint: str | None = None, progress: bool = True) -> Path:
    """Fetch and convert the data `tasks` need into `cache_dir` (default `eval_cache_dir()`),
    skipping what is already there; returns `cache_dir`, a data directory in the layout above."""
    from huggingface_hub import constants

    from scratchlm.data.hub import fail_if_unreachable

    names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
    for name in names:
        _check_task(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else eval_cache_dir()
    missing = [output for name in names for output in OUTPUTS[name] if not _present(cache_dir / output.path)]
    if not missing:
        return cache_dir
    what = f"cannot download eval data for {', '.join(names)}"
    if constants.HF_HUB_OFFLINE:
        raise ScratchLMError(f"{what}: HF_HUB_OFFLINE is set (give a data directory with the task files instead)")
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when first imported. One quick
    # request first, so an offline machine fails at once rather than after its ~23 s of retries.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    fail_if_unreachable(what, endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="scratchlm-eval-download-") as downloads, _hub_progress_bars(progress):
        for output in missing:
            if progress:
                print(f"eval data: {output.source} -> {cache_dir / output.path}", file=sys.stderr)
            _write(cache_dir / output.path, _convert(output, _fetch(output, Path(downloads), endpoint)))
    return cache_dir


def _check_task(task: str) -> str:
    if task not in TASK_FILES:
        raise ScratchLMError(f"unknown eval task {task!r}; known: {', '.join(TASK_FILES)}")
    return task


def _present(path: Path) -> bool:
    """A converted file, or a converted directory (never empty: it appears whole, by one rename)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _fetch(output: _Output, downloads: Path, endpoint: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    failed = f"download of {output.source} failed"
    try:
        return Path(hf_hub_download(output.repo_id, output.filename, repo_type="dataset",
                                    revision=output.revision, cache_dir=downloads, endpoint=endpoint))
    except LocalEntryNotFoundError:  # the Hub stopped answering after the reachability check
        raise ScratchLMError(f"{failed}: the Hub did not answer (check the connection)") from None
    except EntryNotFoundError:
        raise ScratchLMError(f"{failed}: the repository has no such file at revision {output.revision}") from None
    except OSError as exc:  # HfHubHTTPError (no such repository or revision, no access, ...) is one
        raise ScratchLMError(f"{failed}: {str(exc).strip().splitlines()[0]}") from None


def _convert(output: _Output, local: Path) -> bytes | dict[str, bytes]:
    try:
        return output.convert(local)
    # A file not in the expected format: not Parquet or JSON (ValueError; pyarrow's ArrowInvalid
    # is one), a missing field (KeyError), a field of another type (TypeError).
    except (KeyError, ValueError, TypeError) as exc:
        detail = f"{type(exc).__name__}: {exc}".replace(str(local), output.filename).splitlines()[0]
        raise ScratchLMError(f"{output.source} is not in the expected format ({detail})") from None


def _write(target: Path, content: bytes | dict[str, bytes]) -> None:
    if isinstance(content, bytes):
        atomic_write_bytes(target, content)
        return
    with atomic_directory(target, what="eval data") as staging:
        for name, data in content.items():
            (staging / name).write_bytes(data)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's download bars off for the block unless `enabled`; the setting is restored."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
