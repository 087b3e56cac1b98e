"""Shared pieces of the training tests (no tests here): a tiny real tokenizer + data
directory built from a slice of Tiny Shakespeare, and a small config writer.

Each test module re-exports the `train_corpus` fixture; it is session-scoped per module, so
the few-second build happens once per module that uses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import shared_file

VOCAB_SIZE = 320
CORPUS_BYTES = 80_000


def build_train_corpus(root: Path) -> dict[str, Path]:
    from scratchlm.data import PrepareConfig, prepare_data
    from scratchlm.tokenizer import Tokenizer

    text = shared_file("corpora/tinyshakespeare.txt").read_bytes()[:CORPUS_BYTES]
    corpus = root / "shakespeare_slice.txt"
    corpus.write_bytes(text)
    Tokenizer.train([str(corpus)], vocab_size=VOCAB_SIZE).save(root / "tokenizer")
    prepare_data([str(corpus)], root / "tokenizer", root / "data",
                 config=PrepareConfig(progress=False, workers=1, val_fraction=0.1,
                                      dedup=False, filter=False))
    return {"tokenizer": root / "tokenizer", "data": root / "data", "corpus": corpus}


@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory) -> dict[str, Path]:
    return build_train_corpus(tmp_path_factory.mktemp("train_corpus"))


def tiny_config(corpus: dict[str, Path], **sections) -> dict:
    """A tiny model at context 32 (about 0.1M parameters) and a short run; `sections` maps a
    section name to the keys to change, e.g. run={"max_steps": 5}."""
    config = {
        "model": {"preset": "tiny", "context_length": 32, "d_model": 64, "n_layers": 2,
                  "n_heads": 4, "n_kv_heads": 2},
        "data": {"dir": str(corpus["data"]), "tokenizer": str(corpus["tokenizer"])},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 3},
        "run": {"max_steps": 12, "global_batch_tokens": 512, "micro_batch_size": 8,
                "eval_every": 6, "eval_batches": 2, "checkpoint_every": 6,
                "sample_tokens": 8, "progress": False, "tensorboard": False,
                # One thread: repeatable results, and no OpenMP spinning against the other
                # test processes on a loaded machine (2 threads ran 60x slower here).
                "threads": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test's torch work on one thread (restored afterwards): on a shared 2-core
    machine, two OpenMP threads contending with other processes ran 10-60x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
