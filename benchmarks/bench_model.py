"""Model speed: training throughput (forward + backward) and KV-cached decoding.

    .venv/bin/python benchmarks/bench_model.py [--presets tiny small] [--rounds 3] [--threads 1]

CPU: tokens/s of forward+backward for each preset, eager vs torch.compile, timed in
alternating rounds so both see the same machine load; the compile ratio is the result.
Decoding: tokens/s of greedy generation with the KV cache vs recomputing the whole prefix
for every new token (the no-cache baseline).
GPU (only when CUDA is available): gpt2-124m at context 1024 in bf16, tokens/s and MFU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scratchlm.model import ModelConfig, Transformer, peak_flops_for_device


def train_step_seconds(model: torch.nn.Module, idx: torch.Tensor, steps: int,
                       autocast: bool = False) -> float:
    """Seconds per forward+backward step (gradients zeroed as a trainer would)."""
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, idx)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    def sync() -> None:
        if idx.is_cuda:
            torch.cuda.synchronize()

    step()  # warm-up (and compilation for compiled models)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def bench_cpu_training(preset: str, batch: int, seq: int, steps: int, rounds: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, context_length=seq)
    eager = Transformer(config)
    compiled = torch.compile(Transformer(config))
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    tokens = batch * seq
    times: dict[str, list[float]] = {"eager": [], "compile": []}
    for _ in range(rounds):  # alternate so a load change on the shared machine hits both
        times["eager"].append(train_step_seconds(eager, idx, steps))
        times["compile"].append(train_step_seconds(compiled, idx, steps))
    eager_tps = tokens / statistics.median(times["eager"])
    compiled_tps = tokens / statistics.median(times["compile"])
    print(f"{preset:>6} fwd+bwd  batch {batch}x{seq}  eager {eager_tps:9,.0f} tok/s  "
          f"compile {compiled_tps:9,.0f} tok/s  compile/eager {compiled_tps / eager_tps:.2f}x")


def bench_decoding(preset: str, prompt_len: int, new_tokens: int) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))

    start = time.perf_counter()
    cached = list(model.generate(prompt, new_tokens, temperature=0))
    cached_s = time.perf_counter() - start

    start = time.perf_counter()
    tokens = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            next_id = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_id], dim=1)
    uncached_s = time.perf_counter() - start
    assert tokens[0, prompt_len:].tolist() == cached, "cached and uncached greedy decoding differ"
    print(f"{preset:>6} decode   prompt {prompt_len} + {new_tokens} tokens  "
          f"KV cache {new_tokens / cached_s:7,.1f} tok/s  no cache {new_tokens / uncached_s:7,.1f} tok/s  "
          f"speed-up {uncached_s / cached_s:.2f}x")


def bench_gpu(batch: int, steps: int) -> None:
    config = ModelConfig.from_preset("gpt2-124m")
    model = Transformer(config).cuda()
    name = torch.cuda.get_device_name()
    peak = peak_flops_for_device(name)
    idx = torch.randint(0, config.vocab_size, (batch, config.context_length), device="cuda")
    for label, m in (("eager", model), ("compile", torch.compile(model))):
        seconds = train_step_seconds(m, idx, steps, autocast=True)
        tps = batch * config.context_length / seconds
        mfu = tps * config.flops_per_token() / peak if peak else float("nan")
        print(f"gpt2-124m fwd+bwd bf16 on {name}  batch {batch}x1024  {label}: "
              f"{tps:,.0f} tok/s  MFU {mfu:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-batch", type=int, default=16)
    # One thread by default: on a CPU shared with other jobs, two OpenMP threads spin-wait on
    # each other at every op and small matmuls run tens of times slower (seen: 94 ms vs
    # 2.4 ms per decode step of `tiny`), which would measure the contention, not the model.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for preset in args.presets:
        bench_cpu_training(preset, args.batch, args.seq, args.steps, args.rounds)
    for preset in args.presets:
        bench_decoding(preset, prompt_len=64, new_tokens=128)
    if torch.cuda.is_available():
        bench_gpu(args.gpu_batch, steps=20)
    else:
        print("GPU: not measured (no CUDA device)")


if __name__ == "__main__":
    main()
