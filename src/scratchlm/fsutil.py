"""Safe writes: nothing half-written under a final name, nothing of the user's deleted.

Everything scratchlm writes goes to a temporary path first and is renamed into place, so an
interrupted command leaves either the old state or the new one, never a mix. Output
directories follow one rule on every command: a command writes into an existing directory
only when it is empty or the user passed `--overwrite`, and even then it replaces only the
files it writes itself; whatever else the directory holds stays.

Temporary files are created private (mode 0600) by `tempfile`; before a rename they get the
mode a plain `open()` would have given them under the user's umask.

OS errors on these paths (disk full, a path under a regular file, no permission) become
one-line `ScratchLMError`s naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from scratchlm.errors import ScratchLMError

_TMP_PREFIX = ".scratchlm-tmp-"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """'PATH: reason' for an OSError, naming the path the error is about."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOTDIR and where is not None:
        reason = "a parent of this path is a regular file, not a directory"
    return f"{where}: {reason}" if where is not None else reason


def make_directory(path: str | os.PathLike) -> Path:
    """mkdir -p with a one-line error (e.g. when a parent is a regular file)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ScratchLMError(f"cannot create directory {path}: a file of that name exists") from None
    except OSError as exc:
        raise ScratchLMError(f"cannot create directory {path}: {describe_os_error(exc)}") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    make_directory(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ScratchLMError(f"cannot write {path}: {describe_os_error(exc, path.parent)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ScratchLMError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that needs a file name (not bytes in
    memory); it becomes `path` by one rename when the block finishes, and is removed if the
    block fails. An existing `path` is replaced only with `overwrite`, and never a directory."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise ScratchLMError(f"{path} is a directory (the {what} is a file)")
    if path.exists() and not overwrite:
        raise ScratchLMError(f"{path} exists; use --overwrite to replace it, or choose another name")
    make_directory(path.parent)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise ScratchLMError(f"cannot write {path}: {describe_os_error(exc, path.parent)}") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ScratchLMError(f"cannot write {path}: {describe_os_error(exc)}") from None
        raise


def check_output_directory(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Refuse, before any work, an output path that is a file or a non-empty directory
    without `overwrite`. Returns the path made absolute (so `-o .` has a name and a parent)."""
    if not str(path).strip():
        raise ScratchLMError(f"the {what} needs a directory name (got an empty path)")
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise ScratchLMError(f"{path} exists and is not a directory (the {what} needs a directory)")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ScratchLMError(f"cannot create {path}: {parent} is a regular file, not a directory")
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ScratchLMError(
                f"{path} is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: "
                f"{shown}); use --overwrite to write "
                f"the {what} into it (other files there are kept), or choose another directory")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, what: str = "output",
                     commit_last: Iterable[str] = (), replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory whose contents become `path` once the block finishes.

    - `path` does not exist: the temporary directory, a hidden sibling, is renamed to `path`,
      so the output appears complete or not at all.
    - `path` is a directory (empty, or anything with `overwrite`): the new entries are moved
      into it one rename at a time, the names in `commit_last` last (the file that marks the
      directory complete: a manifest, a config), so a reader never finds that file beside
      missing parts. Entries of the same name are replaced; other entries stay, except the
      ones named in `replaces` (earlier outputs of this same command, e.g. a previous run's
      shards) that the new output does not overwrite, which are removed after the commit.

    If the block fails, the temporary directory is removed and `path` is left as it was.
    """
    path = check_output_directory(path, overwrite, what)
    merge = path.is_dir()
    host = path if merge else make_directory(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=host, prefix=_TMP_PREFIX if merge else f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as exc:
        raise ScratchLMError(f"cannot write into {host}: {describe_os_error(exc)}") from None
    try:
        yield tmp
        if merge:
            written = set(os.listdir(tmp))
            _move_entries(tmp, path, last=set(commit_last))
            tmp.rmdir()
            for name in set(replaces) - written:
                _remove(path / name)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ScratchLMError(f"cannot write {path}: {describe_os_error(exc)}") from None
        if isinstance(exc, ScratchLMError) and str(tmp) in str(exc):
            # Name the directory the user asked for, not our temporary one.
            raise ScratchLMError(str(exc).replace(str(tmp), str(path))) from None
        raise


def _move_entries(source: Path, target: Path, last: set[str]) -> None:
    """Rename every entry of `source` into `target` (directories merged recursively)."""
    names = sorted(os.listdir(source), key=lambda n: (n in last, n))
    for name in names:
        src, dst = source / name, target / name
        if src.is_dir() and dst.is_dir() and not dst.is_symlink():
            _move_entries(src, dst, last=set())
            src.rmdir()
        else:
            os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_outputs(directory: Path, names: Iterable[str]) -> None:
    """Remove the named entries of `directory` (files, or directories the calling command made
    whole), then `directory` itself if that left it empty. Nothing else is touched: what a
    user put beside a command's outputs stays."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in names:
        _remove(directory / name)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when empty
