"""Benchmark downloads against a local server that answers like the Hugging Face Hub.

The Hub files are built here in the datasets' original Hub schemas from real items of the
shared files (shared/data/eval), so a converted file must reproduce those items exactly: the
same lines, byte for byte, where the shared file is one scratchlm writes the same way.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.eval.datasets import OUTPUTS, TASK_FILES, download_eval_data, eval_cache_dir, task_path
from tests.conftest import shared_file
from tests.fake_hub import FakeHub, serving

ALL_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "mmlu"]


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def _shared_lines(name: str) -> list[str]:
    return shared_file(f"eval/{name}").read_text(encoding="utf-8").splitlines(keepends=True)


def _hub_key(task: str, index: int = 0) -> str:
    return OUTPUTS[task][index].source


# --------------------------------------------------------------------------- the Hub files
# Rowan/hellaswag keeps every field of the original JSON lines, with `label` as a string.
HELLASWAG_SCHEMA = pa.schema([("ind", pa.int32()), ("activity_label", pa.string()), ("ctx_a", pa.string()),
                              ("ctx_b", pa.string()), ("ctx", pa.string()), ("endings", pa.list_(pa.string())),
                              ("source_id", pa.string()), ("split", pa.string()), ("split_type", pa.string()),
                              ("label", pa.string())])
ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
PIQA_SCHEMA = pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.int64())])
WINOGRANDE_SCHEMA = pa.schema([("sentence", pa.string()), ("option1", pa.string()), ("option2", pa.string()),
                               ("answer", pa.string())])
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])

# Items as they are on the Hub, and the lines of the shared files they must become.
HELLASWAG_LINES = (0, 1, 2)  # read from the shared sample, plus its first WikiHow item (empty ctx_b)
ARC_EASY = [  # the first items of ARC-Easy test; NY Regents items are labelled 1-4, not A-D
    {"id": "Mercury_417466", "question": "Which statement best explains why photosynthesis is the foundation of "
     "most food webs?", "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                                             "Most ecosystems are found on land instead of in water.",
                                             "Carbon dioxide is more available than other gases.",
                                             "The producers in all ecosystems are plants."],
                                    "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "Mercury_7081673", "question": "Which piece of safety equipment is used to keep mold spores from "
     "entering the respiratory system?", "choices": {"text": ["safety goggles", "breathing mask", "rubber gloves",
                                                              "lead apron"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": "Which characteristic describes the texture of a kitten's fur?",
     "choices": {"text": ["gray", "warm", "long", "soft"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
]
ARC_EASY_LINES = (0, 1, 3)
ARC_CHALLENGE = [
    {"id": "first-test-item", "question": "An astronomer observes that a planet rotates faster after a meteorite "
     "impact. Which is the most likely effect of this increase in rotation?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                          "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]
PIQA = [
    {"goal": "How do I ready a guinea pig cage for it's new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
             "will also need to supply it with a water bottle and a food dish.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
             "will also need to supply it with a water bottle and a food dish.", "label": 0},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin", "sol2": "finish, woodgrain with  bobby pin",
     "label": 1},
]
WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "2"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ was't ruined.",
     "option1": "blanket", "option2": "bed", "answer": "2"},
]
# The first item and one whose last "word" starts with line breaks ("\n\nrecorder").
LAMBADA_LINES = (0, 1)
MMLU_TEST_HEAD = (  # the first abstract_algebra test items, as shared/data's source wrote them
    'question,choice0,choice1,choice2,choice3,answer\n'
    '"Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",0,4,2,6,1\n'
    '"Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.",8,2,24,120,2\n'
    'Find all zeros in the indicated finite field of the given polynomial with coefficients in that field. '
    'x^5 + 3x^3 + x^2 + 2x in Z_5,0,1,"0,1","0,4",3\n'
)


def _hellaswag_items() -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in _shared_lines("hellaswag_val_1k.jsonl")]
    wikihow = next(r for r in records if r["source_id"].startswith("wikihow"))
    chosen = [records[i] for i in HELLASWAG_LINES] + [wikihow]
    rows = [{**{key: r[key] for key in HELLASWAG_SCHEMA.names}, "label": str(r["label"])} for r in chosen]
    return rows, chosen


def _lambada_items() -> tuple[bytes, list[str]]:
    lines = _shared_lines("lambada_openai.jsonl")
    chosen = [lines[i] for i in LAMBADA_LINES] + [next(line for line in lines if '"\\n\\nrecorder"' in line)]
    records = [json.loads(line) for line in chosen]
    # OpenAI's file is {"text": ...} per line; the continuation is what followed the last space.
    texts = "".join(json.dumps({"text": r["context"] + " " + r["continuation"]}) + "\n" for r in records)
    return texts.encode(), chosen


def _mmlu_dev_rows() -> list[dict]:
    """Every shared dev CSV back in cais/mmlu's `all` layout (subjects in alphabetical order)."""
    rows = []
    for path in sorted(shared_file("eval/mmlu/dev/abstract_algebra_dev.csv").parent.glob("*_dev.csv")):
        subject = path.name.removesuffix("_dev.csv")
        with open(path, encoding="utf-8", newline="") as handle:
            for question, *choices, answer in list(csv.reader(handle))[1:]:
                rows.append({"question": question, "subject": subject, "choices": choices, "answer": int(answer)})
    return rows


