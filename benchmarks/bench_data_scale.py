"""`data prepare` at corpus scale: peak memory of the whole process tree, MB/s, and datatrove side by side.

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes-mb 75 300] [--workers 2] [--datatrove]

1. Builds JSONL corpora of distinct documents of the given sizes (deterministic): each document
   is ~25 sentences drawn from the shared corpora (TinyStories, wiki, C4), so documents read as
   prose, pass the quality filters, and are not near-duplicates of each other.
2. Runs `scratchlm data prepare` on each with `--workers` processes, GPT-2's tokenizer, and
   samples the resident memory of the process and all its descendants every 50 ms: the peak of
   that sum is the figure (it must not grow with the corpus).
3. With --datatrove (`pip install "datatrove[processing]" spacy` first; not a project
   dependency): the same corpus through datatrove with as many tasks and workers:
   JsonlReader -> GopherQualityFilter -> MinHash signatures / buckets / clusters / filter ->
   DocumentTokenizer (GPT-2's tokenizer from the same files), and ours with only the Gopher
   filters on, so both run the same kinds of steps. Wall time, peak memory, documents kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2 = SHARED / "tokenizers" / "gpt2"
PAGE = os.sysconf("SC_PAGE_SIZE")
NOT_GOPHER = ("c4_lorem_ipsum", "c4_curly_brace", "c4_sentences", "fineweb_line_punct", "fineweb_short_lines",
              "fineweb_dup_line_chars")


# --------------------------------------------------------------------------- the corpus
def sentences() -> list[str]:
    texts = [(SHARED / "corpora" / name).read_text(encoding="utf-8")
             for name in ("tinystories_valid_head.txt", "tinystories_train_head.txt", "wiki_demo.txt")]
    texts += [json.loads(line)["text"] for line in (SHARED / "corpora" / "c4_demo.jsonl").open(encoding="utf-8")]
    pool = set()
    for text in texts:
        pool.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 300)
    return sorted(pool)


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write distinct documents until the file holds `megabytes` MB; returns their count."""
    pool, rng = sentences(), random.Random(seed)
    target, written, count = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            paragraphs = [" ".join(rng.choice(pool) for _ in range(5)) for _ in range(5)]
            line = json.dumps({"text": f"Document {count}.\n\n" + "\n\n".join(paragraphs)}) + "\n"
            f.write(line)
            written += len(line.encode())
            count += 1
    return count


# --------------------------------------------------------------------------- measuring
def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def run_measured(command: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak process-tree RSS in bytes) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, peak


def ours(corpus: Path, tok_dir: Path, out: Path, workers: int, gopher_only: bool) -> dict:
    command = [sys.executable, "-m", "scratchlm", "data", "prepare", "--input", str(corpus), "--tokenizer",
               str(tok_dir), "-o", str(out), "--workers", str(workers), "--num-tasks", str(workers)]
    if gopher_only:
        command += ["--no-filter", *NOT_GOPHER]
    seconds, peak = run_measured(command)
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {row["stage"]: row["documents"] for row in manifest["stages"]}
    return {"seconds": round(seconds, 1), "peak_mb": round(peak / 2**20), "documents_read": stages["read"],
            "after_filters": stages["clean+filter+tokenize"], "after_dedup": stages["near dedup"],
            "tokens": sum(s["tokens"] for s in manifest["splits"].values())}


DATATROVE_SCRIPT = r'''
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import GopherQualityFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter

corpus_dir, work, tokenizer, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes
run = lambda steps, tasks, name, deps=None: LocalPipelineExecutor(steps, tasks=tasks, workers=min(workers, tasks),
                                                                  logging_dir=f"{work}/logs/{name}", depends=deps)
filtered = run([JsonlReader(corpus_dir), GopherQualityFilter(), JsonlWriter(f"{work}/filtered"),
                MinhashDedupSignature(output_folder=f"{work}/signatures", config=config)], workers, "filter")
buckets = run([MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=config)],
              config.num_buckets, "buckets", filtered)
clusters = run([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=config)],
               1, "clusters", buckets)
final = run([JsonlReader(f"{work}/filtered"), MinhashDedupFilter(input_folder=f"{work}/remove"),
             DocumentTokenizer(output_folder=f"{work}/tokens", tokenizer_name_or_path=tokenizer,
                               eos_token="<|endoftext|>", shuffle_documents=False)], workers, "tokenize", clusters)
final.run()
'''


