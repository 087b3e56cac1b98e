"""Inference engine speed: batch-1 decoding against Hugging Face, batching gains, latency.

    .venv/bin/python benchmarks/bench_infer.py [--threads 2] [--new-tokens 128] [--rounds 10]

On the `small` preset (15.7M parameters, vocab 8192, context 512) with random weights (speed
does not depend on what the weights learnt), everything measured in the same run:

(a) batch-1 greedy decoding, tokens/s: `Engine.generate` against transformers'
    `generate` on the same weights (exported with `export_hf`, loaded with
    AutoModelForCausalLM), same prompt, same number of new tokens, KV cache on both,
    timed in alternating rounds so a load change on a shared machine hits both; the
    generated ids are compared too (they agree up to the first near-tie of the random
    weights, where float rounding may choose differently).
    Throughputs are the best of the rounds (on a machine shared with other jobs, the fastest
    round is the least disturbed); ratios are the median of the ratios within each round.
(b) aggregate tokens/s of 32 concurrent requests (sampled at temperature 0.8, each with its
    own seed and a prompt of its own length, 7 to 37 tokens) against one request alone (a
    prompt of their mean length), prefill included.
(c) latency seen by clients of the started engine (its scheduler thread, as in a server;
    one client thread per request): time to first token and the time between tokens, p50
    and p99, for one request alone and for 32 submitted at once.

Prints a markdown table and the load average (other jobs on the machine slow everything).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from scratchlm.infer.engine import Engine, SamplingParams
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import save_model
from scratchlm.tokenizer import Tokenizer

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpora"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


def build_model(work: Path) -> tuple[Path, Path]:
    """A `small` model directory (tokenizer trained on the shared corpora, random weights)
    and its Hugging Face export."""
    from scratchlm.export import export_hf

    tokenizer = Tokenizer.train([str(CORPORA / "tinystories_valid_head.txt"),
                                 str(CORPORA / "wiki_demo.txt")], 8192)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("small", vocab_size=tokenizer.vocab_size))
    model_dir = save_model(work / "model", model, tokenizer)
    return model_dir, export_hf(model_dir, work / "hf")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of the ratio of two runs made back to back: other jobs slow both
    runs of a round alike, so the ratio varies less than either figure."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


# --------------------------------------------------------------------------- (a)
def bench_batch1(engine: Engine, hf_dir: Path, prompt: list[int], new_tokens: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    hf_prompt = torch.tensor([prompt])

    def ours() -> list[int]:
        return engine.generate(prompt, params).token_ids

    def theirs() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(hf_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    outputs = {}
    for name, run in (("ours", ours), ("hf", theirs)):
        outputs[name] = run()  # warm-up
    for _ in range(rounds):
        for name, run in (("ours", ours), ("hf", theirs)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    agree = next((i for i, (a, b) in enumerate(zip(outputs["ours"], outputs["hf"])) if a != b),
                 min(len(outputs["ours"]), len(outputs["hf"])))
    return {
        "ours": len(outputs["ours"]) / min(times["ours"]),
        "hf": len(outputs["hf"]) / min(times["hf"]),
        "ratio": paired_ratio(times["hf"], times["ours"]),
        "agree": agree, "ours_tokens": len(outputs["ours"]), "hf_tokens": len(outputs["hf"]),
    }


# --------------------------------------------------------------------------- (b)
def request_prompts(tokenizer: Tokenizer, count: int) -> tuple[list[list[int]], list[int]]:
    """`count` prompts of TinyStories text, 7 to 37 tokens long, and one more of their mean
    length (22 tokens) for the request alone: both sides prefill the same work per request."""
    ids = tokenizer.encode((CORPORA / "tinystories_valid_head.txt").read_text()[:50_000])
    prompts = [ids[i * 97: i * 97 + 7 + 2 * (i % 16)] for i in range(count)]
    return prompts, ids[count * 97: count * 97 + 22]


def run_to_end(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """Generated tokens and seconds for all `prompts` submitted at once, driven by step()."""
    streams = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i))
               for i, p in enumerate(prompts)]
    start = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - start
    return sum(s.completion_tokens for s in streams), seconds


def bench_concurrency(engine: Engine, prompts: list[list[int]], alone: list[int], new_tokens: int,
                      rounds: int) -> dict:
    rates: dict[str, list[float]] = {"one": [], "many": []}
    run_to_end(engine, [alone], 8)  # warm-up
    for _ in range(rounds):
        for name, batch in (("one", [alone]), ("many", prompts)):
            tokens, seconds = run_to_end(engine, batch, new_tokens)
            rates[name].append(tokens / seconds)
    return {"one": max(rates["one"]), "many": max(rates["many"]),
            "ratio": paired_ratio(rates["many"], rates["one"])}


# --------------------------------------------------------------------------- (c)
def bench_latency(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """TTFT and inter-token gaps (seconds) as seen by one client thread per request."""
    first: list[float] = []
    gaps: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(len(prompts))

    def client(i: int, prompt: list[int]) -> None:
        go.wait()
        submitted = time.perf_counter()
        stream = engine.submit(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i))
        stamps = [time.perf_counter() for delta in stream if delta.token_ids]
        with lock:
            first.append(stamps[0] - submitted)
            gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ttft_p50": percentile(first, 50), "ttft_p99": percentile(first, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--streams", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scratchlm-bench-infer-") as work:
        # Built in a thread that then ends, and (c) measured first: the scheduler thread must
        # be the only thread with an OpenMP worker pool, as in a server (see engine.py,
        # _in_passing_thread); (a) and (b) then run in this thread.
        built: list[tuple[Path, Path]] = []
        builder = threading.Thread(target=lambda: built.append(build_model(Path(work))))
        builder.start()
        builder.join()
        model_dir, hf_dir = built[0]
        served = Engine.from_directory(model_dir, device="cpu", max_batch=args.streams)
        prompts, alone = request_prompts(served.tokenizer, args.streams)
        served.start()
        c_one = bench_latency(served, [alone], args.new_tokens)
        c_many = bench_latency(served, prompts, args.new_tokens)
        served.shutdown()
        engine = Engine.from_directory(model_dir, device="cpu", max_batch=args.streams)
        a = bench_batch1(engine, hf_dir, engine.tokenizer.encode(PROMPT), args.new_tokens, args.rounds)
        b = bench_concurrency(engine, prompts, alone, args.new_tokens, args.rounds)
    load_after = os.getloadavg()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, `small` preset, "
          f"{args.new_tokens} new tokens per request; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min)")
    print(f"(a) greedy ids: ours {a['ours_tokens']}, transformers {a['hf_tokens']}, "
          f"identical for the first {a['agree']}")
    print()
    print("| measurement | scratchlm engine | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| (a) batch-1 greedy decode, tok/s | {a['ours']:,.1f} | transformers generate {a['hf']:,.1f} "
          f"| {a['ratio']:.2f}x |")
    print(f"| (b) {args.streams} concurrent requests, aggregate tok/s | {b['many']:,.1f} | one request "
          f"{b['one']:,.1f} | {b['ratio']:.2f}x |")
    for label, c in (("1 request", c_one), (f"{args.streams} at once", c_many)):
        print(f"| (c) {label}: time to first token p50 / p99 | {c['ttft_p50'] * 1e3:,.1f} / "
              f"{c['ttft_p99'] * 1e3:,.1f} ms | | |")
        print(f"| (c) {label}: inter-token latency p50 / p99 | {c['itl_p50'] * 1e3:,.1f} / "
              f"{c['itl_p99'] * 1e3:,.1f} ms | | |")


if __name__ == "__main__":
    main()
