"""Data preparation as tasks: byte-range slices that read every document exactly once, the same
data directory for 1 task, N tasks + finalize, N local workers or Ray, resuming a killed run,
and one-line errors for tasks that do not belong together."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.cli import main
from scratchlm.data import PrepareConfig, finalize_data, iter_documents, prepare_data, prepare_task, read_manifest
from scratchlm.data.tasks import TASKS_DIR, plan_tasks, task_name
from scratchlm.sources import SourceStats, iter_documents_from, iter_file_documents
from scratchlm.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT, shared_file

SETTINGS = dict(progress=False, batch_documents=8, val_fraction=0.2)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train([shared_file("corpora/tinystories_train_head.txt")], 400, workers=1).save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every kind of input: JSONL, text in line and eot modes, Parquet in several row groups,
    a gzip file and code (both read whole), real text with planted duplicates."""
    root = tmp_path_factory.mktemp("corpus")
    stories = shared_file("corpora/tinystories_valid_head.txt").read_text(encoding="utf-8").split("\n\n")
    stories = [s.strip() for s in stories if len(s.split()) > 60]
    rng = random.Random(0)
    docs = stories[:240]
    copies = [docs[i] for i in rng.sample(range(len(docs)), 20)]  # exact duplicates
    near = [d.replace(" the ", " a ", 1) + " The end." for d in rng.sample(docs, 20)]  # near duplicates
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:80] + copies[:10]))
    (root / "b.txt").write_text("<|endoftext|>".join(docs[80:140] + near[:10]))  # eot mode
    pq.write_table(pa.table({"text": docs[140:200] + near[10:]}), root / "c.parquet", row_group_size=7)
    (root / "d.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                           for t in docs[200:220] + copies[10:]).encode()))
    (root / "e.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[220:240]))  # line mode
    (root / "f.py").write_text((Path(np.__file__).parent / "version.py").read_text())
    return root


def shard_bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.suffix in (".bin", ".npy")}


def documents(data_dir: Path) -> Counter:
    return Counter(tuple(d.tolist()) for split in ("train", "val") for d in iter_documents(data_dir, split))


# --------------------------------------------------------------------------- byte ranges
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=6))
def test_byte_ranges_read_every_document_exactly_once(corpus, cuts):
    for name, mode in (("a.jsonl", "auto"), ("b.txt", "auto"), ("c.parquet", "auto"), ("e.txt", "line")):
        path = corpus / name
        size = path.stat().st_size
        edges = sorted({0, size, *(c % (size + 1) for c in cuts)})
        whole = [d.text for d in iter_documents_from(str(path), doc_mode=mode)]
        pieces = [d.text for a, b in zip(edges, edges[1:])
                  for d in iter_file_documents(path, doc_mode=mode, stats=SourceStats(name), byte_range=(a, b))]
        assert pieces == whole, name


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 7])
def test_the_plan_gives_every_document_to_exactly_one_task(corpus, num_tasks):
    plan = plan_tasks([str(corpus)], [], num_tasks)
    assert plan.num_tasks == num_tasks
    read = []
    for task in plan.tasks:
        for piece in task:
            byte_range = None if piece.start is None else (piece.start, piece.end)
            read += [d.text for d in iter_file_documents(Path(piece.path), stats=SourceStats(""), byte_range=byte_range)]
    assert read == [d.text for d in iter_documents_from(str(corpus))]
    whole_files = {p.path for task in plan.tasks for p in task if p.start is None}
    assert {Path(p).name for p in whole_files} == {"d.jsonl.gz", "f.py"}  # cannot be cut
    assert plan_tasks([str(corpus)], [], num_tasks).fingerprint == plan.fingerprint


