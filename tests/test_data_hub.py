"""Named-corpus download through huggingface_hub against a local server that mimics the Hub."""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse

import pytest

from scratchlm.cli import main
from scratchlm.data.hub import CORPORA, download_corpus
from scratchlm.errors import ScratchLMError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves `files` at /datasets/{repo}/resolve/{revision}/{path}, the URL hf_hub_download builds.

    huggingface_hub first sends HEAD for the metadata (commit, ETag, size), then GET for the body.
    """

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str]] = []

    def _lookup(self) -> bytes | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.requests.append((self.command, path))
        prefix = "/datasets/"
        if not path.startswith(prefix) or "/resolve/" not in path:
            return None
        repo, rest = path[len(prefix) :].split("/resolve/", 1)
        _revision, filename = rest.split("/", 1)
        return self.files.get(f"{repo}/{filename}")

    def _headers(self, body: bytes | None) -> None:
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._headers(self._lookup())

    def do_GET(self) -> None:  # noqa: N802
        body = self._lookup()
        self._headers(body)
        if body is not None:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    corpus = CORPORA["tinystories-valid"]
    FakeHub.files = {f"{corpus.repo_id}/{corpus.files[0]}": "A story.<|endoftext|>Another story.\n".encode() * 50}
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no user token or cache is touched
    yield endpoint
    server.shutdown()
    server.server_close()


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


def test_every_named_corpus_is_well_formed():
    assert {"tinystories", "fineweb-edu-sample"} <= set(CORPORA)
    for corpus in CORPORA.values():
        assert "/" in corpus.repo_id and corpus.files and corpus.description
