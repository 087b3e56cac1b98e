"""Run nanoGPT's own bench.py (unmodified) from its directory, as `python bench.py ARGS` would.

    python benchmarks/nanogpt_bench.py NANOGPT_DIR [--tiny] [--key=value ...]

Two adjustments apply only where nanoGPT's script cannot run as written, that is in the CPU
dry run of benchmarks/bench_gpu.py: without CUDA, its unconditional torch.cuda.synchronize()
calls become no-ops (a CPU has nothing to wait for); and --tiny shrinks its hard-coded
GPT-2 124M (12 layers, 768 wide) to 2 layers of 64 so the dry run takes seconds. On a GPU
without --tiny nothing is changed.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch


def main(argv: list[str]) -> None:
    directory, args = argv[0], argv[1:]
    tiny = "--tiny" in args
    args = [a for a in args if a != "--tiny"]
    os.chdir(directory)  # bench.py reads configurator.py from the working directory
    sys.path.insert(0, directory)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    if tiny:
        import model  # nanoGPT's model.py

        full = model.GPTConfig
        model.GPTConfig = lambda **kw: full(**{**kw, "n_layer": 2, "n_head": 2, "n_embd": 64})
    sys.argv = ["bench.py", *args]
    runpy.run_path("bench.py", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