def _mmlu_test_rows() -> list[dict]:
    return [{"question": question, "subject": "abstract_algebra", "choices": choices, "answer": int(answer)}
            for question, *choices, answer in list(csv.reader(io.StringIO(MMLU_TEST_HEAD)))[1:]]


def _hub_files() -> dict[str, bytes]:
    lambada, _ = _lambada_items()
    return {
        _hub_key("hellaswag"): _parquet(_hellaswag_items()[0], HELLASWAG_SCHEMA),
        _hub_key("arc_easy"): _parquet(ARC_EASY, ARC_SCHEMA),
        _hub_key("arc_challenge"): _parquet(ARC_CHALLENGE, ARC_SCHEMA),
        _hub_key("piqa"): _parquet(PIQA, PIQA_SCHEMA),
        _hub_key("winogrande"): _parquet(WINOGRANDE, WINOGRANDE_SCHEMA),
        _hub_key("lambada_openai"): lambada,
        _hub_key("mmlu", 0): _parquet(_mmlu_test_rows(), MMLU_SCHEMA),
        _hub_key("mmlu", 1): _parquet(_mmlu_dev_rows(), MMLU_SCHEMA),
    }


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    # The temporary download directory goes where the test can see that it is removed.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with serving(_hub_files(), monkeypatch, tmp_path / "hf_home") as endpoint:
        yield endpoint


def _gets() -> int:
    return sum(1 for method, _ in FakeHub.requests if method == "GET")


