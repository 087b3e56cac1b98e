"""`scratchlm eval` against lm-evaluation-harness on the same HellaSwag items: wall time and accuracy.

    .venv/bin/python benchmarks/bench_eval.py [--model-dir DIR] [--gpt2] [--limit 500] [--batch-size 32]
                                              [--threads 2] [--repeats 1] [--adapter] [--work-dir DIR]

1. Models: --model-dir (a trained model directory) and/or, with --gpt2, a GPT-2-124M-shaped model
   with random weights (seed 0) on GPT-2's own tokenizer; random weights cost the same time as
   trained ones. Each is copied into the work directory (`scratchlm eval` writes eval.json beside
   the model) and exported with `scratchlm export hf` (float32).
2. The first --limit items of the shared hellaswag_val_1k.jsonl (the original HellaSwag format),
   scored one run after the other, each a fresh process with OMP_NUM_THREADS=MKL_NUM_THREADS=
   --threads, and timed from start to exit (model loading and the harness's task index included);
   --repeats R runs every configuration R times, in turn, and keeps the fastest:
     ours     scratchlm eval MODEL --tasks hellaswag --data-dir D --limit N --batch-size B
     harness  lm_eval --model hf --model_args pretrained=EXPORTED,dtype=float32 --tasks hellaswag_local
              --include_path benchmarks/lm_eval_tasks --limit N --device cpu, at its default batch
              size 1 and at B. hellaswag_local is the harness's own hellaswag task (its
              process_docs, imported) reading the same local file.
     adapter  (--adapter) python -m scratchlm.eval.harness --model scratchlm: the harness's
              machinery with our scorer.
3. Accuracy: acc and acc_norm of each run, and item by item: each item's acc and acc_norm against
   ours, and the largest difference of a log-likelihood. A markdown table goes to stdout, the
   figures to WORK_DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HELLASWAG = SHARED / "eval" / "hellaswag_val_1k.jsonl"
GPT2 = SHARED / "tokenizers" / "gpt2"
TASKS = REPO / "benchmarks" / "lm_eval_tasks"
BIN = Path(sys.executable).parent
LOADS: list[float] = []  # the 1-minute load average at the end of each run


# --------------------------------------------------------------------------- models
def gpt2_shaped(directory: Path) -> Path:
    import torch

    from scratchlm.model import ModelConfig, Transformer
    from scratchlm.model.directory import save_model
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gpt2(GPT2 / "encoder.json", GPT2 / "vocab.bpe")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("gpt2-124m", vocab_size=tokenizer.vocab_size))
    return save_model(directory, model, tokenizer)


def prepare(name: str, source: Path | None, work: Path) -> tuple[Path, Path]:
    """(our model directory, its Hugging Face export), both inside the work directory."""
    from scratchlm.export import export_hf

    ours, exported = work / name / "model", work / name / "hf"
    if not ours.is_dir():
        if source is None:
            gpt2_shaped(ours)
        else:
            shutil.copytree(source, ours)
            (ours / "eval.json").unlink(missing_ok=True)
    if not exported.is_dir():
        export_hf(ours, exported)
    return ours, exported


# --------------------------------------------------------------------------- runs
def timed(command: list[str], log: Path, threads: int) -> float:
    """Wall seconds of `command`, run alone with `threads` compute threads; its output goes to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(log.parent / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed (exit {done.returncode}); see {log}")
    LOADS.append(os.getloadavg()[0])  # other jobs on the machine slow every run alike; shown beside the table
    return seconds


def run_ours(model: Path, out: Path, args) -> dict:
    samples = out / "ours_samples.jsonl"
    command = [str(BIN / "scratchlm"), "eval", str(model), "--tasks", "hellaswag", "--data-dir",
               str(HELLASWAG.parent), "--limit", str(args.limit), "--batch-size", str(args.batch_size),
               "--log-samples", str(samples), "--json", str(out / "ours.json"), "--no-progress"]
    seconds = timed(command, out / "ours.log", args.threads)
    metrics = json.loads((out / "ours.json").read_text())["tasks"]["hellaswag"]
    items = []
    for line in samples.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        lls, gold = record["loglikelihoods"], record["gold"]
        # acc_norm divides by the choice's length without its leading space, as the harness.
        normalised = [ll / (len(choice) - 1) for ll, choice in zip(lls, record["choices"])]
        items.append({"lls": lls, "acc": float(record["correct"]),
                      "acc_norm": float(normalised.index(max(normalised)) == gold)})
    return {"seconds": seconds, "acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "items": items}


def run_harness(model_args: str, batch_size: int, out: Path, tag: str, args, adapter: bool = False) -> dict:
    results = out / tag
    shutil.rmtree(results, ignore_errors=True)  # an earlier round's files
    entry = [sys.executable, "-m", "scratchlm.eval.harness", "--model", "scratchlm"] if adapter else \
        [str(BIN / "lm_eval"), "--model", "hf"]
    command = entry + ["--model_args", model_args, "--tasks", "hellaswag_local", "--include_path", str(TASKS),
                       "--metadata", json.dumps({"hellaswag_file": str(HELLASWAG)}), "--limit", str(args.limit),
                       "--batch_size", str(batch_size), "--device", "cpu", "--log_samples",
                       "--output_path", str(results)]
    seconds = timed(command, out / f"{tag}.log", args.threads)
    metrics = json.loads(next(results.rglob("results_*.json")).read_text())["results"]["hellaswag_local"]
    samples = [json.loads(line) for line in next(results.rglob("samples_hellaswag_local_*.jsonl")).open()]
    items = [{"lls": [float(ll) for ll, _ in s["filtered_resps"]], "acc": s["acc"], "acc_norm": s["acc_norm"]}
             for s in sorted(samples, key=lambda s: s["doc_id"])]
    return {"seconds": seconds, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "items": items}


def agreement(ours: list[dict], theirs: list[dict]) -> dict:
    if len(ours) != len(theirs):
        raise SystemExit(f"item counts differ: ours {len(ours)}, harness {len(theirs)}")
    return {"acc_items_equal": sum(a["acc"] == b["acc"] for a, b in zip(ours, theirs)),
            "acc_norm_items_equal": sum(a["acc_norm"] == b["acc_norm"] for a, b in zip(ours, theirs)),
            "max_ll_difference": max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a["lls"], b["lls"]))}


