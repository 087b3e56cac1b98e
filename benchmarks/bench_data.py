"""`data prepare` throughput (MB/s of raw input) with 1 and 2 worker processes.

    .venv/bin/python benchmarks/bench_data.py [--repeats 2] [--no-stdlib]

Inputs: the five shared corpora (../shared/data/corpora) plus, unless --no-stdlib, the embedded
stdlib corpus; tokenizer: GPT-2's (from ../shared/data/tokenizers/gpt2, tiktoken fast path).
Each configuration runs `repeats` times and the best time counts (least disturbed by other
processes on the machine). The 2-vs-1 wall-time ratio is the figure of merit; per-stage
seconds show which stages scale, and total CPU seconds (parent + workers) show the overhead
of parallelism independently of how loaded the machine is.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from scratchlm.data import PrepareConfig, prepare_data
from scratchlm.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPORA = ["c4_demo.jsonl", "wiki_demo.txt", "tinystories_valid_head.txt", "tinystories_train_head.txt",
           "tinyshakespeare.txt"]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(inputs: list[str], tok_dir: Path, workers: int, work: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, manifest) of one `prepare_data` run."""
    out = work / f"data_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    manifest = prepare_data(inputs, tok_dir, out, config=PrepareConfig(workers=workers, progress=False))
    return time.perf_counter() - start, cpu_seconds() - cpu_start, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-stdlib", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    inputs = [str(SHARED / "corpora" / name) for name in CORPORA] + ([] if args.no_stdlib else ["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpt2 = SHARED / "tokenizers" / "gpt2"
        Tokenizer.from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(work / "tok")
        results = {}
        for workers in (1, 2):
            runs = [run(inputs, work / "tok", workers, work) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r[0])
            results[workers] = (best[0], [r[0] for r in runs], best[1], best[2])

    mb = results[1][3]["stages"][0]["bytes"] / 1e6
    print(f"inputs: {', '.join(Path(i).name for i in inputs)} ({mb:.2f} MB raw, "
          f"{results[1][3]['stages'][0]['documents']:,} documents); cpus: {os.cpu_count()}, "
          f"1-min load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    stage_names = [row["stage"] for row in results[1][3]["stages"]]
    print("| workers | best s | MB/s | runs (s) | CPU s | " + " | ".join(f"{s} s" for s in stage_names) + " |")
    print("|---" * (5 + len(stage_names)) + "|")
    for workers, (best, times, cpu, manifest) in results.items():
        stages = " | ".join(f"{row['seconds']:.2f}" for row in manifest["stages"])
        print(f"| {workers} | {best:.2f} | {mb / best:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {cpu:.2f} | {stages} |")
    print(f"speedup 2 vs 1 workers: {results[1][0] / results[2][0]:.2f}x wall (goal >= 1.7x); "
          f"CPU time 2 vs 1: {results[2][2] / results[1][2]:.2f}x (parallel overhead)")


if __name__ == "__main__":
    main()
