"""`scratchlm serve`: the inference engine behind an OpenAI-compatible HTTP API, and the chat page.

Endpoints (the request and response shapes are OpenAI's, so its clients work unchanged):

    GET  /v1/models, /v1/models/{id}   the one model served
    POST /v1/completions               continue a prompt (text, or token ids)
    POST /v1/chat/completions          answer a conversation (rendered by scratchlm.post.chat)
    GET  /health                       {"status", "model", "running", "waiting"}; never needs the key
    GET  /                             the chat page (infer/static/), which needs no key to load

Both generation endpoints answer at once (`"stream": false`) or as server-sent events
(`data: {chunk}` ... `data: [DONE]`), with `usage` in the answer, or in a last chunk when
`stream_options.include_usage` is set. Sampling fields: temperature, top_p, max_tokens (or
max_completion_tokens), stop (a string or a list), seed, presence_penalty, frequency_penalty,
and the extensions top_k, min_p and repetition_penalty. Without max_tokens a reply may fill
the rest of the context; a prompt plus max_tokens beyond the context is refused, as OpenAI
does, rather than cut short silently. `n` must be 1, and features the engine does not have
(log-probabilities, tools, logit bias, echo...) are refused when asked for, never ignored;
fields that change nothing about the answer (user, metadata...) are ignored. `model` may be
left out (there is one); naming another model is a 404.

Every refusal is a 4xx with OpenAI's error object `{"error": {"message", "type", "param",
"code"}}`, so clients raise their usual exceptions. The bounds that keep one client from
exhausting the server: a body of at most `max_body_bytes`; at most `max_concurrent`
generation requests in flight (the engine decodes `max_batch` of them at a time, the rest
wait in its queue), beyond which a 503 with Retry-After says to come back; a client that goes
away (mid-stream or while waiting for a whole answer) has its request cancelled at once, so
its engine slot decodes for nobody.

Security. The server listens on 127.0.0.1 unless told otherwise. With an API key every
/v1 endpoint needs `Authorization: Bearer KEY` (compared in constant time); /health and the
page's static files stay open (they hold nothing secret: the page asks for the key and sends
it with its API calls). POST bodies must be `application/json`, which a web page on another
site cannot send here without a CORS preflight that this server never grants; and while the
server listens on a loopback address it answers only requests addressed to a loopback name
(the Host header), which defeats DNS rebinding, the trick that lets a web page address
127.0.0.1 under its own domain.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish, then
stops the engine and returns; a second Ctrl-C abandons the requests still running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable

from scratchlm.errors import ScratchLMError

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.staticfiles import StaticFiles
except ImportError as _missing:
    raise ScratchLMError(f"scratchlm serve needs {_missing.name}: pip install 'scratchlm[serve]'") from None

from scratchlm.post.chat import PLAIN, chat_format, render_prompt, stop_strings

if TYPE_CHECKING:
    from scratchlm.infer.engine import Engine, SamplingParams, Stream
    from scratchlm.tokenizer import Tokenizer

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: about 250k tokens of text, beyond any context served here
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
API_KEY_ENV = "SCRATCHLM_API_KEY"

log = logging.getLogger("scratchlm.serve")


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A refusal, sent as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(error.message, error.kind, error.param, error.code), error.status,
                        headers=error.headers)


# --------------------------------------------------------------------------- reading requests
_KINDS: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "array": (list,), "object": (dict,)}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for name, types in _KINDS.items():
        if isinstance(value, types) and (name == "boolean") == isinstance(value, bool):
            return name
    return type(value).__name__


class _Fields:
    """The request's JSON object, read field by field: a value of the wrong type is a 400
    naming the field. A null counts as absent, as it does for OpenAI."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def get(self, name: str, *kinds: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int in Python, but true is no number of tokens.
        if not any(isinstance(value, _KINDS[k]) and (k == "boolean") == isinstance(value, bool) for k in kinds):
            expected = " or ".join(f"a{'n' if k[0] in 'aio' else ''} {k}" for k in kinds)
            raise ApiError(400, f"{name}: expected {expected}, got {_json_type(value)}", param=name)
        return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number in JSON")