# --------------------------------------------------------------------------- one result
@pytest.mark.slow
def test_one_task_n_tasks_and_workers_give_the_same_data_directory(corpus, tok_dir, tmp_path):
    config = PrepareConfig(workers=1, **SETTINGS)
    one = prepare_data([str(corpus)], tok_dir, tmp_path / "one", config=config, num_tasks=1)
    assert one["stages"][2]["stage"] == "exact dedup" and one["stages"][2]["documents"] < one["stages"][1]["documents"]
    assert one["stages"][3]["documents"] < one["stages"][2]["documents"]  # near duplicates found too

    for index in (2, 0, 1):  # any order, as a Slurm array runs them
        record = prepare_task([str(corpus)], tok_dir, tmp_path / "three", task_index=index, num_tasks=3,
                              config=config)
        assert record["task_index"] == index
    three = finalize_data(tmp_path / "three", progress=False)
    two_workers = prepare_data([str(corpus)], tok_dir, tmp_path / "two", num_tasks=5,
                               config=PrepareConfig(workers=2, **SETTINGS))

    for other in ("three", "two"):
        assert shard_bytes(tmp_path / other) == shard_bytes(tmp_path / "one"), other
        assert documents(tmp_path / other) == documents(tmp_path / "one")
    for manifest in (three, two_workers):
        assert manifest["splits"] == one["splits"]
        assert [s | {"seconds": 0} for s in manifest["stages"]] == [s | {"seconds": 0} for s in one["stages"]]
        assert manifest["filters"] == one["filters"] and manifest["sources"] == one["sources"]
    assert not (tmp_path / "three" / TASKS_DIR).exists()  # finalize removes the tasks' files


