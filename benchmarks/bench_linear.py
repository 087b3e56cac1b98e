"""Linear layers on this CPU: `F.linear` (MKL) against oneDNN's fused linear, which
`scratchlm.model.onednn` routes gradient-free forwards through.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_linear.py [--threads 2] [--rounds 10]

Three workloads, each the weights of a real model, distinct matrices (so, as in a forward
pass, each weight comes from memory, not from the cache of the previous call):
  decode, 1 row:   the `small` preset's 41 weights (8 layers of qkv, out, gate, up, down + the
                   8192-wide head), one token;
  decode, 32 rows: the same weights, a batched engine step of 32 streams;
  score, 2048 rows: one GPT-2-124M layer's four weights (qkv, out, fc, proj), 2048 tokens (a
                   scoring batch), and its 50257-wide head at 512 rows.
Times are the best of --rounds (interleaved MKL, oneDNN, after a warm-up round), ratio = MKL / oneDNN; outputs are
compared too (largest relative difference).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from scratchlm.model.onednn import ONEDNN_LINEAR

SMALL = [(640, 384), (384, 384), (1024, 384), (1024, 384), (384, 1024)] * 8 + [(8192, 384)]
GPT2_LAYER = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def measure(name: str, shapes: list[tuple[int, int]], rows: int, rounds: int) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) / inp ** 0.5 for out, inp in shapes]
    inputs = {inp: torch.randn(rows, inp) for _, inp in shapes}
    kernels = {"mkl": F.linear, "onednn": onednn}
    times: dict[str, list[float]] = {label: [] for label in kernels}
    for round_ in range(rounds + 1):  # interleaved, so a load change hits both; round 0 warms up
        for label, linear in kernels.items():
            start = time.perf_counter()
            for w in weights:
                linear(inputs[w.shape[1]], w)
            if round_:
                times[label].append(time.perf_counter() - start)
    difference = max(float(((F.linear(inputs[w.shape[1]], w) - onednn(inputs[w.shape[1]], w)).abs().max()
                            / F.linear(inputs[w.shape[1]], w).abs().max())) for w in weights)
    mkl, dnn = min(times["mkl"]), min(times["onednn"])
    print(f"| {name} | {len(weights)} | {rows} | {mkl * 1e3:.2f} | {dnn * 1e3:.2f} | {mkl / dnn:.2f}x | "
          f"{difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not ONEDNN_LINEAR:
        parser.error("this PyTorch build has no oneDNN linear (not x86, or built without oneDNN)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | weights | rows | MKL ms | oneDNN ms | MKL / oneDNN | max rel. difference |")
    print("|---|---|---|---|---|---|---|")
    measure("decode (`small`), 1 row", SMALL, 1, args.rounds)
    measure("decode (`small`), 32 rows", SMALL, 32, args.rounds)
    measure("score (GPT-2 layer), 2048 rows", GPT2_LAYER, 2048, max(2, args.rounds // 3))
    measure("score (GPT-2 head), 512 rows", [(50257, 768)], 512, max(2, args.rounds // 3))


if __name__ == "__main__":
    main()
