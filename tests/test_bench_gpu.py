"""benchmarks/gpu.sh --dry-run: every part of the GPU benchmark (issue 15) runs on the CPU
with tiny shapes and lands in gpu_results.json, so the GPU run cannot fail for a reason a CPU
could have shown. No timings are checked: on a CPU they mean nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT

NANOGPT = REPO_ROOT.parent / "shared" / "baselines" / "nanogpt"
PARTS = ("train_gpt2", "nanogpt_gpt2", "train_llama", "memory", "decode", "fsdp")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO_ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_gpu_idle_time_is_the_span_minus_the_union_of_kernels():
    from torch.autograd import DeviceType

    def kernel(start, end):  # microseconds, as the profiler's events
        return SimpleNamespace(device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end))

    host = SimpleNamespace(device_type=DeviceType.CPU, time_range=SimpleNamespace(start=0, end=10_000))
    # Busy 100-400 (two overlapping kernels) and 500-1000 (two touching ones): idle 100 of 900.
    events = [kernel(500, 600), kernel(100, 300), host, kernel(200, 400), kernel(600, 1000)]
    bench = _bench_module()
    idle = bench._idle(events)
    assert idle["gpu_idle_fraction"] == pytest.approx(100 / 900) and idle["longest_gap_ms"] == pytest.approx(0.1)
    assert bench._idle([host]) == {"gpu_idle_fraction": None, "longest_gap_ms": None}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_results.json").read_text()), (out / "gpu_results.md").read_text()


@pytest.mark.slow  # about 30 s: two tiny training runs, nanoGPT's bench, decode, FSDP2
def test_dry_run_exercises_every_part(dry_run):
    results, table = dry_run
    assert results["dry_run"] is True and results["environment"]["device"] == "cpu"
    parts = results["parts"]
    assert tuple(parts) == PARTS  # nanoGPT's part is checked below (it may lack what it needs)
    assert not [name for name, part in parts.items() if "error" in part and name != "nanogpt_gpt2"]
    for name, preset in (("train_gpt2", "gpt2-124m"), ("train_llama", "llama-124m")):
        part = parts[name]
        assert part["model"] == preset and part["steps"] == 6 and part["tokens_per_s"] > 0
        assert part["mfu"] is None and part["peak_memory_bytes"] is None  # a CPU: no peak, no CUDA allocator
        assert part["final_loss"] == pytest.approx(10.8, abs=0.5)  # ~ln(50k): random tokens
        assert parts["memory"][preset]["estimated_bytes"] > 0
    assert parts["decode"]["batch_1_tokens_per_s"] > 0 and parts["decode"]["batch_4_tokens_per_s"] > 0
    profile = parts["train_gpt2"]["profile"]
    assert profile["top"] and profile["gpu_idle_fraction"] is None  # no GPU kernels on a CPU
    assert parts["fsdp"]["loss_finite"] and parts["fsdp"]["mixed_precision"].startswith("param_dtype=bfloat16")
    assert "DRY RUN" in table and "| scratchlm (train loop) | gpt2-124m | 2 x 32 |" in table


@pytest.mark.slow
def test_dry_run_runs_nanogpts_own_bench(dry_run):
    if not (NANOGPT / "bench.py").is_file():
        pytest.skip(f"nanoGPT not found at {NANOGPT} (needs ../shared/baselines/nanogpt beside the repo)")
    part = dry_run[0]["parts"]["nanogpt_gpt2"]
    if "ModuleNotFoundError" in part.get("error", ""):
        pytest.skip(f"nanoGPT's bench.py needs a module not installed here: {part['error'][-200:]}")
    assert "error" not in part, part.get("error")
    assert part["step_ms"] > 0 and part["tokens_per_s"] == pytest.approx(2 * 32 / (part["step_ms"] / 1000))
    assert part["command"] == ("python bench.py --batch_size=2 --block_size=32 --real_data=False "
                               "--compile=False --device=cpu")


def test_gpu_plan_and_report_with_gpu_figures():
    """What only a GPU run reaches, checked here: the full-size plan's models (nanoGPT's GPT-2
    shapes, 124M parameters) and the report with every figure filled in."""
    bench = _bench_module()
    plan = bench.full_plan(batch=16)
    gpt2, llama = plan.model_config("gpt2-124m"), plan.model_config("llama-124m")
    assert (gpt2.vocab_size, gpt2.bias, gpt2.context_length) == (50304, False, 1024)
    assert 120e6 < gpt2.num_params() < 130e6 and 120e6 < llama.num_params() < 140e6
    assert plan.measure_from - plan.profile_steps - 1 >= 0 and plan.measure_from % plan.log_every == 0
    train = {"model": "gpt2-124m", "batch": 16, "context": 1024, "tokens_per_s": 500_000.0, "mfu": 0.52,
             "peak_memory_bytes": 30 * 2**30,
             "profile": {"by": "device time", "gpu_idle_fraction": 0.03, "longest_gap_ms": 0.4,
                         "top": [{"name": "sm90_xmma_gemm", "share": 0.4, "ms": 10.0, "calls": 48}]}}
    results = {"dry_run": False, "environment": {"device": "NVIDIA H200", "peak_gpu": "H200", "peak_tflops": 989.4,
                                                 "torch": "2.11.0", "date": "2026-12-02"},
               "parts": {"train_gpt2": train, "nanogpt_gpt2": {**train, "model": "nanoGPT GPT-2 124M", "mfu": 0.45},
                         "train_llama": {"error": "RuntimeError: out of memory\nmore"},
                         "memory": bench.memory_part(plan, {"train_gpt2": train}),
                         "decode": {"batch_1_tokens_per_s": 400.0, "batch_64_tokens_per_s": 20_000.0},
                         "fsdp": {"loss": 10.9, "tokens_per_s": 300_000.0, "peak_memory_bytes": 2**33}}}
    table = bench.markdown(results)
    assert "MFU against the H200 dense bf16 peak of 989 TFLOP/s" in table and "DRY RUN" not in table
    assert "| scratchlm (train loop) | gpt2-124m | 16 x 1024 | 500,000 | 52.0% | 30.00 GiB |" in table
    assert "| nanoGPT bench.py | nanoGPT GPT-2 124M | 16 x 1024 | 500,000 | 45.0% |" in table
    assert "| scratchlm (train loop) | train_llama | | RuntimeError: out of memory |" in table
    assert "| batch 64 | 20,000 |" in table and "GPU idle 3.0%" in table and "sm90_xmma_gemm 40%" in table
    from scratchlm.model.accounting import estimate_training_memory

    ratio = results["parts"]["memory"]["gpt2-124m"]["ratio"]
    assert ratio == pytest.approx(30 * 2**30 / estimate_training_memory(gpt2, 16, 1024)["total"])
    assert f"| 30.00 GiB | {ratio:.2f}x |" in table
