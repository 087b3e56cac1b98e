"""Named-corpus downloads against local servers: one that mimics the Hugging Face Hub, one that
serves files the way raw.githubusercontent.com does, and a port where nothing listens."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.data.hub import CORPORA, GitHubFile, HubCorpus, download_corpus
from scratchlm.errors import ScratchLMError
from tests.conftest import shared_file
from tests.fake_hub import FakeHub, serving

@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    corpus = CORPORA["tinystories-valid"]
    files = {f"{corpus.repo_id}/{corpus.files[0]}": "A story.<|endoftext|>Another story.\n".encode() * 50}
    with serving(files, monkeypatch, tmp_path / "hf_home") as endpoint:
        yield endpoint


def test_download_named_corpus_from_local_hub(fake_hub, tmp_path):
    corpus = CORPORA["tinystories-valid"]
    paths = download_corpus("tinystories-valid", tmp_path / "out")
    assert [p.name for p in paths] == [corpus.files[0]]
    assert paths[0].read_bytes() == FakeHub.files[f"{corpus.repo_id}/{corpus.files[0]}"]
    assert ("GET", f"/datasets/{corpus.repo_id}/resolve/main/{corpus.files[0]}") in FakeHub.requests
    # A second call finds the complete file and does not fetch the body again.
    gets = sum(1 for method, _ in FakeHub.requests if method == "GET")
    download_corpus("tinystories-valid", tmp_path / "out")
    assert sum(1 for method, _ in FakeHub.requests if method == "GET") == gets


def test_download_errors_are_one_line(fake_hub, tmp_path, monkeypatch, capsys):
    FakeHub.files = {}
    with pytest.raises(ScratchLMError, match="TinyStoriesV2-GPT4-valid.txt"):
        download_corpus("tinystories-valid", tmp_path / "out")
    assert main(["data", "download", "tinystories-valid", "-o", str(tmp_path / "out")]) == 1
    assert "download of roneneldan/TinyStories" in capsys.readouterr().err
    # huggingface_hub's lock and bookkeeping files (and the directory) of the failed attempt are gone.
    assert not (tmp_path / "out").exists()


def test_every_named_corpus_is_well_formed():
    assert {"tinystories", "fineweb-edu-sample", "tinyshakespeare"} <= set(CORPORA)
    for corpus in CORPORA.values():
        assert corpus.files and corpus.description and set(corpus.val_files) <= set(corpus.files)
        if isinstance(corpus, HubCorpus):
            assert "/" in corpus.repo_id
        else:
            assert isinstance(corpus, GitHubFile) and "/" in corpus.repo
            assert corpus.size > 0 and len(corpus.sha256) == 64


def _tree(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


@pytest.fixture()
def dead_endpoint() -> str:
    """An http:// URL on a local port where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_hub_fails_at_once_and_leaves_nothing(dead_endpoint, tmp_path, monkeypatch, capsys):
    # huggingface_hub alone retries for ~23 s here and leaves .cache/huggingface/download/*.lock.
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    message = f"cannot download corpus 'tinystories-valid': {dead_endpoint} is unreachable (Connection refused)"
    with pytest.raises(ScratchLMError) as excinfo:
        download_corpus("tinystories-valid", tmp_path / "new" / "out")
    assert str(excinfo.value) == message
    assert not (tmp_path / "new").exists()  # no directory created either
    # Into a directory that holds files already (one where huggingface_hub's would go): they stay.
    out = tmp_path / "out"
    (out / ".cache" / "huggingface").mkdir(parents=True)
    (out / ".cache" / "huggingface" / ".gitignore").write_text("mine")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(["data", "download", "tinystories-valid", "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"scratchlm: error: {message}\n"
    assert _tree(out) == before


def test_complete_files_are_used_when_the_hub_is_unreachable(fake_hub, dead_endpoint, tmp_path, monkeypatch):
    """`scratchlm run --corpus NAME` calls download_corpus on every run: offline, files already
    downloaded are used as they are (huggingface_hub's own fallback), not an error."""
    first = download_corpus("tinystories-valid", tmp_path / "out")
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    assert download_corpus("tinystories-valid", tmp_path / "out") == first


# --------------------------------------------------------------------------- plain HTTP (GitHub)
class FakeGitHub(http.server.BaseHTTPRequestHandler):
    """Serves `files` at /{owner}/{repo}/{ref}/{path}, the raw.githubusercontent.com layout."""

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = urllib.parse.urlsplit(self.path).path
        self.requests.append((self.command, path))
        body = self.files.get(path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


SHAKESPEARE = CORPORA["tinyshakespeare"]
SHAKESPEARE_PATH = f"{SHAKESPEARE.repo}/{SHAKESPEARE.ref}/{SHAKESPEARE.path}"


@pytest.fixture()
def fake_github(monkeypatch):
    FakeGitHub.files = {}
    FakeGitHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGitHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("SCRATCHLM_GITHUB_ENDPOINT", endpoint)
    yield endpoint
    server.shutdown()
    server.server_close()


def test_tinyshakespeare_download_is_checked_and_not_repeated(fake_github, tmp_path):
    body = shared_file("corpora/tinyshakespeare.txt").read_bytes()
    FakeGitHub.files = {SHAKESPEARE_PATH: body}
    out = tmp_path / "out"
    assert download_corpus("tinyshakespeare", out) == [out / "tinyshakespeare.txt"]
    assert (out / "tinyshakespeare.txt").read_bytes() == body
    assert _tree(out) == ["tinyshakespeare.txt"]  # no partial file left beside it
    assert FakeGitHub.requests == [("GET", f"/{SHAKESPEARE_PATH}")]
    # Present with the right checksum: not requested again.
    assert download_corpus("tinyshakespeare", out) == [out / "tinyshakespeare.txt"]
    assert len(FakeGitHub.requests) == 1


def test_tinyshakespeare_through_the_cli(fake_github, tmp_path, capsys):
    FakeGitHub.files = {SHAKESPEARE_PATH: shared_file("corpora/tinyshakespeare.txt").read_bytes()}
    out = tmp_path / "out"
    assert main(["data", "download", "tinyshakespeare", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"{out / 'tinyshakespeare.txt'}\n"
    assert hashlib.sha256((out / "tinyshakespeare.txt").read_bytes()).hexdigest() == SHAKESPEARE.sha256


@pytest.mark.parametrize("body", [b"x" * SHAKESPEARE.size,           # right size, wrong bytes
                                  b"First Citizen:\n",                # short
                                  b"x" * (SHAKESPEARE.size + 5)])     # too long
def test_wrong_bytes_are_a_checksum_error_and_leave_nothing(fake_github, tmp_path, capsys, body):
    FakeGitHub.files = {SHAKESPEARE_PATH: body}
    out = tmp_path / "out"
    with pytest.raises(ScratchLMError, match=rf"^download of corpus 'tinyshakespeare' from "
                                             rf"{fake_github}/{SHAKESPEARE_PATH} failed: checksum mismatch"):
        download_corpus("tinyshakespeare", out)
    assert not out.exists()
    # Into an existing directory: nothing added, nothing of what was there removed.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["data", "download", "tinyshakespeare", "-o", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert _tree(out) == ["notes.txt"]


def test_http_errors_name_the_url(fake_github, dead_endpoint, tmp_path, monkeypatch):
    url = f"{fake_github}/{SHAKESPEARE_PATH}"
    with pytest.raises(ScratchLMError, match=rf"^download of corpus 'tinyshakespeare' from {url} failed: HTTP 404"):
        download_corpus("tinyshakespeare", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("SCRATCHLM_GITHUB_ENDPOINT", dead_endpoint)
    with pytest.raises(ScratchLMError, match=rf"from {dead_endpoint}/{SHAKESPEARE_PATH} failed: Connection refused$"):
        download_corpus("tinyshakespeare", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_foreign_files_are_errors(fake_github, tmp_path):
    FakeGitHub.files = {SHAKESPEARE_PATH: b"unused"}
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ScratchLMError, match=r"^cannot write to .*a_file/out: Not a directory$"):
        download_corpus("tinyshakespeare", tmp_path / "a_file" / "out")
    # A file of that name that is not the corpus is the user's: not replaced, not fetched over.
    out = tmp_path / "out"
    out.mkdir()
    (out / "tinyshakespeare.txt").write_text("my own notes")
    with pytest.raises(ScratchLMError, match=r"tinyshakespeare.txt exists but is not the expected tinyshakespeare file"):
        download_corpus("tinyshakespeare", out)
    assert (out / "tinyshakespeare.txt").read_text() == "my own notes"
    assert FakeGitHub.requests == []