def _tree(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


# --------------------------------------------------------------------------- conversions
def test_every_task_is_converted_exactly_like_the_shared_files(hub, tmp_path):
    cache = download_eval_data(ALL_TASKS, tmp_path / "cache", progress=False)
    assert cache == tmp_path / "cache"

    _, hellaswag = _hellaswag_items()
    assert [json.loads(line) for line in (cache / "hellaswag_val.jsonl").read_text().splitlines()] == hellaswag
    expected = {
        "arc_easy.jsonl": [_shared_lines("arc_easy.jsonl")[i] for i in ARC_EASY_LINES],
        "arc_challenge.jsonl": _shared_lines("arc_challenge.jsonl")[:1],
        "piqa.jsonl": _shared_lines("piqa.jsonl")[:2],
        "winogrande.jsonl": _shared_lines("winogrande.jsonl")[:3],
        "lambada_openai.jsonl": _lambada_items()[1],
    }
    for name, lines in expected.items():
        assert (cache / name).read_text(encoding="utf-8") == "".join(lines), name

    shared_dev = shared_file("eval/mmlu/dev/abstract_algebra_dev.csv").parent
    assert sorted(p.name for p in (cache / "mmlu/dev").iterdir()) == sorted(p.name for p in shared_dev.iterdir())
    for path in shared_dev.iterdir():  # all 57 subjects, quoting and non-ASCII text included
        assert (cache / "mmlu/dev" / path.name).read_bytes() == path.read_bytes(), path.name
    assert [p.name for p in (cache / "mmlu/test").iterdir()] == ["abstract_algebra_test.csv"]
    assert (cache / "mmlu/test/abstract_algebra_test.csv").read_text(encoding="utf-8") == MMLU_TEST_HEAD

    # Each file came from the pinned revision, and the download directory is gone.
    for outputs in OUTPUTS.values():
        for output in outputs:
            request = ("GET", f"/datasets/{output.repo_id}/resolve/{output.revision}/{output.filename}")
            assert request in FakeHub.requests
    assert _tree(tmp_path / "tmp") == []
    assert not (tmp_path / "hf_home").exists()  # the user's Hugging Face cache is not touched
    assert {task: task_path(cache, task).name for task in ALL_TASKS} == {
        "hellaswag": "hellaswag_val.jsonl", "arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_challenge.jsonl",
        "piqa": "piqa.jsonl", "winogrande": "winogrande.jsonl", "lambada_openai": "lambada_openai.jsonl",
        "mmlu": "mmlu"}


def test_arc_keeps_every_choice_and_finds_the_key_among_the_labels(hub, tmp_path):
    # A few ARC items have 3 or 5 choices; all are kept and the key is looked up, not assumed A-D.
    FakeHub.files[_hub_key("arc_easy")] = _parquet([
        {"id": "five", "question": "Q5?", "choices": {"text": list("abcde"), "label": list("ABCDE")},
         "answerKey": "E"},
        {"id": "three", "question": "Q3?", "choices": {"text": list("abc"), "label": ["1", "2", "3"]},
         "answerKey": "2"}], ARC_SCHEMA)
    cache = download_eval_data(["arc_easy"], tmp_path / "cache", progress=False)
    assert [json.loads(line) for line in (cache / "arc_easy.jsonl").read_text().splitlines()] == [
        {"choices": list("abcde"), "query": "Question: Q5?", "gold": 4},
        {"choices": list("abc"), "query": "Question: Q3?", "gold": 1}]


# --------------------------------------------------------------------------- the cache
def test_a_second_call_downloads_nothing_and_needs_no_network(hub, tmp_path, monkeypatch):
    download_eval_data(["piqa", "mmlu"], tmp_path / "cache", progress=False)
    assert _gets() == 3
    requests = len(FakeHub.requests)
    assert download_eval_data(["mmlu", "piqa"], tmp_path / "cache", progress=False) == tmp_path / "cache"
    assert len(FakeHub.requests) == requests
    # Another task fetches only its own file.
    download_eval_data(["piqa", "winogrande"], tmp_path / "cache", progress=False)
    assert _gets() == 4
    # Everything present: not even the reachability check, so this works offline.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    download_eval_data(["winogrande", "piqa", "mmlu"], tmp_path / "cache", progress=False)


def test_default_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    assert eval_cache_dir() == tmp_path / "cache" / "eval"
    monkeypatch.delenv("SCRATCHLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert eval_cache_dir() == tmp_path / "home" / ".cache" / "scratchlm" / "eval"


def test_downloads_go_to_the_default_cache(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    assert download_eval_data(["winogrande"], progress=False) == tmp_path / "cache" / "eval"
    assert (tmp_path / "cache" / "eval" / "winogrande.jsonl").is_file()


# --------------------------------------------------------------------------- errors
def test_unknown_tasks_are_named_with_the_known_ones(tmp_path):
    with pytest.raises(ScratchLMError, match="unknown eval task 'boolq'; known: hellaswag, arc_easy, "
                                             "arc_challenge, piqa, winogrande, lambada_openai, mmlu$"):
        download_eval_data(["piqa", "boolq"], tmp_path / "cache")
    with pytest.raises(ScratchLMError, match="unknown eval task 'boolq'"):
        task_path(tmp_path, "boolq")
    assert not (tmp_path / "cache").exists()


@pytest.fixture()
def dead_endpoint() -> str:
    """An http:// URL on a local port where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_hub_fails_at_once_in_one_line(dead_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    start = time.monotonic()
    with pytest.raises(ScratchLMError) as error:
        download_eval_data(["hellaswag", "mmlu"], tmp_path / "cache", progress=False)
    assert time.monotonic() - start < 5  # huggingface_hub alone retries for ~23 s
    assert str(error.value) == (f"cannot download eval data for hellaswag, mmlu: {dead_endpoint} is "
                                f"unreachable (Connection refused)")
    assert _tree(tmp_path) == []


def test_offline_mode_fails_without_contacting_the_hub(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScratchLMError, match="cannot download eval data for piqa: HF_HUB_OFFLINE is set"):
        download_eval_data(["piqa"], tmp_path / "cache", progress=False)
    assert FakeHub.requests == []


def test_a_file_missing_on_the_hub_fails_in_one_line_and_leaves_nothing(hub, tmp_path):
    output = OUTPUTS["winogrande"][0]
    del FakeHub.files[output.source]
    with pytest.raises(ScratchLMError) as error:
        download_eval_data(["winogrande"], tmp_path / "cache", progress=False)
    assert str(error.value) == (f"download of allenai/winogrande/winogrande_xl/validation-00000-of-00001.parquet "
                                f"failed: the repository has no such file at revision {output.revision}")
    assert not (tmp_path / "cache").exists()
    assert _tree(tmp_path / "tmp") == []
    # Tasks that completed before the failure are kept.
    with pytest.raises(ScratchLMError, match="download of allenai/winogrande/"):
        download_eval_data(["piqa", "winogrande", "arc_easy"], tmp_path / "cache", progress=False)
    assert _tree(tmp_path / "cache") == ["piqa.jsonl"]
    assert _tree(tmp_path / "tmp") == []


def test_a_file_in_another_format_fails_in_one_line_and_leaves_nothing(hub, tmp_path):
    FakeHub.files[_hub_key("mmlu", 1)] = _parquet(
        [{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0}], MMLU_SCHEMA)
    with pytest.raises(ScratchLMError) as error:
        download_eval_data(["mmlu"], tmp_path / "cache", progress=False)
    assert str(error.value) == ("cais/mmlu/all/dev-00000-of-00001.parquet is not in the expected format "
                                "(ValueError: a anatomy question has 3 choices, not 4)")
    assert _tree(tmp_path / "cache") == ["mmlu", "mmlu/test", "mmlu/test/abstract_algebra_test.csv"]
    FakeHub.files[_hub_key("piqa")] = b"not parquet"
    with pytest.raises(ScratchLMError, match=r"^baber/piqa/piqa_validation.parquet is not in the expected "
                                             r"format \(ArrowInvalid: .*'piqa_validation.parquet'"):
        download_eval_data(["piqa"], tmp_path / "cache", progress=False)
    FakeHub.files[_hub_key("winogrande")] = _parquet([{"sentence": "no blank", "option1": "a", "option2": "b",
                                                       "answer": "1"}], WINOGRANDE_SCHEMA)
    with pytest.raises(ScratchLMError, match=r"winogrande_xl/validation-00000-of-00001.parquet is not in the "
                                             r"expected format \(ValueError: substring not found\)$"):
        download_eval_data(["winogrande"], tmp_path / "cache", progress=False)
    assert _tree(tmp_path / "cache") == ["mmlu", "mmlu/test", "mmlu/test/abstract_algebra_test.csv"]
    assert _tree(tmp_path / "tmp") == []


def test_an_interrupted_conversion_leaves_nothing_half_written(hub, tmp_path, monkeypatch):
    writes = 0
    real_write_bytes = Path.write_bytes

    def interrupted(self, data):
        nonlocal writes
        writes += 1
        if writes == 30:  # halfway through the 57 dev files
            raise KeyboardInterrupt
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_eval_data(["mmlu"], tmp_path / "cache", progress=False)
    # The test split was complete and stays; no dev file, no staging directory.
    assert [p for p in _tree(tmp_path / "cache") if not p.startswith("mmlu/test")] == ["mmlu"]
    assert _tree(tmp_path / "tmp") == []


# --------------------------------------------------------------------------- task_path
def test_task_path_takes_the_first_candidate_present(tmp_path):
    (tmp_path / "hellaswag_val_1k.jsonl").write_text("")
    assert task_path(tmp_path, "hellaswag") == tmp_path / "hellaswag_val_1k.jsonl"
    (tmp_path / "hellaswag_val.jsonl").write_text("")
    assert task_path(tmp_path, "hellaswag") == tmp_path / "hellaswag_val.jsonl"
    with pytest.raises(ScratchLMError, match=f"^{tmp_path} has no mmlu data: expected mmlu$"):
        task_path(tmp_path, "mmlu")
    with pytest.raises(ScratchLMError, match="has no lambada_openai data: expected lambada_openai.jsonl$"):
        task_path(tmp_path, "lambada_openai")
    with pytest.raises(ScratchLMError, match="data directory .*nowhere does not exist"):
        task_path(tmp_path / "nowhere", "piqa")


def test_the_shared_directory_is_a_data_directory():
    shared = shared_file("eval/piqa.jsonl").parent
    assert {task: task_path(shared, task).name for task in TASK_FILES} == {
        "hellaswag": "hellaswag_val_1k.jsonl", "arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_challenge.jsonl",
        "piqa": "piqa.jsonl", "winogrande": "winogrande.jsonl", "lambada_openai": "lambada_openai.jsonl",
        "mmlu": "mmlu"}
    assert set(TASK_FILES) == set(OUTPUTS) == set(ALL_TASKS)
    # What a download writes is what task_path looks for first.
    assert all(TASK_FILES[task][0] == outputs[0].path.split("/")[0] for task, outputs in OUTPUTS.items())