def datatrove(corpus: Path, work: Path, workers: int) -> dict:
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = work / "gpt2-tokenizer.json"
    ByteLevelBPETokenizer(str(GPT2 / "encoder.json"), str(GPT2 / "vocab.bpe")).save(str(tokenizer))
    # JsonlReader reads a folder; the corpus is split into as many files as workers so that the
    # first stage gets as many tasks as ours does.
    corpus_dir = work / "input"
    corpus_dir.mkdir()
    files = [open(corpus_dir / f"part_{i}.jsonl", "w", encoding="utf-8") for i in range(workers)]
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            files[i % workers].write(line)
    for f in files:
        f.close()
    seconds, peak = run_measured([sys.executable, "-c", DATATROVE_SCRIPT, str(corpus_dir), str(work), str(tokenizer),
                                  str(workers)])

    def counted(stage: str, step_name: str, key: str) -> int:
        """A document count from datatrove's own stats.json of a stage."""
        for step in json.loads((work / "logs" / stage / "stats.json").read_text()):
            if step_name in step["name"]:
                return int(step["stats"][key])
        raise KeyError(f"{stage}: no step {step_name!r}")

    return {"seconds": round(seconds, 1), "peak_mb": round(peak / 2**20),
            "documents_read": counted("filter", "Gopher", "total"),
            "after_filters": counted("filter", "Gopher", "forwarded"),
            "after_dedup": counted("tokenize", "MinHash stage 4", "forwarded")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[75, 300])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datatrove", action="store_true", help="also run datatrove (and ours, Gopher filters only)")
    parser.add_argument("--datatrove-mb", type=float, default=None,
                        help="corpus size for the side-by-side run (default: the smallest of --sizes-mb)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results: dict = {"workers": args.workers, "cpus": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from scratchlm.tokenizer import Tokenizer

        tok_dir = tmp / "gpt2"
        Tokenizer.from_gpt2(GPT2 / "encoder.json", GPT2 / "vocab.bpe").save(tok_dir)
        for size in args.sizes_mb:
            corpus = tmp / f"corpus_{size:g}mb.jsonl"
            documents = make_corpus(corpus, size)
            mb = corpus.stat().st_size / 1e6
            figures = ours(corpus, tok_dir, tmp / f"out_{size:g}", args.workers, gopher_only=False)
            figures.update(input_mb=round(mb, 1), documents=documents, mb_per_s=round(mb / figures["seconds"], 2))
            results["sizes"][f"{size:g}"] = figures
            print(f"{size:g} MB, default filters: {figures}", flush=True)
            shutil.rmtree(tmp / f"out_{size:g}")
            corpus.unlink()
        sizes = sorted(results["sizes"], key=float)
        small, large = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
        results["peak_ratio_largest_over_smallest"] = round(large["peak_mb"] / small["peak_mb"], 2)
        print(f"peak memory {sizes[-1]} MB / {sizes[0]} MB: {results['peak_ratio_largest_over_smallest']}x")
        if args.datatrove:
            size = args.datatrove_mb or float(sizes[0])
            corpus = tmp / f"corpus_side_by_side_{size:g}mb.jsonl"
            make_corpus(corpus, size)
            gopher = ours(corpus, tok_dir, tmp / "ours_gopher", args.workers, gopher_only=True)
            gopher["mb_per_s"] = round(corpus.stat().st_size / 1e6 / gopher["seconds"], 2)
            (tmp / "datatrove").mkdir()
            theirs = datatrove(corpus, tmp / "datatrove", args.workers)
            theirs["mb_per_s"] = round(corpus.stat().st_size / 1e6 / theirs["seconds"], 2)
            results["side_by_side"] = {"corpus_mb": size, "ours_gopher_only": gopher, "datatrove": theirs,
                                       "ours_over_datatrove_time": round(gopher["seconds"] / theirs["seconds"], 2)}
            print(f"side by side on {size:g} MB: ours {gopher}\ndatatrove {theirs}\n"
                  f"time ours/datatrove {results['side_by_side']['ours_over_datatrove_time']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
