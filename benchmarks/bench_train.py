"""Training benchmarks (CPU here; the same script runs on a GPU).

    python benchmarks/bench_train.py throughput [--presets tiny small] [--context 256] ...
        Tokens/s of full training steps (forward, backward, clipping, AdamW) for each preset:
        eager fp32 (the baseline), torch.compile fp32, and eager bf16 autocast, measured in
        alternating rounds. Synthetic tokens: throughput does not depend on the text.
        Compile time is reported separately (warmup_s) and excluded from tokens/s.

    python benchmarks/bench_train.py shakespeare --minutes 2 10
        Tiny Shakespeare with configs/tinyshakespeare.yaml for each wall-clock budget (a
        fresh run each, the schedule fitted to the budget): validation bits per byte.

Every figure comes with the machine load (os.getloadavg) seen during the measurement, since
the CPU may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


VARIANTS = {  # name -> (compile, autocast dtype); the first is the baseline
    "eager fp32": (False, None),
    "compiled fp32": (True, None),
    "eager bf16 autocast": (False, torch.bfloat16),
    "compiled bf16 autocast": (True, torch.bfloat16),  # the GPU configuration (CUDA only)
}


def make_step(preset: str, context: int, batch: int, compile_model: bool,
              dtype: torch.dtype | None, device: str):
    """A closure running one full training step (the loop's own functions) on random tokens."""
    from scratchlm.model import ModelConfig, Transformer
    from scratchlm.train.config import OptimizerSection
    from scratchlm.train.loop import accumulate_gradients
    from scratchlm.train.optim import build_optimizer, clip_grad_norm_

    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, context_length=context)
    model = Transformer(config).to(device)
    optimizer = build_optimizer(model, OptimizerSection(), device)
    step_model = torch.compile(model) if compile_model else model
    scaler = torch.amp.GradScaler(device, enabled=False)
    autocast = ((lambda: torch.autocast(device, dtype=dtype)) if dtype is not None
                else contextlib.nullcontext)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randint(0, config.vocab_size, (batch, context + 1), generator=gen).to(device)
        accumulate_gradients(step_model, [(x[:, :-1], x[:, 1:])], autocast, scaler, torch.device(device))
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, model.num_params(), config.flops_per_token(context)


def mfu(tokens_per_s: float, flops_per_token: float, device: str) -> float | None:
    from scratchlm.train.metrics import model_flops_utilization, peak_flops

    return model_flops_utilization(tokens_per_s, flops_per_token,
                                   peak_flops(torch.device(device)), world_size=1)


def throughput(args: argparse.Namespace) -> None:
    """Variants are measured in alternating rounds (A B C A B C ...) and the median round
    is reported: on a shared CPU the load drifts, and back-to-back blocks would credit one
    variant with a quieter minute."""
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {_load()}")
    names = [n for n in VARIANTS if (args.bf16 or "bf16" not in n)
             and (args.device == "cuda" or n != "compiled bf16 autocast")]
    for preset in args.presets:
        steps, warmup_s = {}, {}
        for name in names:
            steps[name], n_params, flops_per_token = make_step(
                preset, args.context, args.batch, *VARIANTS[name], args.device)
            t0 = time.perf_counter()
            for _ in range(args.warmup):  # includes compilation for the compiled variant
                steps[name]()
            warmup_s[name] = time.perf_counter() - t0
        rates: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        for _ in range(args.rounds):
            for name in names:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                rates[name].append(args.steps * args.batch * args.context
                                   / (time.perf_counter() - t0))
            loads.append(os.getloadavg()[0])
        base = statistics.median(rates[names[0]])
        for name in names:
            median = statistics.median(rates[name])
            print(json.dumps({"preset": preset, "params_M": round(n_params / 1e6, 2),
                              "variant": name, "context": args.context, "batch": args.batch,
                              "tokens_per_s_median": round(median, 1),
                              "tokens_per_s_rounds": [round(r, 1) for r in rates[name]],
                              "vs_eager_fp32": round(median / base, 2),
                              "mfu": mfu(median, flops_per_token, args.device),
                              "device": (torch.cuda.get_device_name() if args.device == "cuda"
                                         else "cpu"),
                              "warmup_s": round(warmup_s[name], 1),
                              "load_1min_per_round": [round(x, 1) for x in loads]}), flush=True)


def shakespeare(args: argparse.Namespace) -> None:
    from scratchlm.data import PrepareConfig, prepare_data
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.train import load_train_config, train

    corpus = REPO.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    tok_dir, data_dir = work / "tok-shakespeare-1024", work / "data-shakespeare-1024"
    if not data_dir.is_dir():
        Tokenizer.train([str(corpus)], vocab_size=1024).save(tok_dir)
        prepare_data([str(corpus)], tok_dir, data_dir, overwrite=True, config=PrepareConfig(
            split_by_position=True, val_fraction=0.1, filter=False, dedup=False, progress=False))
    for minutes in args.minutes:
        before = _load()
        config = load_train_config(REPO / "configs" / "tinyshakespeare.yaml", [
            f"data.dir={data_dir}", f"data.tokenizer={tok_dir}", f"run.max_minutes={minutes}",
            f"run.threads={args.threads}", "run.progress=false", "run.sample_tokens=0"])
        summary = train(config, work / f"run-{minutes}min")
        print(json.dumps({"minutes": minutes, "val_bpb": round(summary["val_bpb"], 4),
                          "val_loss": round(summary["val_loss"], 4), "steps": summary["steps"],
                          "tokens": summary["tokens"],
                          "train_tokens_per_s": round(summary["train_tokens_per_s"], 1),
                          "load_before": before, "load_after": _load()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the bf16 autocast variant")
    p.set_defaults(func=throughput)
    s = sub.add_parser("shakespeare")
    s.add_argument("--minutes", type=float, nargs="+", default=[2, 10])
    s.add_argument("--threads", type=int, default=os.cpu_count())
    s.add_argument("--work", help="directory for the tokenizer, data and runs (default: temp)")
    s.set_defaults(func=shakespeare)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
