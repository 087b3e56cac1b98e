"""The batched streaming inference engine: concurrent requests share every forward pass.

    engine = Engine.from_directory("runs/stdlib/pretrain/final")
    engine.start()                                   # or drive it with engine.step()
    stream = engine.submit(prompt_ids, SamplingParams(temperature=0.8, stop=("\\n\\n",)))
    for delta in stream:                             # or `async for` in an asyncio server
        print(delta.text, end="")

Scheduling (continuous batching). The engine owns one KV cache of `max_batch` rows, each
able to hold a whole context. The running requests occupy rows 0 .. n-1; every `step()`
first admits waiting requests into free rows (each prompt is prefilled on its own, and
only its last position goes through the LM head), then runs one decoding step for all n
rows together: one forward pass over n new tokens, reading each row's cached prefix in
place. A finished or cancelled request leaves at once and the last row moves into its
slot (one row's cache is copied, once), so the running rows stay contiguous and the
batch is always a plain slice of the cache: no per-step gathering or copying of prefixes.

Sampling: every row has its own settings (`SamplingParams`) and random generator; the
whole batch is sampled with tensor operations (`scratchlm.infer.sampling`).

Batch independence. A request's output does not depend on what else runs: its prompt is
prefilled alone, its sampler draws from its own generator, its cache row is only ever read
by itself. What remains is floating-point rounding: a matrix product over n rows is not
summed in exactly the same order as over one (CPU BLAS libraries use a different kernel
for a single row; GPU libraries pick kernels by shape), so logits differ in the last bits
(~1e-5 on CPU) between batch sizes. Greedy and seeded outputs are therefore the same alone
or batched except where two candidates are that close (a near-tie); the tests check the
equality with a model whose choices are not near-ties.

Lengths. `submit` refuses an empty prompt and a prompt of `context_length` tokens or more
(no room for a completion). `max_tokens` is clipped to the room the prompt leaves: prompt
plus completion never exceed the context, and a request that reaches it ends with
finish_reason "length", as one that reaches `max_tokens` does (no sliding window).

Threads. Tests and single-user programs drive the engine with `step()` (iterating a stream
does it for them); a server calls `start()`, and a scheduler thread steps while there is
work. On CPU, build the engine with `from_directory` and keep other threads free of torch
work: PyTorch's OpenMP gives every thread that runs parallel operations its own pool of
workers, and with two pools OpenMP stops busy-waiting, which made decoding in the scheduler
thread 2-3x slower (`_in_passing_thread` keeps the engine's own setup out of the caller's
thread).

Ends. A request ends with "stop" at an end token (`stop_ids()`: <|endoftext|>, and
<|im_end|> for a chat model), one of its `stop_token_ids` or one of its `stop` strings;
the end token or stop string itself is not part of the output (a token that completes a
stop string is still counted in `token_ids`). "length" as above; "cancelled" after
`Stream.cancel()` or `shutdown(drain=False)`.
"""

from __future__ import annotations

import asyncio
import collections
import operator
import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterable, Iterator, TypeVar

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.infer.sampling import BatchSampler, SamplingParams
from scratchlm.infer.text import IncrementalText
from scratchlm.model.onednn import route_linears_through_onednn
from scratchlm.post.chat import stop_ids as chat_stop_ids

if TYPE_CHECKING:
    import os

    from scratchlm.model.transformer import KVCache, Transformer
    from scratchlm.tokenizer import Tokenizer

__all__ = ["Completion", "Delta", "Engine", "SamplingParams", "Stream"]

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
T = TypeVar("T")


