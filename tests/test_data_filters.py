"""Sources, cleaning, quality/safety filters and PII scrubbing, on crafted and real documents."""

from __future__ import annotations

import gzip
import json
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from scratchlm.data.clean import clean_text
from scratchlm.data.filters import (
    FILTERS, PROFILES, Blocklists, DocView, FilterConfig, first_failing_filter, scrub_pii,
)
from scratchlm.data.sources import (
    SourceStats, iter_documents_from, resolve_input, split_text, stdlib_files,
)
from scratchlm.errors import ScratchLMError
from tests.conftest import shared_file

STOP = {"the", "be", "to", "of", "and", "that", "have", "with"}


@pytest.fixture(scope="module")
def story() -> str:
    """A real TinyStories document (blank-line blocks merged to >= 1000 chars)."""
    text = shared_file("corpora/tinystories_valid_head.txt").read_text(encoding="utf-8")
    return clean_text(split_text(text, "blank", 1000)[3])


@pytest.fixture(scope="module")
def program() -> str:
    return clean_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py").read_text(), "code")


def lines_of(words: list[str], per_line: int) -> str:
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line))


def crafted_bad(name: str, story: str) -> str:
    """A document built from the real story that the filter `name` must drop."""
    words = story.split()
    no_punct = "".join(ch for ch in story if ch not in ".!?\"'”’:;")
    return {
        "empty": "",
        "blocklist_words": story + " It was a zorblax day.",
        "blocklist_urls": story + " More at https://www.spam.example.com/win now.",
        "gopher_word_count": "Once upon a time there was a cat.",
        "gopher_mean_word_length": " ".join(["a", "to", "on", "it"] * 30),
        "gopher_symbol_ratio": story + " #fun" * 40,
        "gopher_bullets_ellipsis": "\n".join(f"- {w} and the {w} went on..." for w in words[:40]),
        "gopher_alpha_words": " ".join(str(1000 + i) for i in range(200)) + " " + " ".join(words[:20]),
        "gopher_stop_words": " ".join(w for w in words if w.lower().strip(".,;:!?\"'()") not in STOP),
        "c4_lorem_ipsum": story + " Lorem ipsum dolor sit amet.",
        "c4_curly_brace": story + " {name}",
        "c4_sentences": no_punct,
        "fineweb_line_punct": lines_of(no_punct.split(), 8),
        "fineweb_short_lines": lines_of(words, 2),
        "fineweb_dup_line_chars": story + "\n" + "\n".join(["Subscribe to our newsletter for stories!"] * 6),
        "gopher_dup_lines": "\n".join(["The end of the story."] * 10 + [story]),
        "gopher_dup_paragraphs": "\n\n".join([story[:400]] * 4 + [story]),
        "gopher_top_ngrams": story + " buy now" * 120,
        "gopher_dup_ngrams": story + "\n\n" + story,
        "code_line_length": "x = [" + ", ".join(str(i) for i in range(600)) + "]\n",
        "code_alnum_fraction": "\n".join(["#" * 30, "= - + * / " * 5] * 20),
    }[name]


@pytest.mark.parametrize("name", list(FILTERS))
def test_each_filter_drops_its_crafted_document(name, story):
    blocklists = Blocklists(words=frozenset({"zorblax"}), domains=frozenset({"example.com"}))
    bad = crafted_bad(name, story)
    assert FILTERS[name](DocView(bad), FilterConfig(), blocklists, None), name


@pytest.mark.parametrize("name", list(FILTERS))
def test_each_filter_keeps_real_documents(name, story, program):
    blocklists = Blocklists(words=frozenset({"zorblax"}), domains=frozenset({"example.com"}))
    good = program if name.startswith("code_") else story
    assert not FILTERS[name](DocView(good), FilterConfig(), blocklists, None), name


def test_profiles_and_switching_filters_off(story, program):
    assert first_failing_filter(story, "prose", FilterConfig(), Blocklists()) is None
    # The same program fails prose rules but passes the code profile.
    assert first_failing_filter(program, "prose", FilterConfig(), Blocklists()) is not None
    assert first_failing_filter(program, "code", FilterConfig(), Blocklists()) is None
    doubled = story + "\n\n" + story
    assert first_failing_filter(doubled, "prose", FilterConfig(), Blocklists()) is not None
    prose_rules = frozenset(PROFILES["prose"])
    assert first_failing_filter(doubled, "prose", FilterConfig(), Blocklists(), disabled=prose_rules) is None


def test_thresholds_are_configurable(story):
    n_words = len(story.split())
    assert first_failing_filter(story, "prose", FilterConfig(min_words=n_words + 1), Blocklists()) == "gopher_word_count"
    assert first_failing_filter(story, "prose", FilterConfig(max_words=n_words - 1), Blocklists()) == "gopher_word_count"


