"""Named corpora: datasets on the Hugging Face Hub, and single files in GitHub repositories.

One table, `CORPORA`, holds both kinds and one entry point, `download_corpus(name, out_dir)`,
fetches either into `out_dir`; `data prepare --input DIR` then reads them like any local files.

- `HubCorpus`: a dataset repository and the exact files to fetch (a pinned list rather than a
  glob, so a download is a known size and `prepare` sees the same files every time), through
  huggingface_hub. Files land under their repository paths. The endpoint comes from
  `HF_ENDPOINT` (read at call time) or the `endpoint` argument.
- `GitHubFile`: one file of a GitHub repository with its known size and sha256, fetched over
  plain HTTPS with urllib from raw.githubusercontent.com, or from `SCRATCHLM_GITHUB_ENDPOINT`
  (read at call time) or the `endpoint` argument. For corpora that are not on the Hub in a
  stable form (Tiny Shakespeare).

`endpoint` and the two variables are how the tests point downloads at a local server.

A failed download leaves nothing of that attempt behind (partial files, huggingface_hub's lock
and bookkeeping files, directories it created), and never removes anything that was there
before; files of the corpus that completed before the failure are kept, so a retry resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scratchlm.errors import ScratchLMError

GITHUB_ENDPOINT_VARIABLE = "SCRATCHLM_GITHUB_ENDPOINT"
DEFAULT_GITHUB_ENDPOINT = "https://raw.githubusercontent.com"
# Seconds without progress (connecting, or between two reads) before a plain-HTTP download
# gives up; generous because it is per read, not for the whole file.
HTTP_TIMEOUT_S = 30.0
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class HubCorpus:
    repo_id: str
    files: tuple[str, ...]
    description: str
    revision: str = "main"
    val_files: tuple[str, ...] = ()  # those of `files` that are the corpus' own validation split

    @property
    def source(self) -> str:
        return f"Hugging Face Hub, {self.repo_id}"


@dataclass(frozen=True)
class GitHubFile:
    """One file of a GitHub repository, saved as `filename`, accepted only with exactly `size`
    bytes and this `sha256`: the checksum, not the ref, is what pins the content."""

    repo: str                        # owner/name
    ref: str                         # branch, tag or commit as raw.githubusercontent.com takes it
    path: str                        # path inside the repository
    filename: str                    # local name in the output directory
    size: int
    sha256: str
    description: str
    val_files: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return (self.filename,)

    @property
    def source(self) -> str:
        return f"GitHub, {self.repo} {self.path}"

    def url(self, endpoint: str) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/{self.ref}/{self.path}"


Corpus = HubCorpus | GitHubFile


CORPORA: dict[str, Corpus] = {
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
    # Karpathy's char-rnn copy, the one every char-level tutorial uses. `master` rather than a
    # commit: the known copy is from 6f9487a, but whether raw.githubusercontent.com resolves a
    # short hash could not be checked from here (no GitHub access) and the full hash is unknown.
    # The repository has been unchanged for years, and the size and sha256 below (of that copy)
    # make any other content a clear error rather than a silently different corpus.
    "tinyshakespeare": GitHubFile(
        "karpathy/char-rnn", "master", "data/tinyshakespeare/input.txt", "tinyshakespeare.txt",
        size=1_115_394, sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        description="Tiny Shakespeare (40,000 lines of Shakespeare's plays, the classic char-level corpus); 1.1 MB",
    ),
}


def download_corpus(name: str, out_dir: str | Path, *, endpoint: str | None = None,
                    token: str | None = None) -> list[Path]:
    """Fetch the files of corpus `name` into `out_dir`; returns their local paths.

    Files already complete are not fetched again (for Hub corpora huggingface_hub keeps per-file
    metadata under `out_dir/.cache`, which `data prepare` ignores like every dot-directory; a
    GitHub file is checked against its sha256). `endpoint` replaces the host of the corpus'
    kind; `token` is for the Hub.
    """
    if name not in CORPORA:
        raise ScratchLMError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    out_dir = Path(out_dir)
    if isinstance(corpus, GitHubFile):
        base = endpoint or os.environ.get(GITHUB_ENDPOINT_VARIABLE) or DEFAULT_GITHUB_ENDPOINT
        return [_download_github_file(name, corpus, out_dir, base)]
    return _download_hub_corpus(name, corpus, out_dir, endpoint, token)


# --------------------------------------------------------------------------- Hugging Face Hub
def _download_hub_corpus(name: str, corpus: HubCorpus, out_dir: Path, endpoint: str | None,
                         token: str | None) -> list[Path]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    # huggingface_hub retries an unreachable endpoint for ~23 s (backoff 1+2+4+8+8 s) before it
    # gives up on a file it does not have yet. One quick request first tells "offline" apart
    # from a flaky Hub; it is needed only when a file is missing: with every file present,
    # huggingface_hub falls back to them at once when it cannot reach the Hub.
    missing = [f for f in corpus.files if not (out_dir / f).is_file()]
    if missing and not constants.HF_HUB_OFFLINE:
        fail_if_unreachable(f"cannot download corpus {name!r}", (endpoint or constants.ENDPOINT).rstrip("/"),
                            timeout=constants.HF_HUB_ETAG_TIMEOUT)
    paths = []
    for filename in corpus.files:
        try:
            with _removed_on_failure(_hub_paths_created_for(out_dir, filename)):
                path = hf_hub_download(corpus.repo_id, filename, repo_type="dataset",
                                       revision=corpus.revision, local_dir=out_dir,
                                       endpoint=endpoint, token=token)
        except (OSError, EntryNotFoundError) as exc:
            raise ScratchLMError(f"download of {corpus.repo_id}/{filename} failed: {exc}".splitlines()[0]) from exc
        paths.append(Path(path))
    return paths


def fail_if_unreachable(what: str, endpoint: str, timeout: float) -> None:
    """Raise a one-line error, `what: endpoint is unreachable (reason)`, when nothing answers at
    `endpoint` (DNS failure, connection refused, connect timeout). Any HTTP answer, even an error status or a redirect, means the
    host is there, and the real download reports what it finds. TLS failures are left to the
    real download too: urllib checks certificates against the system store, huggingface_hub's
    HTTP client may use another one. urllib honours the same *_PROXY variables as that client."""
    if not endpoint.startswith(("http://", "https://")):
        raise ScratchLMError(f"Hub endpoint {endpoint!r} (HF_ENDPOINT) is not an http:// or https:// URL")

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # a redirect is an answer: stop there
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, OSError) and not isinstance(exc.reason, ssl.SSLError):
            raise ScratchLMError(f"{what}: {endpoint} is unreachable ({_reason(exc.reason)})") from None
    except TimeoutError as exc:
        raise ScratchLMError(f"{what}: {endpoint} is unreachable ({_reason(exc)})") from None
    except (OSError, http.client.HTTPException):
        return  # something answered, if oddly: let the real download judge


def _hub_paths_created_for(out_dir: Path, filename: str) -> list[Path]:
    """The paths hf_hub_download(local_dir=out_dir) may create for `filename` (huggingface_hub
    2.x `_local_folder`): the file's directories, and under `.cache/huggingface` a cache tag,
    a .gitignore (and its lock), and `download/<filename>.lock` / `.metadata`. Its partial
    `.incomplete` files it removes itself. The file itself is not listed: it appears only
    complete (renamed into place), and a complete file is worth keeping."""
    target = out_dir / filename
    bookkeeping = out_dir / ".cache" / "huggingface"
    download = bookkeeping / "download"
    return [*_missing_directories(target.parent),
            out_dir / ".cache", bookkeeping, bookkeeping / "CACHEDIR.TAG", bookkeeping / ".gitignore",
            bookkeeping / ".gitignore.lock", *_directories_between(download, (download / filename).parent),
            download / f"{filename}.lock", download / f"{filename}.metadata"]


# --------------------------------------------------------------------------- plain HTTP(S)
def _download_github_file(name: str, corpus: GitHubFile, out_dir: Path, endpoint: str) -> Path:
    from tqdm import tqdm

    from scratchlm import __version__

    url = corpus.url(endpoint)
    target = out_dir / corpus.filename
    if target.exists():
        if _file_matches(target, corpus):
            return target
        # Not ours to replace: it may be the user's own file under that name.
        raise ScratchLMError(f"{target} exists but is not the expected {name} file ({corpus.size:,} bytes, "
                             f"sha256 {corpus.sha256[:16]}...); move it away or choose another directory")
    failed = f"download of corpus {name!r} from {url} failed"
    request = urllib.request.Request(url, headers={"User-Agent": f"scratchlm/{__version__}"})
    with _removed_on_failure(_missing_directories(out_dir)):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            # A unique hidden name in the output directory itself, so the final rename stays on
            # one filesystem; opened with "x" so the file gets the mode the umask gives it.
            partial = out_dir / f".{corpus.filename}.{uuid.uuid4().hex[:8]}.part"
            handle = open(partial, "xb")
        except OSError as exc:
            raise ScratchLMError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
        try:
            with handle, urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                digest, received = hashlib.sha256(), 0
                with tqdm(total=corpus.size, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=corpus.filename, file=sys.stderr) as progress:
                    # Stop once past the expected size: a server sending more is wrong already,
                    # and must not fill the disk.
                    while received <= corpus.size and (chunk := response.read(_CHUNK_BYTES)):
                        handle.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
            if received != corpus.size or digest.hexdigest() != corpus.sha256:
                raise ScratchLMError(
                    f"{failed}: checksum mismatch, got {received:,}{'+' if received > corpus.size else ''} "
                    f"bytes with sha256 {digest.hexdigest()[:16]}..., expected {corpus.size:,} bytes with "
                    f"sha256 {corpus.sha256[:16]}...; nothing was kept")
            os.replace(partial, target)
        except urllib.error.HTTPError as exc:
            raise ScratchLMError(f"{failed}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise ScratchLMError(f"{failed}: {_reason(exc.reason)}") from None
        except (OSError, http.client.HTTPException) as exc:  # a timeout, a dropped connection, disk full
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise ScratchLMError(f"{failed}: {_reason(exc)}{where}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()  # after a success it has been renamed away
    return target


def _file_matches(path: Path, corpus: GitHubFile) -> bool:
    if not path.is_file() or path.stat().st_size != corpus.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() == corpus.sha256


# --------------------------------------------------------------------------- helpers
def _reason(exc: object) -> str:
    """'Connection refused' rather than '[Errno 111] Connection refused'; 'timed out' for a timeout."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _missing_directories(directory: Path) -> list[Path]:
    """`directory` and those of its ancestors that do not exist yet (what mkdir -p would create)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _directories_between(top: Path, bottom: Path) -> list[Path]:
    """`bottom`, its parents up to `top`, and `top` (`bottom` is `top` or inside it)."""
    directories = [bottom]
    while directories[-1] != top:
        directories.append(directories[-1].parent)
    return directories


@contextlib.contextmanager
def _removed_on_failure(paths: list[Path]) -> Iterator[None]:
    """If the block fails, remove those of `paths` it created: files, then directories that
    are empty (deepest first). Paths that existed before the block are never touched."""
    existed = {path for path in paths if os.path.lexists(path)}
    try:
        yield
    except BaseException:
        created = [path for path in paths if path not in existed and os.path.lexists(path)]
        for path in created:
            if not path.is_dir() or path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in sorted((p for p in created if p.is_dir() and not p.is_symlink()),
                           key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: anything else in it is not ours to judge
        raise