@pytest.mark.slow
def test_ray_gives_the_same_data_directory(corpus, tok_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is the optional extra scratchlm[ray]")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = PrepareConfig(workers=2, **SETTINGS)
    local = prepare_data([str(corpus)], tok_dir, tmp_path / "local", config=config, num_tasks=3)
    on_ray = prepare_data([str(corpus)], tok_dir, tmp_path / "ray", config=config, num_tasks=3, executor="ray")
    assert documents(tmp_path / "ray") == documents(tmp_path / "local")
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
    assert on_ray["splits"] == local["splits"]


def test_a_killed_run_continues_with_the_unfinished_tasks(corpus, tok_dir, tmp_path, monkeypatch):
    import scratchlm.data.prepare as prepare
    import scratchlm.data.tasks as tasks

    config = PrepareConfig(workers=1, **SETTINGS)
    real_run_task, ran = tasks.run_task, []

    def killed_in_task_2(out_dir, plan, index, *args, **kwargs):
        ran.append(index)
        if index == 2:
            raise KeyboardInterrupt
        return real_run_task(out_dir, plan, index, *args, **kwargs)

    monkeypatch.setattr(prepare, "run_task", killed_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([str(corpus)], tok_dir, tmp_path / "out", config=config, num_tasks=4)
    finished = sorted(p.name for p in (tmp_path / "out" / TASKS_DIR).iterdir())
    assert finished == [task_name(0), task_name(1)]  # nothing of task 2, not even a temporary directory
    ran.clear()
    monkeypatch.setattr(prepare, "run_task", lambda *a, **k: (ran.append(a[2]), real_run_task(*a, **k))[1])
    manifest = prepare_data([str(corpus)], tok_dir, tmp_path / "out", config=config, num_tasks=4)
    assert ran == [2, 3]  # the finished tasks were not redone
    reference = prepare_data([str(corpus)], tok_dir, tmp_path / "reference", config=config, num_tasks=4)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")
    assert manifest["splits"] == reference["splits"]


# --------------------------------------------------------------------------- bad input
def test_tasks_that_do_not_belong_together_are_refused(corpus, tok_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "-o", str(out), "--num-tasks", "3"]
    assert main([*base, "--task-index", "3"]) == 1
    assert "--task-index 3 is outside [0, 3)" in capsys.readouterr().err
    assert not out.exists()

    assert main([*base, "--task-index", "0"]) == 0
    assert "scratchlm data finalize" in capsys.readouterr().out
    # A sibling task with other settings: refused when it runs, naming what differs.
    assert main([*base, "--task-index", "0", "--scrub-pii"]) == 1
    assert "other settings" in capsys.readouterr().err
    (out / TASKS_DIR / f".{task_name(2)}.abc123.tmp").mkdir()  # what a killed task leaves
    assert main(["data", "finalize", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 3 tasks are missing" in err[0]
    assert "task_00001, task_00002 (unfinished)" in err[0]

    # A task of another plan (other inputs) in the same directory.
    other = tmp_path / "other"
    prepare_task([str(corpus / "a.jsonl")], tok_dir, other, task_index=1, num_tasks=3,
                 config=PrepareConfig(**SETTINGS))
    (out / TASKS_DIR / task_name(1)).symlink_to(other / TASKS_DIR / task_name(1))
    assert main(["data", "finalize", str(out)]) == 1
    assert "prepared with other num_tasks" not in (err := capsys.readouterr().err) and "other plan, inputs" in err
    assert main(["data", "finalize", str(tmp_path / "nothing")]) == 1
    assert "holds no data tasks" in capsys.readouterr().err


def test_slurm_array_variables_choose_the_task(corpus, tok_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_MIN="1",
               SLURM_ARRAY_TASK_COUNT="2")  # an array --array=1-2: this is its second element
    result = subprocess.run([sys.executable, "-m", "scratchlm", "data", "prepare", "--input", str(corpus / "a.jsonl"),
                             "--tokenizer", str(tok_dir), "-o", str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "task 1 of 2" in result.stdout
    assert sorted(p.name for p in (out / TASKS_DIR).iterdir()) == [task_name(1)]


def test_an_unreachable_ray_cluster_is_a_one_line_error(corpus, tok_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray", reason="Ray is the optional extra scratchlm[ray]")
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["data", "prepare", "--input", str(corpus / "a.jsonl"), "--tokenizer", str(tok_dir),
                 "-o", str(tmp_path / "out"), "--executor", "ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scratchlm: error: cannot reach the Ray cluster at 127.0.0.1")
    assert not (tmp_path / "out").exists()


def test_the_manifest_reads_back(corpus, tok_dir, tmp_path):
    manifest = prepare_data([str(corpus / "a.jsonl")], tok_dir, tmp_path / "d", config=PrepareConfig(**SETTINGS))
    assert read_manifest(tmp_path / "d") == manifest and manifest["tasks"] >= 1


@pytest.mark.slow
def test_dedup_across_tasks_removes_what_the_in_memory_dedup_removes(tok_dir, tmp_path):
    """The planted near-duplicate corpus (tests/test_data_dedup.py), prepared as 3 tasks: band
    keys on disk, candidates and clusters across tasks, give the in-memory result exactly."""
    from scratchlm.data.clean import clean_text
    from scratchlm.data.dedup import MinHasher, exact_key, near_duplicate_keep_mask
    from tests.test_data_dedup import planted_copies

    originals = [d.text for name in ("corpora/c4_demo.jsonl", "corpora/wiki_demo.txt",
                                     "corpora/tinystories_valid_head.txt")
                 for d in iter_documents_from(str(shared_file(name)))]
    texts = originals + [copy for _, _, copy in planted_copies(originals)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare_data([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "out", num_tasks=3,
                 config=PrepareConfig(filter=False, workers=1, progress=False))

    cleaned = [clean_text(t) for t in texts]
    seen, unique = set(), []
    for text in cleaned:
        if text and exact_key(text) not in seen:
            seen.add(exact_key(text))
            unique.append(text)
    hasher = MinHasher()
    keep = near_duplicate_keep_mask(np.stack([hasher.signature(t) for t in unique]))
    tokenizer = Tokenizer.load(tok_dir)
    expected = Counter(tuple(tokenizer.encode_ordinary(t)) for t, k in zip(unique, keep) if k)
    assert len(unique) - int(keep.sum()) >= 70  # the planted copies are there to be found
    assert documents(tmp_path / "out") == expected


def test_lone_surrogates_in_json_are_replaced_and_counted(tok_dir, tmp_path):
    text = "A long enough story about a cat who sat on the mat and then walked away happily. "
    # JSON's escape for a lone surrogate: \ud83d (half of an emoji), not text.
    (tmp_path / "s.jsonl").write_text("".join(f'{{"text": "{text * 3} {i} \\ud83d end"}}\n' for i in range(20)))
    manifest = prepare_data([str(tmp_path / "s.jsonl")], tok_dir, tmp_path / "d",
                            config=PrepareConfig(filter=False, **SETTINGS))
    assert manifest["sources"][0]["invalid_utf8_bytes"] == 20
    tok = Tokenizer.load(tok_dir)
    assert all("\ufffd end" in tok.decode(d.tolist()) for s in ("train", "val") for d in iter_documents(tmp_path / "d", s))
