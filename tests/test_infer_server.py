"""`scratchlm serve`: the OpenAI-compatible server, through the official `openai` client and
raw HTTP, against a real uvicorn server on a free port (in a thread; in a subprocess for the
command itself and SIGTERM). Tiny random-weight models: what is checked is the protocol
(shapes, streaming, usage, finish reasons, errors, auth, limits, disconnects), and that the
text is exactly what the engine generates for the same prompt and sampling."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from scratchlm.cli import main  # noqa: E402
from scratchlm.infer.engine import Engine, SamplingParams  # noqa: E402
from scratchlm.infer.server import API_KEY_ENV, STATIC_DIR, create_app  # noqa: E402
from scratchlm.post.chat import render_prompt  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.tiny_chat import save_tiny_model  # noqa: E402

CONTEXT = 256  # tokens: room for the long replies below, and easily overflowed by a prompt
KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "hello there"}]


def _wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll `condition` until it holds; False if it never does within `timeout` (a bound on a
    hang, not a measure of speed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class _Recording:
    """The engine, with the streams the server submits to it kept for inspection."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.streams = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, prompt_ids, params):
        stream = self.engine.submit(prompt_ids, params)
        self.streams.append((prompt_ids, params, stream))
        return stream


@contextmanager
def _serve(engine, name: str = "tiny", **kwargs):
    """A uvicorn server for create_app(engine, ...) on a free loopback port; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name, **kwargs), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert _wait_until(lambda: server.started), "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "model", chat=True, context_length=CONTEXT)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model", chat=False, context_length=CONTEXT)


@pytest.fixture(scope="module")
def chat_engine(chat_dir):
    engine = Engine.from_directory(chat_dir, device="cpu", max_batch=4)
    engine.start()
    yield _Recording(engine)
    engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def url(chat_engine):
    with _serve(chat_engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


# Seeded sampling is as reproducible as greedy decoding, and the random tiny models do not
# just repeat one token.
SEEDED = {"temperature": 1.0, "seed": 1}


def _seeded(engine, prompt_ids, max_tokens):
    """What the engine itself generates for the prompt with the SEEDED settings."""
    return engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, **SEEDED))


def _healthy(url: str) -> None:
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok"
    assert _wait_until(lambda: httpx.get(f"{url}/health").json()["running"] == 0)


# --------------------------------------------------------------------------- the happy paths
def test_models_and_health(client, url, chat_engine):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "scratchlm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}


def test_chat_answer_is_the_engine_text_with_usage(client, chat_engine):
    response = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=7, **SEEDED)
    prompt_ids = render_prompt(chat_engine.tokenizer, HELLO)
    expected = _seeded(chat_engine, prompt_ids, 7)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == len(prompt_ids) + expected.completion_tokens


def test_chat_stream_joins_to_the_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, **SEEDED)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, **SEEDED,
                                                  stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    # The usage comes alone, in a last chunk without choices; the others carry none.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_finish_reason_length_and_stop(client, chat_engine):
    prompt_ids = render_prompt(chat_engine.tokenizer, HELLO)
    full = _seeded(chat_engine, prompt_ids, 40)
    assert full.finish_reason == "length" and len(full.text) > 5, "the tiny model should ramble"
    response = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, **SEEDED)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 40
    # A stop string seen first at position k: the answer is the text before it.
    k = next(k for k in range(3, len(full.text)) if full.text.find(full.text[k:k + 2]) == k)
    for stream in (False, True):
        response = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, **SEEDED,
                                                  stop=[full.text[k:k + 2], "never written"], stream=stream)
        if stream:
            chunks = list(response)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert (text, finish) == (full.text[:k], "stop")


def test_completions_text_and_token_prompts(client, chat_engine):
    tokenizer = chat_engine.tokenizer
    prompt_ids = [tokenizer.eot_id, *tokenizer.encode_ordinary("the cat")]
    expected = _seeded(chat_engine, prompt_ids, 9)
    by_text = client.completions.create(model="tiny", prompt="the cat", max_tokens=9, **SEEDED)
    by_ids = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=9, **SEEDED)
    for response in (by_text, by_ids):
        assert response.object == "text_completion"
        assert response.choices[0].text == expected.text
        assert response.choices[0].finish_reason == expected.finish_reason
        assert response.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=9, **SEEDED,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_sampling_fields_reach_the_engine(client, chat_engine):
    client.completions.create(model="tiny", prompt="the", max_tokens=3, temperature=0.7, top_p=0.9, seed=5,
                              presence_penalty=0.5, frequency_penalty=0.25, stop="xyz",
                              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    params = chat_engine.streams[-1][1]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (3, 0.7, 0.9, 5)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (20, 0.05, 1.1)
    assert params.stop == ("xyz",)
    # Without max_tokens a reply may fill the rest of the context.
    client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=2)
    assert chat_engine.streams[-1][1].max_tokens == 2
    client.chat.completions.create(model="tiny", messages=HELLO, **SEEDED, stop=["e", "a", "o", " "])
    prompt_ids, params, _ = chat_engine.streams[-1]
    assert params.max_tokens == CONTEXT - len(prompt_ids)


def test_content_parts_and_the_developer_role(client, chat_engine):
    client.chat.completions.create(model="tiny", max_tokens=1, messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}])
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nthere"}]
    assert chat_engine.streams[-1][0] == render_prompt(chat_engine.tokenizer, expected)


def test_a_seed_makes_samples_reproducible(client):
    def sample():
        return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0,
                                              seed=123).choices[0].message.content
    assert sample() == sample()


def test_a_base_model_chats_in_the_plain_format(base_dir):
    engine = Engine.from_directory(base_dir, device="cpu", max_batch=2)
    engine.start()
    try:
        recording = _Recording(engine)
        with _serve(recording, "base") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            response = client.chat.completions.create(model="base", messages=HELLO, max_tokens=12, **SEEDED)
            prompt_ids, params, _ = recording.streams[-1]
            assert engine.tokenizer.decode(prompt_ids) == "<|endoftext|>User: hello there\nAssistant:"
            assert params.stop == ("\nUser:",)
            content = response.choices[0].message.content
            assert content == content.lstrip()  # the space after "Assistant:" is not the reply's
            assert "\nUser:" not in content
            streamed = client.chat.completions.create(model="base", messages=HELLO, max_tokens=12, **SEEDED,
                                                      stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == content
    finally:
        engine.shutdown(drain=False)


def test_the_chat_page_is_served(url):
    if not (STATIC_DIR / "index.html").is_file():
        pytest.skip("the chat page is not installed")
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:href|src)="([\w.-]+\.(?:css|js))"', page.text):
        assert httpx.get(f"{url}/{asset}").status_code == 200, asset


# --------------------------------------------------------------------------- refusals
def _post(url: str, path: str, body, **kwargs) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, (dict, list)) else body  # else bytes, or chunks
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, **kwargs)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
_TOO_LONG = "the cat sat on the mat " * 100  # ~500 tokens against a context of 256
REFUSALS = [
    # (path, body, status, param)
    (CHAT, b'{"messages": [', 400, None),
    (CHAT, b'\xff\xfe not utf-8', 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    (CHAT, [HELLO], 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": ["hi"]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": -5}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": CONTEXT}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": "10"}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": _TOO_LONG}]}, 400, "messages"),
    (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": HELLO, "top_k": 0}, 400, "top_k"),
    (CHAT, {"messages": HELLO, "seed": -1}, 400, "seed"),
    (CHAT, {"messages": HELLO, "stop": ["ok", 3]}, 400, "stop"),
    (CHAT, {"messages": HELLO, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": HELLO, "n": 2}, 400, "n"),
    (CHAT, {"messages": HELLO, "logprobs": True}, 400, "logprobs"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": HELLO, "stream": True, "stream_options": {"include_usage": 1}}, 400, "include_usage"),
    (CHAT, {"messages": HELLO, "model": "gpt-4o"}, 404, "model"),
    (CHAT, {"messages": HELLO, "model": 7}, 400, "model"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, -1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 10**6]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": _TOO_LONG}, 400, "prompt"),
    (COMPLETIONS, {"prompt": list(range(CONTEXT))}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
]


@pytest.mark.parametrize("path, body, status, param", REFUSALS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}-{s}" for i, (p, _, s, _) in enumerate(REFUSALS)])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(url, path, body, status, param):
    response = _post(url, path, body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    if response.status_code == 400:
        assert error["type"] == "invalid_request_error"
    _healthy(url)


def test_the_openai_client_raises_its_own_errors(client, url):
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=0)
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=_TOO_LONG, max_tokens=5)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="one choice"):
        client.chat.completions.create(model="tiny", messages=HELLO, n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny", messages=HELLO, logprobs=True)
    _healthy(url)


def test_bodies_paths_methods_and_hosts_outside_the_api(url, client):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert _post(url, CHAT, huge).status_code == 413

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'
    response = _post(url, COMPLETIONS, chunked())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (2 << 20)}])
    assert caught.value.status_code == 413
    # A form post (what another web site can make a browser send without asking) is refused.
    assert httpx.post(f"{url}{CHAT}", data={"messages": "hi"}).status_code == 415
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert httpx.get(f"{url}{CHAT}").status_code == 405
    assert "error" in httpx.get(f"{url}/v1/nothing").json()
    # DNS rebinding: a page of evil.example that resolves to 127.0.0.1 still names its own host.
    rebound = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    assert httpx.get(f"{url}/v1/models", headers={"Host": "localhost:1234"}).status_code == 200
    _healthy(url)


# --------------------------------------------------------------------------- auth, limits, disconnects
def test_an_api_key_guards_the_api_but_not_health_or_the_page(chat_engine):
    with _serve(chat_engine, api_key=KEY) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code in (200, 404)  # 404 only while the page is not installed
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert _post(url, CHAT, {"messages": HELLO}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens


# A model slowed to under 50 tokens a second, so that a reply is still being written when a
# test acts on it (a client leaving, another request arriving, SIGTERM); its outputs are the
# tiny model's own.
_SLOWDOWN_S = 0.02


def _slowed(features):
    def slow(*args, **kwargs):
        time.sleep(_SLOWDOWN_S)
        return features(*args, **kwargs)
    return slow


LONG = 100  # tokens of a long reply: over two seconds of the slowed model


@pytest.fixture(scope="module")
def long_seed(chat_engine):
    """A seed with which the tiny chat model writes LONG tokens without an end token."""
    prompt_ids = render_prompt(chat_engine.tokenizer, HELLO)
    for seed in range(100):
        params = SamplingParams(max_tokens=LONG, temperature=1.0, seed=seed)
        if chat_engine.generate(prompt_ids, params).finish_reason == "length":
            return seed
    pytest.fail(f"no seed makes the tiny model write {LONG} tokens")


@pytest.fixture(scope="module")
def slow_engine(chat_dir):
    engine = Engine.from_directory(chat_dir, device="cpu", max_batch=4)
    engine.model.features = _slowed(engine.model.features)
    engine.start()
    yield _Recording(engine)
    engine.shutdown(drain=False)


def _long_stream(url: str, http: httpx.Client, seed: int):
    body = {"model": "tiny", "messages": HELLO, "stream": True, "temperature": 1.0, "seed": seed, "max_tokens": LONG}
    return http.stream("POST", f"{url}{CHAT}", json=body, timeout=60)


def test_a_client_leaving_mid_stream_frees_its_slot(slow_engine, long_seed):
    with _serve(slow_engine) as url, httpx.Client() as http:
        with _long_stream(url, http, long_seed) as response:
            lines = response.iter_lines()  # kept: a discarded iterator closes the response
            assert next(line for line in lines if line.startswith("data:"))
            assert _wait_until(lambda: slow_engine.running == 1)
        # leaving the block closed the connection
        _, _, stream = slow_engine.streams[-1]
        assert _wait_until(lambda: stream.finish_reason is not None)
        assert stream.finish_reason == "cancelled" and slow_engine.running == 0
        _healthy(url)


def test_a_client_giving_up_on_a_whole_answer_frees_its_slot(slow_engine, long_seed):
    with _serve(slow_engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            _post(url, CHAT, {"messages": HELLO, "temperature": 1.0, "seed": long_seed, "max_tokens": LONG},
                  timeout=httpx.Timeout(30, read=0.3))
        _, _, stream = slow_engine.streams[-1]
        assert _wait_until(lambda: stream.finish_reason is not None)
        assert stream.finish_reason == "cancelled" and slow_engine.running == 0
        _healthy(url)


def test_requests_beyond_the_limit_are_turned_away(slow_engine, long_seed):
    with _serve(slow_engine, max_concurrent=1) as url, httpx.Client() as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with _long_stream(url, http, long_seed) as response:
            lines = response.iter_lines()  # kept: a discarded iterator closes the response
            next(lines)
            busy = _post(url, CHAT, {"messages": HELLO, "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
            assert httpx.get(f"{url}/health").status_code == 200  # not a generation request
        assert _wait_until(lambda: slow_engine.running == 0)
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices


# --------------------------------------------------------------------------- the command
# `scratchlm serve` with the slowed model (see _slowed): the real command, signals and all.
_SLOW_COMMAND = f"""
import sys, time
from scratchlm.model.transformer import Transformer
features = Transformer.features
def slow(*args, **kwargs):
    time.sleep({_SLOWDOWN_S})
    return features(*args, **kwargs)