def bench_model(name: str, source: Path | None, work: Path, args) -> list[dict]:
    model, exported = prepare(name, source, work)
    out = work / name / "runs"
    out.mkdir(parents=True, exist_ok=True)
    hf_args = f"pretrained={exported},dtype=float32"
    runs = {("scratchlm eval", args.batch_size): lambda: run_ours(model, out, args),
            ("harness hf", 1): lambda: run_harness(hf_args, 1, out, "hf_b1", args),
            ("harness hf", args.batch_size): lambda: run_harness(hf_args, args.batch_size, out, "hf_b", args)}
    if args.adapter:
        runs[("harness + scratchlm adapter", args.batch_size)] = \
            lambda: run_harness(f"path={model}", args.batch_size, out, "adapter", args, adapter=True)
    # Rounds run every configuration once, in turn; the fastest of each counts (a busy moment
    # on the machine then slows one round, not one configuration).
    best: dict[tuple[str, int], dict] = {}
    for round_ in range(args.repeats):
        for (label, batch), run in runs.items():
            print(f"{name}, round {round_ + 1}/{args.repeats}: {label}, batch {batch} ...", file=sys.stderr)
            result = run()
            if (label, batch) not in best or result["seconds"] < best[(label, batch)]["seconds"]:
                best[(label, batch)] = result
    ours = best[("scratchlm eval", args.batch_size)]
    rows = []
    for (label, batch), result in best.items():
        row = {"model": name, "run": label, "batch": batch, "seconds": round(result["seconds"], 1),
               "slower_than_ours": round(result["seconds"] / ours["seconds"], 2), "acc": result["acc"],
               "acc_norm": result["acc_norm"]}
        if result is not ours:
            row.update(agreement(ours["items"], result["items"]))
        rows.append(row)
    return rows


def table(rows: list[dict], limit: int) -> str:
    lines = ["| model | run | batch | wall s | time / ours | acc | acc_norm | items: same acc / acc_norm | "
             "max Δ loglik |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = f"{r['acc_items_equal']}/{limit} / {r['acc_norm_items_equal']}/{limit}" if "acc_items_equal" in r \
            else "-"
        delta = f"{r['max_ll_difference']:.1e}" if "max_ll_difference" in r else "-"
        lines.append(f"| {r['model']} | {r['run']} | {r['batch']} | {r['seconds']} | {r['slower_than_ours']:.2f}x | "
                     f"{r['acc']:.4f} | {r['acc_norm']:.4f} | {same} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="a trained model directory to score")
    parser.add_argument("--gpt2", action="store_true", help="also a random GPT-2-124M-shaped model")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs; the fastest of each counts")
    parser.add_argument("--adapter", action="store_true", help="also the harness with --model scratchlm")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep models, exports and logs here")
    args = parser.parse_args()
    if args.model_dir is None and not args.gpt2:
        parser.error("give --model-dir DIR and/or --gpt2")
    if not HELLASWAG.is_file():
        parser.error(f"{HELLASWAG} not found (the shared data beside the repository)")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        if args.model_dir is not None:
            rows += bench_model("trained", args.model_dir, work, args)
        if args.gpt2:
            rows += bench_model("gpt2-124m-shaped", None, work, args)
        (work / "results.json").write_text(json.dumps({"settings": vars(args) | {"model_dir": str(args.model_dir),
                                                                                  "work_dir": str(work)},
                                                       "rows": rows, "load_averages": LOADS}, indent=2))
    print(f"HellaSwag, first {args.limit} items of hellaswag_val_1k.jsonl; {args.threads} threads, CPU; load "
          f"average {min(LOADS):.1f}-{max(LOADS):.1f}\n")
    print(table(rows, args.limit))


if __name__ == "__main__":
    main()
