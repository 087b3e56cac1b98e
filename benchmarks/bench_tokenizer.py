"""Tokenizer benchmarks, each a ratio against a baseline measured in the same run.

1. Training, vocab 10,000 on TinyStories (valid head) + Tiny Shakespeare + wiki_demo:
   our train_bpe vs Hugging Face `tokenizers` BpeTrainer (byte-level, same vocab size, same
   special token). Goal: within 2x (ideally <= 1x).
2. Training, vocab 500 on a 130 KB corpus (first 130 KB of TinyStories): absolute (< 0.5 s), with
   the HF time beside it.
3. Encoding throughput of Tokenizer.encode vs raw tiktoken built from the same ranks, on all
   shared corpora concatenated: GPT-2's vocabulary and our trained 10k one. Goal: within 10%.
4. encode_iterable over a 5 MB file: tracemalloc peak (goal < 10 MB) and throughput.

Timings are the best of --repeats runs, baseline and ours interleaved: wall time for training
(both sides use several cores), CPU time of this process for encoding (both single-threaded).

    .venv/bin/python benchmarks/bench_tokenizer.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from scratchlm.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPORA = SHARED / "corpora"
TRAIN_FILES = [CORPORA / n for n in ("tinystories_valid_head.txt", "tinyshakespeare.txt", "wiki_demo.txt")]
ALL_CORPORA = sorted(CORPORA.iterdir())
EOT = "<|endoftext|>"


def timed(fn, clock=time.perf_counter) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def hf_train(files: list[Path], vocab_size: int) -> int:
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok.get_vocab_size()


def bench_training(files: list[Path], vocab_size: int, repeats: int) -> dict:
    ours = hf = float("inf")
    for _ in range(repeats):  # interleaved so both see the same machine load
        # Ours reads the files as documents (scratchlm.sources), as every command does.
        t, tokenizer = timed(lambda: Tokenizer.train(files, vocab_size, [EOT]))
        vocab = tokenizer.vocab
        ours = min(ours, t)
        t, hf_size = timed(lambda: hf_train(files, vocab_size))
        hf = min(hf, t)
    size = sum(f.stat().st_size for f in files)
    return {"input_bytes": size, "vocab_size": vocab_size, "ours_s": round(ours, 3), "hf_s": round(hf, 3),
            "ratio_ours_over_hf": round(ours / hf, 2), "ours_vocab": len(vocab), "hf_vocab": hf_size}


def bench_encoding(tokenizer: Tokenizer, text: str, repeats: int) -> dict:
    import tiktoken

    ranks = {t: i for i, t in tokenizer.vocab.items() if i not in tokenizer.special_tokens.values()}
    raw = tiktoken.Encoding("raw", pat_str=tokenizer._pattern_regex, mergeable_ranks=ranks,
                            special_tokens=tokenizer.special_tokens)
    tokenizer.encode("warm up")  # builds the tiktoken encoding once
    # Both are single-threaded, so CPU time (process_time) is compared: far less noisy than wall
    # time on a shared machine. The order alternates so neither always runs first.
    ours = base = float("inf")
    for r in range(repeats):
        for which in ("ours", "raw") if r % 2 else ("raw", "ours"):
            if which == "ours":
                t, ids = timed(lambda: tokenizer.encode(text), time.process_time)
                ours = min(ours, t)
            else:
                t, raw_ids = timed(lambda: raw.encode_ordinary(text), time.process_time)
                base = min(base, t)
    assert ids == raw_ids
    mb = len(text.encode()) / 1e6
    return {"mb": round(mb, 2), "ours_mb_per_cpu_s": round(mb / ours, 2), "tiktoken_mb_per_cpu_s": round(mb / base, 2),
            "ratio_ours_over_tiktoken_time": round(ours / base, 3)}


def bench_encode_iterable(tokenizer: Tokenizer, text: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "five_mb.txt"
        data = (text * (5_000_000 // len(text) + 1)).encode()
        path.write_bytes(data[: data.index(b"\n", 5_000_000) + 1])
        size = path.stat().st_size
        tracemalloc.start()
        start = time.perf_counter()
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in tokenizer.encode_iterable(f))
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        start = time.perf_counter()
        with open(path, encoding="utf-8") as f:
            sum(1 for _ in tokenizer.encode_iterable(f))
        untraced = time.perf_counter() - start
    return {"file_mb": round(size / 1e6, 2), "tokens": count, "peak_traced_mib": round(peak / 2**20, 2),
            "mb_s": round(size / 1e6 / untraced, 2), "mb_s_under_tracemalloc": round(size / 1e6 / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}

    results["train_vocab10k"] = bench_training(TRAIN_FILES, 10_000, args.repeats)
    print("train vocab 10k:", results["train_vocab10k"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "tinystories_130k.txt"
        small.write_bytes((CORPORA / "tinystories_valid_head.txt").read_bytes()[:130_000])
        results["train_vocab500_130kb"] = bench_training([small], 500, args.repeats)
    print("train vocab 500 on 130 KB:", results["train_vocab500_130kb"], flush=True)

    text = "".join(p.read_text(encoding="utf-8") for p in ALL_CORPORA)
    gpt2 = Tokenizer.from_gpt2(SHARED / "tokenizers/gpt2/encoder.json", SHARED / "tokenizers/gpt2/vocab.bpe")
    results["encode_gpt2"] = bench_encoding(gpt2, text, args.repeats)
    print("encode, GPT-2 vocab:", results["encode_gpt2"], flush=True)
    ours = Tokenizer.train(TRAIN_FILES, 10_000, [EOT])
    results["encode_trained10k"] = bench_encoding(ours, text, args.repeats)
    print("encode, trained 10k vocab:", results["encode_trained10k"], flush=True)

    results["encode_iterable_5mb"] = bench_encode_iterable(gpt2, text)
    print("encode_iterable 5 MB (GPT-2):", results["encode_iterable_5mb"], flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