@dataclass
class Delta:
    """What one request produced since its previous delta. `text` holds whole characters
    only; text that might begin a stop string waits until the following tokens decide."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled" on the last


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Stream:
    """One request's deltas, in order, ending with the delta that has a finish_reason.

    Iterate it in a thread (`for`), or in an event loop (`async for`: woken by the engine's
    thread through `loop.call_soon_threadsafe`, no polling). When no scheduler thread runs
    (`Engine.start` not called) iterating drives the engine itself, one `step()` at a time.
    """

    def __init__(self, engine: Engine, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._engine = engine
        self._deltas: collections.deque[Delta] = collections.deque()
        self._ready = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._wakers: list[Callable[[], None]] = []  # one per async iterator waiting
        self._cancel_requested = False

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected): the request leaves the batch at the
        next step and the stream ends with finish_reason "cancelled"."""
        if not self._done:
            self._cancel_requested = True
            self._engine._note_cancellation()

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._ready:
                while not (self._deltas or self._done) and self._engine.started:
                    self._ready.wait()
                delta = self._deltas.popleft() if self._deltas else None
                finished = self._done and not self._deltas
            if delta is not None:
                yield delta
            elif finished:
                self._raise_error()
                return
            else:
                self._engine.step()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate_async()

    async def _iterate_async(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        with self._ready:
            self._wakers.append(wake)
        try:
            while True:
                # Cleared before looking: a delta pushed after the look sets it again.
                ready.clear()
                with self._ready:
                    deltas = list(self._deltas)
                    self._deltas.clear()
                    finished = self._done
                for delta in deltas:
                    yield delta
                if finished:
                    self._raise_error()
                    return
                if deltas:
                    continue
                if self._engine.started:
                    await ready.wait()
                else:  # no scheduler thread: step the engine without blocking the loop
                    await asyncio.to_thread(self._engine.step)
        finally:
            with self._ready:
                self._wakers.remove(wake)

    # ------------------------------------------------------------ engine side
    def _push(self, delta: Delta) -> None:
        with self._ready:
            self._deltas.append(delta)
            self.completion_tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                self._done = True
            self._ready.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _fail(self, error: BaseException) -> None:
        with self._ready:
            self._error = error
            self._done = True
            self._ready.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise ScratchLMError(f"the inference engine stopped: {self._error}") from self._error


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int  # max_tokens clipped to the room the prompt leaves in the context
    stop_ids: frozenset[int]
    text: IncrementalText
    rng: random.Random
    stream: Stream
    generated: int = 0


class Engine:
    """Serves many requests at once on one model (see the module docstring)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 32,
                 device: torch.device | str | None = None,
                 prefill_tokens_per_step: int | None = None) -> None:
        """`prefill_tokens_per_step`: prompt tokens a step may prefill before the running
        requests get their next token (default: the context length; one prompt always fits)."""
        for name, value in (("max_batch", max_batch), ("prefill_tokens_per_step", prefill_tokens_per_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ScratchLMError(f"{name} must be an integer >= 1, got {value!r}")
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ScratchLMError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                                 f"vocab_size is {model.config.vocab_size}")
        self.model = (model if device is None else model.to(device)).eval()
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.max_batch = max_batch
        self.prefill_tokens_per_step = prefill_tokens_per_step or self.context_length
        self.device = model.tok_emb.weight.device
        self._token_bytes = tokenizer.vocab
        self._end_ids = tuple(chat_stop_ids(tokenizer))
        vocab = model.config.vocab_size

        if self.device.type == "cpu":
            route_linears_through_onednn(self.model)  # decoding needs no gradients

        @torch.inference_mode()
        def allocate() -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
            return (self.model.new_kv_cache(max_batch),  # context_length positions, compute dtype
                    torch.zeros(max_batch, dtype=torch.long, device=self.device),
                    # Per row, for the penalties: tokens seen (prompt and output), times generated.
                    torch.zeros(max_batch, vocab, dtype=torch.bool, device=self.device),
                    torch.zeros(max_batch, vocab, dtype=torch.float32, device=self.device))

        self._cache, self._next_ids, self._seen, self._counts = _in_passing_thread(allocate)
        self._rows: list[_Request] = []  # row i of the cache belongs to self._rows[i]
        self._sampler: BatchSampler | None = None  # settings of self._rows, rebuilt on change
        self._waiting: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()  # guards the waiting queue and the flags below
        self._work = threading.Condition(self._lock)  # wakes the scheduler thread
        self._step_lock = threading.Lock()  # one step at a time, whoever drives
        self._accepting = True
        self._stopping = False
        self._abort = False  # shutdown(drain=False): cancel everything
        self._cancellations = False  # some stream asked to cancel since the last step
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # what stopped the scheduler thread

    @classmethod
    def from_directory(cls, model_dir: str | os.PathLike, *, device: str = "auto",
                       max_batch: int = 32) -> Engine:
        """An engine for the model in `model_dir` (or an adapter directory, merged) on `device`:
        auto (cuda, then mps, then cpu), cuda, mps or cpu."""
        from scratchlm.model.directory import load_model
        from scratchlm.train.distributed import pick_device

        def load() -> Engine:
            model, tokenizer = load_model(model_dir, device=pick_device(device))
            return cls(model, tokenizer, max_batch=max_batch)

        return _in_passing_thread(load)

    # ------------------------------------------------------------------ requests
    def stop_ids(self) -> list[int]:
        """The end tokens every request stops at: <|endoftext|>, and <|im_end|> for a chat model."""
        return list(self._end_ids)

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> Stream:
        """Queue a request (thread-safe); its deltas arrive on the returned stream. Bad input
        raises a one-line ScratchLMError (see the module docstring for the length rules)."""
        params = SamplingParams() if params is None else params
        params.check(self.context_length)
        prompt = self._check_prompt(prompt_ids)
        vocab = self.model.config.vocab_size
        for token in params.stop_token_ids:
            if token >= vocab:
                raise ScratchLMError(f"stop_token_ids: {token} is not a token id (vocab size {vocab})")
        stream = Stream(self, len(prompt))
        request = _Request(
            prompt, params, min(params.max_tokens, self.context_length - len(prompt)),
            frozenset(self._end_ids + params.stop_token_ids),
            IncrementalText(self._token_bytes, params.stop), random.Random(params.seed), stream)
        with self._lock:
            if self._failure is not None:
                raise ScratchLMError(f"the inference engine stopped after an error: {self._failure}")
            if not self._accepting:
                raise ScratchLMError("the inference engine is shutting down and takes no new requests")
            self._waiting.append(request)
            self._work.notify()
        return stream

    def _check_prompt(self, prompt_ids: Iterable[int]) -> list[int]:
        try:
            prompt = [operator.index(token) for token in prompt_ids]
        except TypeError:
            raise ScratchLMError("the prompt must be a list of integer token ids") from None
        if not prompt:
            raise ScratchLMError("the prompt is empty: it needs at least one token")
        if len(prompt) >= self.context_length:
            raise ScratchLMError(f"the prompt is {len(prompt)} tokens; the context length is "
                                 f"{self.context_length}, so it must be shorter to leave room for a completion")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise ScratchLMError(f"the prompt holds {bad}, which is not a token id (vocab size {vocab})")
        return prompt

    def generate(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> Completion:
        """Run one request to its end and return it whole (with or without `start()`)."""
        stream = self.submit(prompt_ids, params)
        texts, token_ids = [], []
        try:
            for delta in stream:
                texts.append(delta.text)
                token_ids += delta.token_ids
        except BaseException:  # e.g. Ctrl-C: give the row back
            stream.cancel()
            raise
        return Completion("".join(texts), token_ids, stream.finish_reason,
                          stream.prompt_tokens, stream.completion_tokens)

    @property
    def running(self) -> int:
        """Requests holding a row of the batch."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a free row."""
        with self._lock:
            return len(self._waiting)

    # ------------------------------------------------------------------ scheduling
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones (prefill and first
        token), then one decoding step for every running request. True while work remains."""
        with self._step_lock, torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            if self._rows:
                self._decode()
            with self._lock:
                return bool(self._rows or self._waiting)

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not self._cancellations:
                return
            self._cancellations = False
            kept = collections.deque()
            for request in self._waiting:
                if request.stream._cancel_requested or self._abort:
                    request.stream._push(Delta("", [], CANCELLED))
                else:
                    kept.append(request)
            self._waiting = kept
        cancelled = [row for row, request in enumerate(self._rows)
                     if request.stream._cancel_requested or self._abort]
        for row in cancelled:
            self._rows[row].stream._push(Delta("", [], CANCELLED))
        self._release(cancelled)

    def _admit(self) -> None:
        """Move waiting requests into free rows, prefilling each and sending its first token
        at once. A step prefills at most `prefill_tokens_per_step` prompt tokens (and always
        one prompt), so a crowd of arrivals holds up the running requests' next token by a
        bounded time, not by all of their prompts at once."""
        prefilled = 0
        while len(self._rows) < self.max_batch:
            with self._lock:
                if not self._waiting or (
                        prefilled and prefilled + len(self._waiting[0].prompt) > self.prefill_tokens_per_step):
                    return
                request = self._waiting.popleft()
            row = len(self._rows)
            logits = self._prefill(request, row)
            self._rows.append(request)
            self._sampler = None
            self._sample(row, logits)
            prefilled += len(request.prompt)

    def _prefill(self, request: _Request, row: int) -> torch.Tensor:
        """Cache the prompt in `row`; return the logits (1, vocab) of its last position.
        Alone, not padded into a batch: the prompt's computation is the same whatever else
        is waiting, and no padding is computed."""
        prompt = torch.tensor([request.prompt], device=self.device)
        cache = self._cache.rows(row, row + 1)
        cache.reset()
        hidden = self.model.features(prompt, cache)[:, -1]
        self._seen[row] = False
        self._seen[row, prompt[0]] = True
        self._counts[row] = 0
        return self.model.lm_head(hidden).float()

    def _decode(self) -> None:
        n = len(self._rows)
        hidden = self.model.features(self._next_ids[:n, None], self._cache.rows(0, n))[:, 0]
        self._sample(0, self.model.lm_head(hidden).float())

    def _sample(self, start: int, logits: torch.Tensor) -> None:
        """Sample the next token of rows start .. start + len(logits) - 1, send it on, and
        release the requests that ended."""
        stop = start + logits.shape[0]
        if self._sampler is None:
            self._sampler = BatchSampler([r.params for r in self._rows], self.device)
        sampler = self._sampler.rows(start, stop) if (start, stop) != (0, len(self._rows)) else self._sampler
        requests = self._rows[start:stop]
        uniforms = None
        if not sampler.all_greedy:
            uniforms = torch.tensor([0.0 if r.params.greedy else r.rng.random() for r in requests],
                                    device=self.device)
        ids = sampler.sample(logits, self._seen[start:stop], self._counts[start:stop], uniforms)
        self._next_ids[start:stop] = ids
        if sampler.any_repetition or sampler.any_presence_frequency:
            # Only read when a row uses them; rows without penalties may fall behind.
            rows = torch.arange(start, stop, device=self.device)
            self._seen[rows, ids] = True
            self._counts[rows, ids] += 1
        ended = [row for row, (request, token) in enumerate(zip(requests, ids.tolist()), start)
                 if self._emit(request, token)]
        self._release(ended)

    def _emit(self, request: _Request, token: int) -> bool:
        """Send `token`'s delta to the request's stream; True if the request has ended."""
        if token in request.stop_ids:
            text, _ = request.text.finish()
            request.stream._push(Delta(text, [], STOP))
            return True
        request.generated += 1
        text, stopped = request.text.add(token)
        reason = STOP if stopped else None
        if reason is None and request.generated >= request.max_new_tokens:
            rest, stopped = request.text.finish()
            text += rest
            reason = STOP if stopped else LENGTH
        request.stream._push(Delta(text, [token], reason))
        return reason is not None

    def _release(self, rows: list[int]) -> None:
        """Free `rows`, moving the last running rows into the holes (highest first, so the
        row moved is never one being freed)."""
        for row in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if row != last:
                self._cache.copy_row(last, row)
                self._next_ids[row] = self._next_ids[last]
                self._seen[row] = self._seen[last]
                self._counts[row] = self._counts[last]
                self._rows[row] = self._rows[last]
            self._rows.pop()
        if rows:
            self._sampler = None

    def _note_cancellation(self) -> None:
        with self._lock:
            self._cancellations = True
            self._work.notify()

    # ------------------------------------------------------------------ the thread
    @property
    def started(self) -> bool:
        """Whether a scheduler thread is running `step()`."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the scheduler in a background thread: it steps while there is work and sleeps
        on a condition variable otherwise. Does nothing if it already runs."""
        with self._lock:
            if self._stopping:
                raise ScratchLMError("the inference engine was shut down; create a new one")
            if self.started:
                return
            self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._has_work() and not self._stopping:
                        self._work.wait()
                    if not self._has_work():
                        return
                self.step()
        except BaseException as error:  # reported to every client through its stream
            self._fail_all(error)

    def _has_work(self) -> bool:  # with self._lock held
        return bool(self._rows or self._waiting or self._cancellations)

    def _fail_all(self, error: BaseException) -> None:
        """The scheduler died: end every request with the error rather than leave it hanging."""
        with self._lock:
            self._accepting = False
            self._failure = error
            requests = list(self._waiting) + self._rows
            self._waiting.clear()
        self._rows = []
        for request in requests:
            request.stream._fail(error)

    def shutdown(self, drain: bool = True) -> None:
        """Refuse new requests; with `drain`, finish every accepted one (running or waiting),
        else cancel them. Returns when the engine is idle (and its thread has ended)."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            if not drain:
                self._abort = True
                self._cancellations = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            while self.step():
                pass


def _in_passing_thread(function: Callable[[], T]) -> T:
    """`function()` run in a thread of its own that ends right after (its error re-raised).

    Why: on CPU, PyTorch's OpenMP gives each thread that runs a parallel operation a pool of
    worker threads for as long as that thread lives. Once two pools exist with more workers
    than cores (the caller's and the scheduler thread's), OpenMP stops busy-waiting between
    operations and every parallel operation waits for a sleeping worker: decoding in the
    scheduler thread measured 2-3x slower. Loading and allocating here leaves no pool behind
    in the caller's thread, so the scheduler thread's is the only one.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="scratchlm-engine-setup")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