async def _read_json(request: Request, limit: int) -> _Fields:
    """The body as a JSON object, refused when it is not JSON, not an object or too big.
    The size is checked against Content-Length before reading and again while reading (a
    chunked body has no length), so an oversized body is never held in memory whole."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"expected a JSON body (Content-Type: application/json), got "
                            f"{media_type or 'no Content-Type'}", code="unsupported_media_type")
    too_big = ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(data)}")
    return _Fields(data)


# Fields of OpenAI's API that ask for something this server cannot give, with the values that
# ask for nothing. Anything else in them is refused: an answer without what was asked for
# would look like a bug in the client.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
}


def _refuse_unsupported(fields: _Fields, names: Iterable[str]) -> None:
    for name in names:
        value = fields.data.get(name)
        if value is not None and not _UNSUPPORTED[name](value):
            raise ApiError(400, f"{name}: not supported by this server (only the default is)", param=name,
                           code="unsupported_parameter")


# --------------------------------------------------------------------------- the app
@dataclass
class _Gate:
    """Counts the generation requests in flight and turns away those beyond the limit.
    Only the event loop's thread touches it, so a plain counter is safe."""

    limit: int
    active: int = 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise ApiError(503, f"the server is busy ({self.limit} requests in flight); retry shortly",
                           kind="server_error", code="server_busy", headers={"Retry-After": "1"})
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class _EventStream(StreamingResponse):
    """Server-sent events of one engine stream. However the response ends (the last event
    sent, the client gone, which makes Starlette cancel the sending, or the server stopping),
    the engine stream is cancelled, a no-op once it has finished, and the request's place
    given back: no slot keeps decoding for a client that is not there."""

    def __init__(self, events: AsyncIterator[str], stream: Stream, on_close: Callable[[], None]) -> None:
        # No caching or proxy buffering of the events (nginx honours X-Accel-Buffering).
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream, self._on_close = stream, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()
            self._on_close()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _host_name(host_header: str) -> str:
    """"[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0].lower()
    return host_header.partition(":")[0].lower()


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_concurrent: int | None = None,
               allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as the model `model_name`.

    `api_key`: required as a bearer token on /v1 when given. `max_concurrent`: generation
    requests in flight at most (default 4 x the engine's batch). `allowed_hosts`: the host
    names requests may be addressed to (None: any; the default suits a server on loopback).
    """
    if max_concurrent is None:
        max_concurrent = 4 * engine.max_batch
    if max_concurrent < 1:
        raise ScratchLMError(f"max concurrent requests must be at least 1, got {max_concurrent}")
    tokenizer = engine.tokenizer
    context_length = engine.context_length
    fmt = chat_format(tokenizer)
    created = int(time.time())
    gate = _Gate(max_concurrent)
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
    key = api_key.encode() if api_key else None

    def check_host(request: Request) -> None:
        if hosts is not None and _host_name(request.headers.get("host", "")) not in hosts:
            raise ApiError(400, "this server answers only requests addressed to "
                                f"{', '.join(sorted(hosts))} (Host header)", code="invalid_host")

    def authorize(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long whatever prefix matches: the key cannot be guessed byte by byte.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="scratchlm", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check_host)])
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Unknown paths and methods (and the static files' own 404) in OpenAI's shape too.
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(ApiError(error.status_code, f"{error.detail}: {request.method} {request.url.path}",
                                        code=code, headers=error.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the client's fault: logged with its traceback (Starlette re-raises it
        # to the server's log), answered in the shape clients understand.
        return JSONResponse(_error_body("internal server error", "server_error"), 500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "running": engine.running, "waiting": engine.waiting}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "scratchlm",
                "context_length": context_length}

    @api.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise _unknown_model(model_id, model_name)
        return model_card()

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        fields = await _read_json(request, max_body_bytes)
        _check_model(fields, model_name)
        _refuse_unsupported(fields, ("echo", "suffix", "best_of", "logprobs", "logit_bias"))
        prompt_ids = _completion_prompt(fields, tokenizer)
        params = _sampling_params(fields, context_length, len(prompt_ids), "prompt")
        return await _answer(request, fields, prompt_ids, params, _CompletionShape(model_name))

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        fields = await _read_json(request, max_body_bytes)
        _check_model(fields, model_name)
        _refuse_unsupported(fields, ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "tool_choice",
                                     "function_call", "response_format", "modalities", "audio"))
        try:
            prompt_ids = render_prompt(tokenizer, _chat_messages(fields))
        except ScratchLMError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        # The engine ends every reply at <|endoftext|> (and <|im_end|> in ChatML); the plain
        # format also ends where the model starts writing the user's next turn.
        params = _sampling_params(fields, context_length, len(prompt_ids), "messages",
                                  stop=tuple(stop_strings(tokenizer)))
        # The plain format ends the prompt with "Assistant:" and the model writes the space.
        return await _answer(request, fields, prompt_ids, params,
                             _ChatShape(model_name, strip_leading_space=fmt == PLAIN))

    async def _answer(request: Request, fields: _Fields, prompt_ids: list[int], params: SamplingParams,
                      shape: _CompletionShape) -> Response:
        streaming = fields.get("stream", "boolean", default=False)
        options = _Fields(fields.get("stream_options", "object", default={}))
        include_usage = options.get("include_usage", "boolean", default=False)
        gate.enter()
        try:
            stream = engine.submit(prompt_ids, params)
        except ScratchLMError as exc:
            gate.leave()
            raise ApiError(400, str(exc)) from None
        except BaseException:
            gate.leave()
            raise
        if streaming:
            return _EventStream(shape.events(stream, include_usage), stream, gate.leave)
        watcher = asyncio.ensure_future(_cancel_when_gone(request, stream))
        try:
            text, finish_reason = await shape.collect(stream)
        finally:
            watcher.cancel()
            stream.cancel()
            gate.leave()
        return JSONResponse(shape.whole(text, finish_reason, _usage(stream)))

    app.include_router(api)
    # The page's files sit side by side in one folder, so each is one path segment: no /v1
    # path can land here (GET on a POST endpoint stays a 405). The folder is looked up per
    # request, so an app without the page still serves the API.
    page = StaticFiles(directory=STATIC_DIR, check_dir=False)

    @app.get("/")
    async def index(request: Request) -> Response:
        return await page.get_response("index.html", request.scope)

    @app.get("/{asset}")
    async def asset(asset: str, request: Request) -> Response:
        return await page.get_response(asset, request.scope)

    return app


async def _cancel_when_gone(request: Request, stream: Stream) -> None:
    """Cancel `stream` when the client disconnects before its answer is ready (the body has
    been read, so the next message the server has for us is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


def _unknown_model(name: str, served: str) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist (this server serves {served!r})",
                    param="model", code="model_not_found")


def _check_model(fields: _Fields, served: str) -> None:
    """A request names the model served, or none: with one model there is nothing to choose
    (as vLLM and llama.cpp's server allow); naming another is a 404, as OpenAI answers."""
    name = fields.get("model", "string")
    if name is not None and name != served:
        raise _unknown_model(name, served)


def _completion_prompt(fields: _Fields, tokenizer: Tokenizer) -> list[int]:
    """The prompt's ids: text starts a new document (after <|endoftext|>, as in training and
    `scratchlm generate`); token ids are taken as they are. One prompt per request."""
    prompt = fields.get("prompt", "string", "array")
    if prompt is None:
        raise ApiError(400, "prompt: missing", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode_ordinary(prompt)
        if tokenizer.eot_id is not None:
            ids = [tokenizer.eot_id, *ids]
    else:
        ids = prompt
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size for i in ids):
            raise ApiError(400, f"prompt: expected text or token ids between 0 and {tokenizer.vocab_size - 1}",
                           param="prompt")
    if not ids:
        raise ApiError(400, "prompt: empty (and the tokenizer has no <|endoftext|> to start from)", param="prompt")
    return ids


def _chat_messages(fields: _Fields) -> list[dict[str, str]]:
    """The messages as role/content pairs for `render_prompt`, which checks the roles and the
    order. Content may also be OpenAI's list of parts, of which only text parts are possible."""
    messages = fields.get("messages", "array")
    if messages is None:
        raise ApiError(400, "messages: missing", param="messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: expected an object with role and content, got {_json_type(message)}",
                           param="messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise ApiError(400, f"{where}.role: expected a string, got {_json_type(role)}", param="messages")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"{where}.content: only text parts are supported", param="messages")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string, got {_json_type(content)}", param="messages")
        # OpenAI's newer name for the system role.
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return result


def _sampling_params(fields: _Fields, context_length: int, prompt_tokens: int, prompt_field: str, *,
                     stop: tuple[str, ...] = ()) -> SamplingParams:
    """The request's sampling fields as engine parameters, checked against the context."""
    from scratchlm.infer.engine import SamplingParams

    n = fields.get("n", "integer", default=1)
    if n != 1:
        raise ApiError(400, f"n: only one choice per request is supported, got {n}", param="n")
    max_tokens_field = "max_completion_tokens" if fields.data.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = fields.get(max_tokens_field, "integer")
    room = context_length - prompt_tokens
    if room < 1:
        raise ApiError(400, f"{prompt_field}: {prompt_tokens} tokens, which leaves no room for a reply in the "
                            f"model's context of {context_length} tokens", param=prompt_field,
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"{max_tokens_field}: {max_tokens} tokens requested but the model's context of "
                            f"{context_length} tokens leaves {room} after the {prompt_tokens} of the "
                            f"{prompt_field}", param=max_tokens_field, code="context_length_exceeded")
    user_stop = fields.get("stop", "string", "array", default=[])
    user_stop = [user_stop] if isinstance(user_stop, str) else user_stop
    if not all(isinstance(s, str) and s for s in user_stop):
        raise ApiError(400, "stop: expected a non-empty string or a list of them", param="stop")
    params = SamplingParams(
        max_tokens=room if max_tokens is None else max_tokens,
        temperature=fields.get("temperature", "number", default=1.0),
        top_k=fields.get("top_k", "integer"),
        top_p=fields.get("top_p", "number"),
        min_p=fields.get("min_p", "number"),
        repetition_penalty=fields.get("repetition_penalty", "number", default=1.0),
        presence_penalty=fields.get("presence_penalty", "number", default=0.0),
        frequency_penalty=fields.get("frequency_penalty", "number", default=0.0),
        stop=tuple(user_stop) + stop,
        seed=fields.get("seed", "integer"),
    )
    try:
        params.check(context_length=context_length)
    except ScratchLMError as exc:
        # The engine's message starts with the field's name; the client may have used the other one.
        message = str(exc)
        param = next((name for name in _PARAM_NAMES if message.startswith(name)), None)
        if param == "max_tokens":
            param, message = max_tokens_field, max_tokens_field + message[len(param):]
        raise ApiError(400, message, param=param) from None
    return params


_PARAM_NAMES = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "stop", "seed")


def _usage(stream: Stream) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


# --------------------------------------------------------------------------- response shapes
class _CompletionShape:
    """The objects of /v1/completions: one answer, or chunks of it."""

    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "system_fingerprint": None, "choices": choices, "usage": usage}

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict:
        return self.choice(text, finish_reason)

    def whole(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        return self._envelope(self.object_whole, [self.choice(text, finish_reason)], usage)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return self._envelope(self.object_chunk, choices, usage)

    def texts(self, stream: Stream) -> AsyncIterator[tuple[str, str | None]]:
        return _texts(stream)

    async def collect(self, stream: Stream) -> tuple[str, str | None]:
        parts, finish_reason = [], None
        async for text, finish_reason in self.texts(stream):
            parts.append(text)
        return "".join(parts), finish_reason

    def first_chunks(self) -> list[dict]:
        return []

    async def events(self, stream: Stream, include_usage: bool) -> AsyncIterator[str]:
        """The SSE events: the text as it comes, the finish reason in the last chunk, then the
        usage when asked for, then [DONE]. An engine failure mid-stream is reported as an
        error event (OpenAI's clients raise it) rather than a stream that just stops."""
        try:
            for chunk in self.first_chunks():
                yield _sse(chunk)
            async for text, finish_reason in self.texts(stream):
                yield _sse(self.chunk([self.delta_choice(text, finish_reason)]))
        except Exception:
            log.exception("generation failed mid-stream")
            yield _sse(_error_body("generation failed; see the server's log", "server_error"))
            return
        if include_usage:
            yield _sse(self.chunk([], _usage(stream)))
        yield _sse("[DONE]")


async def _texts(stream: Stream) -> AsyncIterator[tuple[str, str | None]]:
    """(text, finish_reason) of each engine delta worth sending: text, or the end."""
    async for delta in stream:
        if delta.text or delta.finish_reason is not None:
            yield delta.text, delta.finish_reason


class _ChatShape(_CompletionShape):
    """The objects of /v1/chat/completions: a message, or deltas of one (the first names the
    role, the last carries only the finish reason)."""

    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model_name: str, strip_leading_space: bool) -> None:
        super().__init__(model_name)
        self.strip_leading_space = strip_leading_space

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def first_chunks(self) -> list[dict]:
        return [self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])]

    async def texts(self, stream: Stream) -> AsyncIterator[tuple[str, str | None]]:
        started = not self.strip_leading_space
        async for text, finish_reason in _texts(stream):
            if not started:
                text = text.lstrip()
                started = bool(text)
                if not text and finish_reason is None:
                    continue
            yield text, finish_reason


