"""Load test of `scratchlm serve` on loopback: concurrency, disconnects, leaks.

    .venv/bin/python benchmarks/bench_serve.py [--model-dir DIR] [--clients 32] [--rounds 4]
        [--churn-requests 200] [--disconnect-fraction 0.2] [--max-tokens 64] [--time-limit 600]

The server is the real command (`python -m scratchlm serve`, its own process, so its memory is
its own), on a free port; without --model-dir it serves a small random-weight chat model
(only the serving machinery is measured, not what the model says). Two phases:

1. steady: --clients concurrent clients each stream --rounds chat completions one after the
   other; every one must end in a finish reason and [DONE] (errors: anything else).
2. churn: --churn-requests streamed chat completions, --clients at a time, of which every
   1/--disconnect-fraction-th client hangs up after its first token. Afterwards /health
   must report no request running or waiting (a leaked slot would stay "running"), and the
   server's resident memory may grow by less than 10% over the phase.

Prints a markdown table; exits non-zero when a check fails. Every request and the whole run
are bounded in time (--time-limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox who found a key."}]


def make_model(directory: Path) -> Path:
    """A random-weight 4-layer chat model (context 512) with a tokenizer learnt on a paragraph."""
    import torch

    from scratchlm.model import ModelConfig, Transformer
    from scratchlm.model.directory import save_model
    from scratchlm.post.chat import add_chat_tokens
    from scratchlm.tokenizer import Tokenizer, train_bpe

    text = ("once upon a time a fox found a key under an old oak tree and wondered which door it opened "
            "so she asked the owl the crow and the river and each told her a different story ") * 8
    tokenizer = Tokenizer(*train_bpe([text], 512), ["<|endoftext|>"])
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=512, d_model=128,
                                     n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384)
    model, tokenizer = add_chat_tokens(Transformer(config), tokenizer)
    return save_model(directory / "bench-model", model, tokenizer)


def start_server(model_dir: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("SCRATCHLM_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", str(model_dir), "--port", "0",
                                "--max-batch", str(max_batch), "--model-name", "bench"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in process.stderr:
        found = re.search(r"serving \S+ at (http://\S+)", line)
        if found:
            # Drain the rest (uvicorn's log) so the server never blocks on a full pipe.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1)
        print(line, end="", file=sys.stderr)
    sys.exit(f"the server did not start (exit {process.wait()})")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@dataclass
class Tally:
    ok: int = 0
    disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    first_token_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)


async def one_request(http: httpx.AsyncClient, url: str, max_tokens: int, tally: Tally, hang_up: bool) -> None:
    """One streamed chat completion; with `hang_up`, close the connection after the first token."""
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    finish = usage = None
    done = seen_token = False
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                tally.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    tally.errors.append(f"error event: {chunk['error']['message']}")
                    return
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    if not seen_token:
                        seen_token = True
                        tally.first_token_s.append(time.perf_counter() - start)
                    if hang_up:
                        tally.disconnected += 1
                        return  # leaving the block closes the connection mid-stream
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    finish = chunk["choices"][0]["finish_reason"]
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not (done and finish in ("stop", "length") and usage):
        tally.errors.append(f"incomplete stream (finish={finish}, done={done}, usage={usage})")
        return
    tally.ok += 1
    tally.tokens += usage["completion_tokens"]
    tally.total_s.append(time.perf_counter() - start)


async def steady(url: str, clients: int, rounds: int, max_tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def client() -> None:
            for _ in range(rounds):
                await one_request(http, url, max_tokens, tally, hang_up=False)
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - start


async def churn(url: str, clients: int, requests: int, disconnect_fraction: float,
                max_tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    every = round(1 / disconnect_fraction) if disconnect_fraction > 0 else 0
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def client() -> None:
            while queue:
                i = queue.pop()
                await one_request(http, url, max_tokens, tally, hang_up=bool(every) and i % every == 0)
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - start


def settle(url: str, timeout: float = 30) -> dict:
    """/health once nothing is running or waiting, or after `timeout` (then something leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else \
        (values[0] if values else float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="model to serve (default: a small random one)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client in the steady phase")
    parser.add_argument("--churn-requests", type=int, default=200, help="requests in the churn phase")
    parser.add_argument("--disconnect-fraction", type=float, default=0.2, help="share of churn clients that hang up")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply at most")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run at most")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model(Path(tmp))
        process, url = start_server(model_dir, args.max_batch, args.threads)
        try:
            async def both():
                steady_result = await steady(url, args.clients, args.rounds, args.max_tokens)
                after_steady = settle(url)
                rss_before = rss_mb(process.pid)
                churn_result = await churn(url, args.clients, args.churn_requests, args.disconnect_fraction,
                                           args.max_tokens)
                return steady_result, after_steady, rss_before, churn_result
            (steady_tally, steady_s), after_steady, rss_before, (churn_tally, churn_s) = asyncio.run(
                asyncio.wait_for(both(), args.time_limit))
            health = settle(url)
            rss_after = rss_mb(process.pid)
        finally:
            process.terminate()
            exit_code = process.wait(timeout=60)

    growth = (rss_after - rss_before) / rss_before
    leaked = health["running"] + health["waiting"]
    print(f"\nscratchlm serve load test: {args.clients} concurrent streaming clients, max_tokens "
          f"{args.max_tokens}, --max-batch {args.max_batch}, {args.threads} server threads, "
          f"model {model_dir if args.model_dir else 'random 4-layer d128 (context 512)'}\n")
    print("| phase | requests | completed | hung up | errors | wall s | req/s | tokens/s (completed) | "
          "first token p50 / p95 s | latency p50 / p95 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, tally, seconds, total in (("steady", steady_tally, steady_s, args.clients * args.rounds),
                                        ("churn", churn_tally, churn_s, args.churn_requests)):
        print(f"| {name} | {total} | {tally.ok} | {tally.disconnected} | {len(tally.errors)} | {seconds:.1f} | "
              f"{total / seconds:.1f} | {tally.tokens / seconds:.0f} | "
              f"{percentile(tally.first_token_s, 50):.3f} / {percentile(tally.first_token_s, 95):.3f} | "
              f"{percentile(tally.total_s, 50):.2f} / {percentile(tally.total_s, 95):.2f} |")
    print("\n| check | value | pass |\n|---|---|---|")
    checks = [
        ("errors (both phases)", len(steady_tally.errors) + len(churn_tally.errors),
         not steady_tally.errors and not churn_tally.errors),
        ("slots after the steady phase (running + waiting)", after_steady["running"] + after_steady["waiting"],
         after_steady["running"] + after_steady["waiting"] == 0),
        ("slots after the churn phase (running + waiting)", leaked, leaked == 0),
        ("server RSS before / after churn (MB)", f"{rss_before:.0f} / {rss_after:.0f} ({growth:+.1%})",
         growth < 0.10),
        ("server exit code after SIGTERM", exit_code, exit_code == 0),
    ]
    for name, value, passed in checks:
        print(f"| {name} | {value} | {'yes' if passed else 'NO'} |")
    for error in (steady_tally.errors + churn_tally.errors)[:5]:
        print(f"error: {error}", file=sys.stderr)
    return 0 if all(passed for _, _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