def test_url_blocklist_uses_record_url_and_subdomains(story, tmp_path):
    (tmp_path / "urls.txt").write_text("# comment\nhttps://www.Example.com/path\n")
    (tmp_path / "words.txt").write_text("Zorblax\n")
    lists = Blocklists.load(str(tmp_path / "words.txt"), str(tmp_path / "urls.txt"))
    assert lists.domains == {"example.com"} and lists.words == {"zorblax"}
    config = FilterConfig()
    assert first_failing_filter(story, "prose", config, lists, url="http://news.example.com/a") == "blocklist_urls"
    assert first_failing_filter(story, "prose", config, lists, url="http://notexample.com/a") is None
    assert first_failing_filter(story + " ZORBLAX!", "prose", config, lists) == "blocklist_words"
    with pytest.raises(ScratchLMError, match="missing.txt"):
        Blocklists.load(str(tmp_path / "missing.txt"), None)


def test_scrub_pii():
    text = ("Mail jane.doe+news@mail.example.org or call (555) 123-4567 / +44 20 7946 0958? "
            "Server 192.168.0.1 runs Python 3.11.7 since 2021; 999.1.1.1 is no address.")
    scrubbed, counts = scrub_pii(text)
    assert counts == {"email": 1, "ip_address": 1, "phone": 2}
    assert "jane.doe" not in scrubbed and "192.168" not in scrubbed and "7946" not in scrubbed
    assert "3.11.7" in scrubbed and "2021" in scrubbed and "999.1.1.1" in scrubbed
    assert scrubbed.count("<EMAIL>") == 1 and scrubbed.count("<PHONE>") == 2


def test_clean_text():
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert clean_text("a\x00b\u200bc\ufeff\r\nd\u00a0e  f \n\n\n\ng  ") == "abc\nd e f\n\ng"
    code = "def f():\r\n    return  1   \n\n\n\n\nx = 2\n"
    assert clean_text(code, "code") == "def f():\n    return  1\n\nx = 2"


# --------------------------------------------------------------------------- sources
def test_jsonl_malformed_lines_are_counted_or_fatal(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n\n{"text": 5}\n{"text": "two", "url": "http://a.b"}\n')
    stats = SourceStats(input=str(path))
    with pytest.warns(UserWarning) as caught:
        docs = list(iter_documents_from(str(path), stats=stats))
    warned = [re.search(r"docs\.jsonl:(\d+)", str(w.message)) for w in caught]
    assert [m.group(1) for m in warned if m] == ["2", "3", "5"]
    assert [d.text for d in docs] == ["one", "two"] and docs[1].url == "http://a.b"
    assert stats.malformed == 3 and stats.malformed_locations == [f"{path}:2", f"{path}:3", f"{path}:5"]
    with pytest.raises(ScratchLMError, match=r"docs\.jsonl:2"):
        list(iter_documents_from(str(path), strict_json=True))


def test_compressed_json_parquet_dirs_and_globs(tmp_path):
    records = [{"text": f"document number {i}"} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.json").write_text(json.dumps(records))
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("first<|endoftext|>second<|endoftext|>")
    (tmp_path / "shard.bin").write_bytes(bytes(range(256)))  # not a text format: skipped in dirs
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "meta.txt").write_text("not corpus")
    expected = [r["text"] for r in records]
    for name in ("a.jsonl.gz", "b.jsonl.zst", "c.json", "d.parquet"):
        assert [d.text for d in iter_documents_from(str(tmp_path / name))] == expected, name
    all_docs = [d.text for d in iter_documents_from(str(tmp_path))]
    assert all_docs == expected * 4 + ["first", "second"]
    assert len(resolve_input(str(tmp_path / "*.json*"))) == 3
    with pytest.raises(ScratchLMError, match="nothing-here"):
        resolve_input(str(tmp_path / "nothing-here.txt"))
    with pytest.raises(ScratchLMError, match=r"no column 'body'"):
        list(iter_documents_from(str(tmp_path / "d.parquet"), text_field="body"))


def test_text_doc_modes():
    text = "para one\n\npara two is longer\n\n\n\npara three"
    assert split_text(text, "blank", 1) == ["para one", "para two is longer", "para three"]
    assert split_text(text, "blank", 15) == ["para one\n\npara two is longer", "para three"]
    assert split_text("a\nb\n\nc", "line", 1) == ["a", "b", "c"]
    assert split_text(" x ", "file", 1) == [" x "]
    with pytest.raises(ScratchLMError, match="doc_mode"):
        split_text(text, "paragraph", 1)


def test_shared_corpora_become_sensible_documents():
    wiki = list(iter_documents_from(str(shared_file("corpora/wiki_demo.txt"))))
    assert len(wiki) == 30  # one article per line
    plays = list(iter_documents_from(str(shared_file("corpora/tinyshakespeare.txt"))))
    assert 500 < len(plays) < 2000 and all(d.profile == "prose" for d in plays)
    c4 = list(iter_documents_from(str(shared_file("corpora/c4_demo.jsonl"))))
    assert len(c4) == 300


def test_stdlib_corpus_excludes_tests():
    files = stdlib_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = {p for f in files for p in f.relative_to(stdlib).parts[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert stdlib / "json" / "__init__.py" in files
    assert 5e6 < sum(f.stat().st_size for f in files) < 30e6
