"""The local HellaSwag task's data source; its prompts are the harness's own (imported, not copied).

`load_local` is the task's `custom_dataset`: the harness calls it with the task's metadata, which
its CLI merges with --model_args and --metadata, so every other keyword is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401  (the YAML's process_docs)

DEFAULT_FILE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval" / "hellaswag_val_1k.jsonl"


def load_local(hellaswag_file: str | None = None, **_) -> datasets.DatasetDict:
    path = Path(hellaswag_file or DEFAULT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no HellaSwag file (pass --metadata '{{\"hellaswag_file\": \"FILE\"}}')")
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    # In memory: nothing is written to the datasets cache, nothing is downloaded.
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)})