# --------------------------------------------------------------------------- the command
def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, made before the model is loaded: a port in use fails in a moment."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ScratchLMError(f"--host {host}: cannot listen there ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server take its port back from connections still closing (TIME_WAIT);
        # on Linux it does not let two servers share a port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ScratchLMError(f"cannot listen on {host} port {port}: {exc.strerror}"
                             + (" (another server? choose one with --port)" if port else "")) from None
    return sock


def _is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_NAMES or host.startswith("127.")


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, max_concurrent: int | None = None, model_name: str | None = None,
          device: str = "auto") -> None:
    """Serve the model in `model_dir` until SIGTERM or Ctrl-C (what `scratchlm serve` runs;
    call it from the main thread). `api_key` defaults to $SCRATCHLM_API_KEY; `model_name` to
    the directory's name; `max_concurrent` to 4 x max_batch. Port 0 picks a free port (the
    address is printed). Bad options, a port in use and a model directory that will not load
    raise ScratchLMError before anything is served."""
    from scratchlm.infer.engine import Engine

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise ScratchLMError("--api-key: empty")
    if max_batch < 1:
        raise ScratchLMError(f"--max-batch must be at least 1, got {max_batch}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ScratchLMError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    if not 0 <= port <= 65535:
        raise ScratchLMError(f"--port must be between 0 and 65535, got {port}")
    model_name = model_name or Path(model_dir).resolve().name
    sock = _listen(host, port)
    try:
        engine = Engine.from_directory(model_dir, device=device, max_batch=max_batch)
        app = create_app(engine, model_name, api_key=api_key, max_concurrent=max_concurrent,
                         allowed_hosts=LOOPBACK_NAMES if _is_loopback(host) else None)
        limit = max_concurrent or 4 * max_batch
        # uvicorn's own bound on connections and tasks (it answers a plain 503 beyond it): a
        # backstop against floods of idle connections; the app's limit, which answers in
        # OpenAI's shape, is reached first.
        config = uvicorn.Config(app, limit_concurrency=2 * limit + 16, timeout_graceful_shutdown=None)
        server = uvicorn.Server(config)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"scratchlm: serving {model_name} at http://{shown}:{bound_port} (API /v1, chat page /"
              f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
        if not _is_loopback(host) and api_key is None:
            print(f"scratchlm: warning: listening on {host} without an API key: anyone who can reach this "
                  f"machine can use the model (--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        engine.start()
        # uvicorn re-raises the SIGTERM it handled once it has drained, to exit as the signal
        # would have. A handler of ours receives it instead, so the engine is stopped below and
        # the command exits 0: a requested, clean shutdown.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            engine.shutdown(drain=True)
    finally:
        sock.close()
