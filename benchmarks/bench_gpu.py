"""Issue 15's GPU benchmark: scratchlm against nanoGPT on one H100/H200, in one run.

    bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--nanogpt DIR] [--batch N]

Parts (each recorded in gpu_results.json under "parts"; a part that fails records its error
and the others still run):
  train_gpt2    gpt2-124m at context 1024 through scratchlm's own training loop (train(), a
                synthetic token stream): bf16 autocast, per-block torch.compile, SDPA flash
                attention, fused AdamW; steady-state tokens/s and MFU, peak memory; and a
                profile of a few steps before the measured ones (top kernels, device idle
                time), for where the time goes when MFU falls short.
  nanogpt_gpt2  nanoGPT's own bench.py (--real_data=False --compile=True) with the same
                batch and context, in a subprocess on the same GPU.
  train_llama   llama-124m as train_gpt2 (ours only).
  memory        the two runs' peak memory against model.accounting.estimate_training_memory.
  decode        greedy decoding with the KV cache at batch 1 and 64 (tokens/s).
  fsdp          one FSDP2 training step at world size 1 with MixedPrecisionPolicy(bf16 compute,
                fp32 reduce) on a model built on the meta device.
MFU is model FLOPs (model.accounting.flops_per_token, the loop's own formula) over the dense
bf16 peak of the GPU named by torch (model.accounting.GPU_PEAK_FLOPS; H100/H200: 989 TFLOP/s).

--dry-run: tiny shapes, a few steps, on the CPU (compile off, nanoGPT shrunk), so that every
part runs in the test suite (tests/test_bench_gpu.py) before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON, RESULTS_MD = "gpu_results.json", "gpu_results.md"
PARTS = ("train_gpt2", "nanogpt_gpt2", "train_llama", "memory", "decode", "fsdp")
# nanoGPT's GPT-2 124M: vocabulary padded to 50304 (a multiple of 64), no biases. Ours is
# measured with the same shapes so both count the same FLOPs.
NANOGPT_SHAPES = dict(vocab_size=50304, bias=False)
NANOGPT_A100_PEAK = 312e12  # the peak nanoGPT's printed MFU is relative to (model.py estimate_mfu)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    device: str
    batch: int
    context: int
    steps: int  # training steps per model
    measure_from: int  # tokens/s is taken over the steps after this one (compilation before)
    profile_steps: int  # profiled steps, the last ones before measure_from (a log step: synced)
    log_every: int
    compile: bool
    decode_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    shrink: dict[str, Any] = field(default_factory=dict)  # model overrides of the dry run

    def model_config(self, preset: str):
        from scratchlm.model import ModelConfig

        overrides = dict(self.shrink)
        if preset == "gpt2-124m":
            overrides.update(NANOGPT_SHAPES)
        if preset == "llama-124m" and "n_heads" in overrides:
            overrides["n_kv_heads"] = overrides["n_heads"] // 2
        return ModelConfig.from_preset(preset, context_length=self.context, **overrides)


def full_plan(batch: int) -> Plan:
    return Plan(device="cuda", batch=batch, context=1024, steps=60, measure_from=20, profile_steps=4, log_every=10,
                compile=True, decode_batches=(1, 64), prompt_tokens=64, new_tokens=256)


def dry_plan() -> Plan:
    return Plan(device="cpu", batch=2, context=32, steps=6, measure_from=4, profile_steps=2, log_every=2, compile=False,
                decode_batches=(1, 4), prompt_tokens=4, new_tokens=8,
                shrink=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256))


# --------------------------------------------------------------------------- the loop, on synthetic tokens
class SyntheticTokens:
    """A loader of uniform random tokens (throughput does not depend on the text): the
    TokenLoader interface the training loop uses."""

    padding_fraction = 0.0

    def __init__(self, vocab_size: int, batch: int, context: int, seed: int) -> None:
        self.vocab_size, self.batch, self.context = vocab_size, batch, context
        self.tokens_per_epoch = 2**40
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += 1
        tokens = torch.randint(self.vocab_size, (self.batch, self.context + 1), generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]

    def one_pass(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(max_batches or 1):
            yield self.next_batch()

    def segment_ids(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)  # one document per row

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


class SyntheticTokenizer:
    """Just what the loop and its checkpoints ask of a tokenizer: a vocabulary size, byte
    lengths (for bits per byte, meaningless here) and a save that records what it was."""

    eot_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def token_byte_lengths(self) -> list[int]:
        return [1] * self.vocab_size

    def save(self, directory: str | Path) -> None:
        Path(directory, "synthetic_tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size}))


def synthetic_trainer(vocab_size: int, batch: int, context: int, after_step: Callable[[], None]):
    """The real Trainer with its tokenizer and data replaced by synthetic ones; `after_step`
    runs after each optimizer step, outside its timing (the profiler's step)."""
    from scratchlm.train.loop import Trainer

    class SyntheticTrainer(Trainer):
        def _optimizer_step(self, session, progress: float) -> None:
            super()._optimizer_step(session, progress)
            after_step()

        def _load_tokenizer(self):
            return SyntheticTokenizer(vocab_size)

        def _check_data(self) -> dict:
            return {}

        def _loader(self, split: str, packing: str):  # noqa: ARG002
            return SyntheticTokens(vocab_size, batch, context, seed=0 if split == "train" else 1)

    return SyntheticTrainer


def train_part(plan: Plan, preset: str, work: Path, profile: bool = False) -> dict[str, Any]:
    """Our training loop end to end; tokens/s from its own metrics records after warm-up."""
    from scratchlm.train import train
    from scratchlm.train.config import config_from_dict
    from scratchlm.train.metrics import matched_gpu, model_flops_utilization, peak_flops

    model_config = plan.model_config(preset)
    overrides = {k: v for k, v in model_config.to_dict().items() if k != "vocab_size"}
    config = config_from_dict({
        "model": {"preset": preset, **overrides},
        "data": {"dir": str(work), "tokenizer": str(work)},
        "run": {"device": plan.device, "dtype": "bf16", "compile": plan.compile, "max_steps": plan.steps,
                "global_batch_tokens": plan.batch * plan.context, "micro_batch_size": plan.batch,
                "log_every": plan.log_every, "eval_every": 0, "eval_batches": 1, "sample_tokens": 0,
                "checkpoint_every": 0, "checkpoint_minutes": None, "keep_checkpoints": 1,
                "progress": False, "tensorboard": False},
    })
    config.validate()
    _reset_peak_memory(plan.device)
    profiler = _profiler(plan) if profile else None
    with profiler or contextlib.nullcontext():
        summary = train(config, work / preset, overwrite=True,
                        trainer=synthetic_trainer(model_config.vocab_size, plan.batch, plan.context,
                                                  profiler.step if profiler else lambda: None))
    records = [json.loads(line) for line in (work / preset / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    first = next(r for r in train_records if r["step"] >= plan.measure_from)
    last = train_records[-1]
    # elapsed_s is read after the step's figures came back from the device, so the difference
    # between two records is the true time of the steps in between.
    tokens_per_s = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    device = torch.device(plan.device)
    return {
        "model": preset, "shapes": _shapes_text(model_config), "params": model_config.num_params(),
        "batch": plan.batch, "context": plan.context, "steps": summary["steps"],
        "measured_steps": f"{first['step']}-{last['step']}", "tokens_per_s": tokens_per_s,
        "mfu": model_flops_utilization(tokens_per_s, model_config.flops_per_token(plan.context),
                                       peak_flops(device), world_size=1),
        "mfu_gpu": matched_gpu(device), "loop_summary_mfu": summary["mfu"],
        "final_loss": last["loss"], "peak_memory_bytes": _peak_memory(plan.device),
        "compile": plan.compile, "dtype": "bf16 autocast",
        **({"profile": _profile_summary(profiler)} if profiler else {}),
    }


def _profiler(plan: Plan):
    """torch.profiler over the `profile_steps` steps ending at `measure_from`: after
    compilation, outside the measured steps, and ending on a step that waits for the device
    (a log step), so every kernel of the window has run when the profile closes."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])
    return profile(activities=activities, schedule=schedule(
        wait=plan.measure_from - plan.profile_steps - 1, warmup=1, active=plan.profile_steps, repeat=1))


def _profile_summary(profiler) -> dict[str, Any]:
    """The top 15 operations by time on the device (the CPU in a dry run), and how much of
    the window the GPU sat idle between kernels (launch gaps, host syncs)."""
    from torch.autograd import DeviceType

    on_gpu = any(e.device_type == DeviceType.CUDA for e in profiler.events())
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in averages) or 1
    top = [{"name": e.key[:90], "ms": getattr(e, key) / 1000, "share": getattr(e, key) / total, "calls": e.count}
           for e in averages[:15]]
    return {"by": "device time" if on_gpu else "CPU time (dry run)", "top": top, **_idle(profiler.events())}


def _idle(events) -> dict[str, Any]:
    """Device idle time inside the window spanned by the GPU kernels (union of their
    intervals against the span), and the longest single gap."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    if not spans:
        return {"gpu_idle_fraction": None, "longest_gap_ms": None}
    busy, longest = 0.0, 0.0
    run_start, run_end = spans[0]  # the current run of overlapping kernels
    for begin, finish in spans[1:]:
        if begin > run_end:
            busy, longest = busy + run_end - run_start, max(longest, begin - run_end)
            run_start, run_end = begin, finish
        else:
            run_end = max(run_end, finish)
    busy += run_end - run_start
    window = max(finish for _, finish in spans) - spans[0][0]
    return {"gpu_idle_fraction": 1 - busy / window if window > 0 else 0.0, "longest_gap_ms": longest / 1000}


# --------------------------------------------------------------------------- nanoGPT
def nanogpt_part(plan: Plan, nanogpt: Path, dry_run: bool) -> dict[str, Any]:
    """nanoGPT's bench.py in a subprocess; its step time converted to tokens/s and MFU with
    our formula and peak (its own printed MFU is against the A100's 312 TFLOP/s)."""
    from scratchlm.train.metrics import matched_gpu, model_flops_utilization, peak_flops

    if not (nanogpt / "bench.py").is_file():
        return {"skipped": f"nanoGPT's bench.py not found in {nanogpt}"}
    args = [f"--batch_size={plan.batch}", f"--block_size={plan.context}", "--real_data=False",
            f"--compile={plan.compile}", f"--device={plan.device}"] + (["--tiny"] if dry_run else [])
    command = [sys.executable, str(REPO / "benchmarks" / "nanogpt_bench.py"), str(nanogpt.resolve()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"nanoGPT's bench.py failed ({done.returncode}): {done.stderr[-2000:]}")
    found = re.search(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%", done.stdout)
    if found is None:
        raise RuntimeError(f"no 'time per iteration' line in nanoGPT's output: {done.stdout[-1000:]}")
    step_ms, own_mfu = float(found[1]), float(found[2]) / 100
    tokens_per_s = plan.batch * plan.context / (step_ms / 1000)
    config = plan.model_config("gpt2-124m")
    if dry_run:  # the model nanogpt_bench.py --tiny builds: 2 layers, 2 heads, 64 wide
        config = type(config).from_dict({**config.to_dict(), "d_model": 64, "n_layers": 2, "n_heads": 2,
                                         "n_kv_heads": 2, "d_ff": 256})
    device = torch.device(plan.device)
    peak = peak_flops(device)
    return {
        "model": "nanoGPT GPT-2 124M" + (" (shrunk: 2 layers x 64)" if dry_run else ""),
        "shapes": _shapes_text(config), "batch": plan.batch, "context": plan.context,
        "command": " ".join(["python", "bench.py", *[a for a in args if a != "--tiny"]]),
        "step_ms": step_ms, "tokens_per_s": tokens_per_s,
        "mfu": model_flops_utilization(tokens_per_s, config.flops_per_token(plan.context), peak, world_size=1),
        "mfu_gpu": matched_gpu(device),
        "own_mfu_rescaled": None if peak is None else own_mfu * NANOGPT_A100_PEAK / peak,
        "compile": plan.compile,
    }


# --------------------------------------------------------------------------- memory against the estimate
def memory_part(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    from scratchlm.model.accounting import estimate_training_memory

    out = {}
    for part, preset in (("train_gpt2", "gpt2-124m"), ("train_llama", "llama-124m")):
        estimate = estimate_training_memory(plan.model_config(preset), plan.batch, plan.context)["total"]
        measured = results.get(part, {}).get("peak_memory_bytes")
        ratio = None if measured is None else measured / estimate
        out[preset] = {"measured_bytes": measured, "estimated_bytes": estimate, "ratio": ratio,
                       "within_10_percent": None if ratio is None else abs(ratio - 1) <= 0.10}
    return out


# --------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode_part(plan: Plan) -> dict[str, Any]:
    """Greedy decoding through the model's KV cache (Transformer.forward with kv_cache), the
    next token chosen on the device, so the loop never waits for it: tokens/s per batch size
    over `new_tokens` steps after the prefill, after one warm-up run."""
    from scratchlm.train.distributed import materialize

    model = _meta_model(plan, "gpt2-124m")
    device = torch.device(plan.device)
    materialize(model, device, seed=0)
    model.eval()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    out = {"model": "gpt2-124m", "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "prompt_tokens": plan.prompt_tokens, "new_tokens": plan.new_tokens}
    generator = torch.Generator().manual_seed(0)
    for batch in plan.decode_batches:
        prompt = torch.randint(model.config.vocab_size, (batch, plan.prompt_tokens), generator=generator)
        run = lambda: _greedy(model, prompt.to(device), plan.new_tokens)  # noqa: E731
        run()  # warm-up: kernels chosen, allocator filled
        seconds = _timed(run, plan.device)
        out[f"batch_{batch}_tokens_per_s"] = batch * plan.new_tokens / seconds
    return out


def _greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    cache = model.new_kv_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    token = model(prompt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        token = model(token, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    return token


# --------------------------------------------------------------------------- FSDP2
def fsdp_part(plan: Plan, work: Path) -> dict[str, Any]:
    """One training step of gpt2-124m sharded by FSDP2 over a one-process group, bf16
    compute through MixedPrecisionPolicy, weights materialised from the meta device."""
    import torch.distributed as dist

    from scratchlm.train.config import OptimizerSection
    from scratchlm.train.distributed import DistContext, fully_shard_model, materialize
    from scratchlm.train.optim import build_optimizer, clip_grad_norm_

    device = torch.device(plan.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{work / 'fsdp_store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(0, 0, 1, device)
        model = fully_shard_model(_meta_model(plan, "gpt2-124m"), ctx, param_dtype=torch.bfloat16)
        materialize(model, device, seed=0)
        optimizer = build_optimizer(model, OptimizerSection(), device.type)
        tokens = torch.randint(model.config.vocab_size, (plan.batch, plan.context + 1),
                               generator=torch.Generator().manual_seed(0)).to(device)
        _reset_peak_memory(plan.device)

        def step() -> torch.Tensor:
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        first_loss = step().item()  # includes FSDP's lazy setup
        seconds = _timed(step, plan.device)
        return {"model": "gpt2-124m", "world_size": 1, "backend": backend,
                "mixed_precision": "param_dtype=bfloat16, reduce_dtype=float32",
                "loss": first_loss, "loss_finite": math.isfinite(first_loss), "step_s": seconds,
                "tokens_per_s": plan.batch * plan.context / seconds,
                "peak_memory_bytes": _peak_memory(plan.device)}
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- helpers
def _meta_model(plan: Plan, preset: str):
    from scratchlm.model import Transformer

    with torch.device("meta"):
        return Transformer(plan.model_config(preset))


def _timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _shapes_text(config) -> str:
    return (f"{config.n_layers}x{config.d_model}, {config.n_heads} heads ({config.n_kv_heads} kv), "
            f"vocab {config.vocab_size}, {config.mlp}, bias {config.bias}")


def _environment(plan: Plan) -> dict[str, Any]:
    from scratchlm.train.metrics import matched_gpu, peak_flops

    device = torch.device(plan.device)
    peak = peak_flops(device)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "peak_gpu": matched_gpu(device), "peak_tflops": None if peak is None else peak / 1e12,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    env, parts = results["environment"], results["parts"]
    peak = (f"MFU against the {env['peak_gpu']} dense bf16 peak of {env['peak_tflops']:.0f} TFLOP/s"
            if env["peak_tflops"] else "no GPU peak known: MFU n/a")
    lines = [f"Device: {env['device']} ({peak}); torch {env['torch']}; {env['date']}"
             + ("; DRY RUN (CPU, tiny shapes): not a measurement" if results["dry_run"] else ""), "",
             "| run | model | batch x context | tokens/s | MFU | peak memory | vs estimate |",
             "|---|---|---|---|---|---|---|"]
    memory = parts.get("memory", {})
    for key, label, preset in (("train_gpt2", "scratchlm (train loop)", "gpt2-124m"),
                               ("nanogpt_gpt2", "nanoGPT bench.py", None),
                               ("train_llama", "scratchlm (train loop)", "llama-124m")):
        part = parts.get(key, {})
        if "tokens_per_s" not in part:
            lines.append(f"| {label} | {key} | | {_problem(part)} | | | |")
            continue
        ratio = memory.get(preset, {}).get("ratio") if preset else None
        lines.append(f"| {label} | {part['model']} | {part['batch']} x {part['context']} | "
                     f"{part['tokens_per_s']:,.0f} | {_pct(part['mfu'])} | {_gib(part.get('peak_memory_bytes'))} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    decode, fsdp = parts.get("decode", {}), parts.get("fsdp", {})
    lines += ["", "| decode (KV cache, greedy, gpt2-124m) | tokens/s |", "|---|---|"]
    lines += [f"| batch {k.split('_')[1]} | {v:,.0f} |" for k, v in decode.items() if k.endswith("_tokens_per_s")]
    if "error" in decode:
        lines.append(f"| failed | {_problem(decode)} |")
    profile = parts.get("train_gpt2", {}).get("profile")
    if profile:
        idle = profile["gpu_idle_fraction"]
        lines += ["", f"Where the time goes (gpt2-124m, by {profile['by']}"
                  + ("" if idle is None else f"; GPU idle {idle:.1%} of the profiled window, longest gap "
                     f"{profile['longest_gap_ms']:.2f} ms") + "): "
                  + ", ".join(f"{t['name']} {t['share']:.0%}" for t in profile["top"][:6])]
    lines += ["", "FSDP2 (world size 1, bf16 MixedPrecisionPolicy): "
              + (f"loss {fsdp['loss']:.3f}, {fsdp['tokens_per_s']:,.0f} tokens/s, peak {_gib(fsdp['peak_memory_bytes'])}"
                 if "loss" in fsdp else _problem(fsdp))]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _problem(part: dict[str, Any]) -> str:
    return part.get("skipped") or part.get("error", "not run").splitlines()[0][:120]


# --------------------------------------------------------------------------- main
def run_all(plan: Plan, out: Path, nanogpt: Path, dry_run: bool) -> dict[str, Any]:
    from scratchlm.train.distributed import allow_tf32

    allow_tf32(torch.device(plan.device))  # as the training loop does, for the parts outside it
    results: dict[str, Any] = {"dry_run": dry_run, "environment": _environment(plan), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "train_gpt2": lambda: train_part(plan, "gpt2-124m", work, profile=True),
            "nanogpt_gpt2": lambda: nanogpt_part(plan, nanogpt, dry_run),
            "train_llama": lambda: train_part(plan, "llama-124m", work),
            "memory": lambda: memory_part(plan, results["parts"]),
            "decode": lambda: decode_part(plan),
            "fsdp": lambda: fsdp_part(plan, work),
        }
        for name in PARTS:
            start = time.perf_counter()
            try:
                results["parts"][name] = steps[name]()
            except Exception as error:  # noqa: BLE001 - one broken part must not lose the others
                results["parts"][name] = {"error": f"{type(error).__name__}: {error}",
                                          "traceback": traceback.format_exc()[-3000:]}
            results["parts"][name]["wall_s"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {json.dumps(results['parts'][name], default=str)[:400]}", flush=True)
            write_results(results, out)  # after every part: a run cut short keeps what it measured
    print(markdown(results))
    return results


def write_results(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=1, default=str))
    (out / RESULTS_MD).write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where gpu_results.json/.md go")
    parser.add_argument("--nanogpt", type=Path, default=REPO.parent / "shared" / "baselines" / "nanogpt",
                        help="nanoGPT's directory (holding bench.py)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch of the GPU run (sequences)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    plan = dry_plan() if args.dry_run else full_plan(args.batch)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest and spares a shared CPU
    results = run_all(plan, args.out, args.nanogpt, args.dry_run)
    failed = [name for name, part in results["parts"].items() if "error" in part]
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
