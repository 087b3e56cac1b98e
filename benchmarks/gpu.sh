#!/usr/bin/env bash
# Issue 15's GPU benchmark in one script (<= 6 minutes on one H100/H200): writes
# gpu_results.json and gpu_results.md into --out (default: the current directory).
#
#   bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--nanogpt DIR] [--batch N]
#
# --dry-run: tiny shapes and a few steps on the CPU, every part exercised (the test suite
# runs it). --nanogpt: nanoGPT's directory (default ../shared/baselines/nanogpt beside the
# repository; a GPU machine that only receives the repository needs a copy carried in).
# PYTHON picks the interpreter (default: the project's .venv if present, else python3).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$repo/src:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The run takes about 5 minutes on one H100/H200, most of it torch.compile; the limit keeps a
# hung part from eating the GPU lease (results are written after every part, so a run cut
# short keeps what it measured).
exec timeout 540 "$python" "$repo/benchmarks/bench_gpu.py" "$@"
