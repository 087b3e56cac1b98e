"""`prepare_data`: raw inputs -> cleaned, filtered, deduplicated, split, tokenized shards.

Two phases, each streaming in bounded memory:

  tasks     data/tasks.py: the inputs cut into N slices; each task reads, cleans, filters,
            fingerprints and tokenizes its documents into OUT/tasks/task_NNNNN
  finalize  data/finalize.py: exact and near-duplicate removal across tasks, the split,
            the shards and the manifest

`prepare_data` runs both: the tasks on `workers` local processes (or on a Ray cluster with
executor="ray"), then finalize. On a cluster, `prepare_task` runs one task (a Slurm array
job: one task per array element) and `finalize_data` runs once all are done. The documents in
OUT are the same whichever way, and the shards byte-identical for any task or worker count.
A killed run, re-run, keeps its finished tasks and redoes the others.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from scratchlm.data.config import PrepareConfig
from scratchlm.data.finalize import finalize_data
from scratchlm.data.shards import MANIFEST
from scratchlm.data.tasks import TASKS_DIR, Plan, finished_task, plan_tasks, run_task, task_identity
from scratchlm.errors import ScratchLMError
from scratchlm.fsutil import check_output_directory, make_directory
from scratchlm.sources import check_inputs
from scratchlm.workers import process_pool, progress_queue, result_of

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "PrepareConfig", "finalize_data", "format_stats_table", "prepare_data", "prepare_task"]


def _setup(inputs, tokenizer_dir, out_dir, config: PrepareConfig | None, overwrite: bool, num_tasks: int):
    """Checks that need no work (settings, inputs, the output directory, the tokenizer), then
    the plan. The output directory may hold this data directory's own tasks (a resumed or
    parallel run); anything else needs `overwrite`."""
    config = config or PrepareConfig()
    config.validate()
    check_inputs(inputs)
    if config.val_inputs:
        check_inputs(config.val_inputs)
    out_dir = check_output_directory(out_dir, overwrite=True, what="data directory")
    if out_dir.is_dir() and not overwrite:
        others = sorted(p.name for p in out_dir.iterdir() if p.name != TASKS_DIR)
        if others:
            what = "a prepared data directory" if MANIFEST in others else f"other files ({', '.join(others[:3])})"
            raise ScratchLMError(f"{out_dir} holds {what}; use --overwrite to prepare into it (files that are "
                                 f"not the data directory's are kept), or choose another directory")
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.eot_id is None:
        raise ScratchLMError(f"tokenizer {tokenizer_dir} has no <|endoftext|> token to separate documents")
    plan = plan_tasks(list(inputs), list(config.val_inputs), num_tasks, config.doc_mode)
    return config, out_dir, tokenizer, plan


def prepare_task(inputs: list[str] | tuple[str, ...], tokenizer_dir: str | Path, out_dir: str | Path, *,
                 task_index: int, num_tasks: int, config: PrepareConfig | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Run task `task_index` of `num_tasks` into out_dir/tasks (one element of a Slurm array);
    `finalize_data(out_dir)` once every task is done. Returns the task's record."""
    if not 0 <= task_index < num_tasks:
        raise ScratchLMError(f"--task-index {task_index} is outside [0, {num_tasks}) (--num-tasks {num_tasks})")
    config, out_dir, tokenizer, plan = _setup(inputs, tokenizer_dir, out_dir, config, overwrite, num_tasks)
    make_directory(out_dir / TASKS_DIR)
    return run_task(out_dir, plan, task_index, config, tokenizer, Path(tokenizer_dir), overwrite=overwrite)