Transformer.features = slow
from scratchlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_server(model_dir, *args: str, key: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """`scratchlm serve` (slowed) in a subprocess on a free port: the process, its URL, the
    line announcing it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(API_KEY_ENV, None)
    if key is not None:
        env[API_KEY_ENV] = key
    process = subprocess.Popen([sys.executable, "-c", _SLOW_COMMAND, "serve", str(model_dir), "--port", "0",
                                "--device", "cpu", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=REPO_ROOT)
    for line in process.stderr:
        found = re.search(r"serving \S+ at (http://\S+)", line)
        if found:
            # Keep draining stderr (uvicorn's log) so the server never blocks on a full pipe.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1), line
    process.wait()
    raise AssertionError(f"the server did not start (exit {process.returncode})")


@pytest.mark.slow
def test_sigterm_lets_the_streams_in_flight_finish_then_exits(chat_dir, long_seed):
    process, url, _ = _start_server(chat_dir, "--model-name", "tiny", "--max-batch", "2")
    try:
        with httpx.Client() as http, _long_stream(url, http, long_seed) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            events = [line[len("data: "):] for line in lines if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert len(content) > LONG // 2  # LONG tokens, nearly all written after the signal
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(f"{url}/health")
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_the_command_takes_the_key_from_the_environment(chat_dir):
    process, url, line = _start_server(chat_dir, key="from-env")
    try:
        assert "API key required" in line
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert models["data"][0]["id"] == "model"  # the directory's name
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_the_command_refuses_bad_input_in_one_line(tmp_path, chat_dir, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(chat_dir):
        (corrupt / name).write_bytes((chat_dir / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not weights")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = {
        "missing": [str(tmp_path / "nowhere"), "--port", "0"],
        "corrupt": [str(corrupt), "--port", "0"],
        "port in use": [str(chat_dir), "--port", str(taken.getsockname()[1])],
        "max batch": [str(chat_dir), "--port", "0", "--max-batch", "0"],
        "empty key": [str(chat_dir), "--port", "0", "--api-key", ""],
        "bad host": [str(chat_dir), "--port", "0", "--host", "no-such-host.invalid"],
    }
    try:
        for case, args in cases.items():
            assert main(["serve", *args, "--device", "cpu"]) == 1, case
            err = capsys.readouterr().err
            assert err.startswith("scratchlm: error: ") and err.count("\n") == 1, (case, err)
    finally:
        taken.close()
