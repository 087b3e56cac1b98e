"""Named corpora downloadable from the Hugging Face Hub.

Each name maps to a dataset repository and the exact files to fetch (a pinned list rather
than a glob, so a download is a known size and `prepare` sees the same files every time).
Files land in the output directory under their repository paths; `data prepare --input DIR`
then reads them like any local files. The endpoint comes from `HF_ENDPOINT` (read at call
time) or the `endpoint` argument, which is how the tests point it at a local server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ScratchLMError


@dataclass(frozen=True)
class HubCorpus:
    repo_id: str
    files: tuple[str, ...]
    description: str
    revision: str = "main"
    val_files: tuple[str, ...] = ()  # those of `files` that are the corpus' own validation split


CORPORA: dict[str, HubCorpus] = {
    "tinystories": HubCorpus(
        "roneneldan/TinyStories",
        ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
        "TinyStories V2 (GPT-4 generated children's stories), stories separated by <|endoftext|>; 2.2 GB",
        val_files=("TinyStoriesV2-GPT4-valid.txt",),
    ),
    "tinystories-valid": HubCorpus(
        "roneneldan/TinyStories",
        ("TinyStoriesV2-GPT4-valid.txt",),
        "TinyStories V2 validation file only; 22 MB, for a quick start",
    ),
    "fineweb-edu-sample": HubCorpus(
        "HuggingFaceFW/fineweb-edu",
        ("sample/10BT/000_00000.parquet",),
        "first parquet file of FineWeb-Edu's 10BT sample (educational web pages, column 'text'); ~2 GB",
    ),
}


def download_corpus(name: str, out_dir: str | Path, *, endpoint: str | None = None,
                    token: str | None = None) -> list[Path]:
    """Fetch the files of corpus `name` into `out_dir`; returns their local paths.

    Already-complete files are not fetched again (huggingface_hub keeps per-file metadata
    under `out_dir/.cache`, which `data prepare` ignores like every dot-directory).
    """
    if name not in CORPORA:
        raise ScratchLMError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    paths = []
    for filename in corpus.files:
        try:
            path = hf_hub_download(corpus.repo_id, filename, repo_type="dataset", revision=corpus.revision,
                                   local_dir=out_dir, endpoint=endpoint, token=token)
        except (OSError, EntryNotFoundError) as exc:
            raise ScratchLMError(f"download of {corpus.repo_id}/{filename} failed: {exc}".splitlines()[0]) from exc
        paths.append(Path(path))
    return paths