def prepare_data(
    inputs: list[str] | tuple[str, ...], tokenizer_dir: str | Path, out_dir: str | Path, *,
    config: PrepareConfig | None = None, overwrite: bool = False, num_tasks: int | None = None,
    executor: str = "local", keep_tasks: bool = False,
) -> dict:
    """Build a data directory from `inputs`: every task, then finalize. Returns the manifest
    (also written as manifest.json). Tasks already done in `out_dir` with the same settings
    are kept (a killed run continues); `num_tasks` defaults to the number of workers."""
    if executor not in EXECUTORS:
        raise ScratchLMError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    config = config or PrepareConfig()
    workers = config.workers or os.cpu_count() or 1
    config, out_dir, tokenizer, plan = _setup(inputs, tokenizer_dir, out_dir, config, overwrite,
                                              num_tasks or workers)
    identity = task_identity(plan, config, tokenizer, Path(tokenizer_dir))
    pending = [i for i in range(plan.num_tasks) if not finished_task(out_dir, i, identity, overwrite)]
    with _removed_if_it_fails(out_dir):
        make_directory(out_dir / TASKS_DIR)
        started = time.perf_counter()
        if executor == "ray":
            _run_on_ray(out_dir, plan, pending, config, Path(tokenizer_dir), overwrite)
        else:
            _run_locally(out_dir, plan, pending, config, tokenizer, Path(tokenizer_dir), workers, overwrite)
        return finalize_data(out_dir, keep_tasks=keep_tasks, progress=config.progress,
                             tasks_seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _removed_if_it_fails(out_dir: Path) -> Iterator[None]:
    """On an error (bad input, nothing left to train on), remove what this run created: its
    tasks, and the directories if it made them. An interrupt keeps the finished tasks, for
    the next run to continue from, and removes the unfinished ones' temporary directories
    (workers stopped midway leave them)."""
    tasks = out_dir / TASKS_DIR
    existed = {path for path in (out_dir, tasks) if path.exists()}
    earlier = set(tasks.iterdir()) if tasks.is_dir() else set()
    try:
        yield
    except BaseException as exc:
        if tasks.is_dir():
            for path in set(tasks.iterdir()) - earlier:
                if isinstance(exc, ScratchLMError) or path.name.startswith("."):
                    shutil.rmtree(path, ignore_errors=True)
        for path in (tasks, out_dir):
            if path not in existed:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty
        raise


# --------------------------------------------------------------------------- local processes
_WORKER: dict[str, Any] = {}  # in a worker process: its progress queue and tokenizer


def _init_local_worker(progress: Any, tokenizer: Any) -> None:
    # The tokenizer arrives pickled: 0.08 s to rebuild GPT-2's, against 0.44 s to load it from disk.
    _WORKER.update(progress=progress, tokenizer=tokenizer)


def _local_task(out_dir: Path, plan: Plan, index: int, config: PrepareConfig, tokenizer_dir: Path,
                overwrite: bool) -> int:
    run_task(out_dir, plan, index, config, _WORKER["tokenizer"], tokenizer_dir,
             on_bytes=_WORKER["progress"].put, overwrite=overwrite)
    return index


def _run_locally(out_dir: Path, plan: Plan, pending: list[int], config: PrepareConfig, tokenizer,
                 tokenizer_dir: Path, workers: int, overwrite: bool) -> None:
    """The pending tasks on `workers` processes (scratchlm.workers), one task per process at a
    time; a progress bar over the input bytes they have read."""
    if not pending:
        return
    total = sum(_slice_bytes(piece) for i in pending for piece in plan.tasks[i])
    bar = tqdm(total=total, desc=f"{len(pending)} task(s)", unit="B", unit_scale=True, disable=not config.progress)
    try:
        if workers == 1 or len(pending) == 1:
            for index in pending:
                run_task(out_dir, plan, index, config, tokenizer, tokenizer_dir, on_bytes=bar.update,
                         overwrite=overwrite)
            return
        progress = progress_queue()
        pool = process_pool(min(workers, len(pending)), _init_local_worker, (progress, tokenizer))
        try:
            waiting = {pool.submit(_local_task, out_dir, plan, index, config, tokenizer_dir, overwrite)
                       for index in pending}
            while waiting:
                done, waiting = concurrent.futures.wait(waiting, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                while not progress.empty():
                    bar.update(progress.get())
                for future in done:
                    result_of(future, "preparing data tasks")
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, no queued task starts
        while not progress.empty():
            bar.update(progress.get())
    finally:
        bar.close()


def _slice_bytes(piece) -> int:
    if piece.start is None:
        return os.path.getsize(piece.path)
    return piece.end - piece.start


# --------------------------------------------------------------------------- Ray
def _run_on_ray(out_dir: Path, plan: Plan, pending: list[int], config: PrepareConfig, tokenizer_dir: Path,
                overwrite: bool) -> None:
    """The pending tasks as Ray tasks, one CPU each: on the cluster at RAY_ADDRESS, else on a
    local Ray. Every node must see the inputs, the tokenizer and OUT at the same paths."""
    try:
        import ray
    except ImportError:
        raise ScratchLMError("--executor ray needs Ray: pip install 'scratchlm[ray]'") from None
    address = os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            _check_reachable(address)
        try:
            ray.init(address="auto" if address else None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception as exc:  # ConnectionError, or Ray's own errors for a bad address
            raise ScratchLMError(f"cannot reach the Ray cluster at {address or 'a local Ray'}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        remote = ray.remote(num_cpus=1)(_ray_task)
        refs = [remote.remote(str(out_dir), plan, index, config, str(tokenizer_dir), overwrite) for index in pending]
        with tqdm(total=len(refs), desc="ray tasks", unit="task", disable=not config.progress) as bar:
            remaining = refs
            while remaining:
                done, remaining = ray.wait(remaining, num_returns=1)
                try:
                    ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), ScratchLMError) else None
                    raise ScratchLMError(str(cause) if cause else f"a Ray task failed: "
                                         f"{str(exc).splitlines()[0]}") from None
                bar.update(1)
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes for a cluster that is not there; a TCP connect says so at once."""
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ScratchLMError(f"RAY_ADDRESS {address!r} is not HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScratchLMError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): "
                             f"{exc.strerror or type(exc).__name__}") from None


@functools.lru_cache(maxsize=1)
def _tokenizer_at(tokenizer_dir: str):
    """The tokenizer, loaded once per Ray worker process (a process may run many tasks)."""
    from scratchlm.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_dir)


def _ray_task(out_dir: str, plan: Plan, index: int, config: PrepareConfig, tokenizer_dir: str, overwrite: bool) -> int:
    run_task(Path(out_dir), plan, index, config, _tokenizer_at(tokenizer_dir), Path(tokenizer_dir), overwrite=overwrite)
    return index


# --------------------------------------------------------------------------- the closing table
def format_stats_table(manifest: dict) -> str:
    """The closing summary: documents and bytes after each stage, drops per filter, tokens."""
    lines = [f"{'stage':<22}{'documents':>12}{'MB':>11}{'seconds':>10}"]
    for row in manifest["stages"]:
        lines.append(f"{row['stage']:<22}{row['documents']:>12,}{row['bytes'] / 1e6:>11.3f}{row['seconds']:>10.2f}")
    drops = [(name, f["dropped"]) for name, f in manifest["filters"].items() if f["dropped"]]
    if drops:
        lines.append("dropped by filter: " + ", ".join(f"{name} {n:,}" for name, n in drops))
    for source in manifest["sources"]:
        lines.extend(source.get("problems", []))
    if manifest["pii_replacements"]:
        lines.append("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in manifest["pii_replacements"].items()))
    for split, info in manifest["splits"].items():
        ratio = info["bytes"] / max(1, info["tokens"] - info["documents"])
        lines.append(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shard(s), "
                     f"{ratio:.2f} bytes/token")
    lines.append(f"{manifest['seconds']:.1f} s")
    return "\n".join(lines)
