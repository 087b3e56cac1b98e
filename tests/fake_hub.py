"""A local HTTP server that answers the way the Hugging Face Hub does for file downloads, so
downloads are tested without the network (HF_ENDPOINT points huggingface_hub at it)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves `files["{repo}/{path}"]` at /{repo}/resolve/{revision}/{path} (models) and
    /datasets/{repo}/resolve/{revision}/{path} (datasets): the URLs hf_hub_download builds.

    huggingface_hub first sends HEAD for the metadata (commit, ETag, size), then GET for the body.
    """

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str]] = []

    def _lookup(self) -> bytes | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.requests.append((self.command, path))
        if "/resolve/" not in path:
            return None
        repo, rest = path.removeprefix("/datasets").lstrip("/").split("/resolve/", 1)
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


@contextlib.contextmanager
def serving(files: dict[str, bytes], monkeypatch, home: Path) -> Iterator[str]:
    """Serve `files` and point huggingface_hub at the server (and its cache under `home`, so
    no user token or cache is touched); yields the endpoint URL."""
    FakeHub.files = files
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
