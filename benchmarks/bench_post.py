"""Base -> SFT -> DPO on this machine, with the figures the post-training issue asks for.

    .venv/bin/python benchmarks/bench_post.py [--work-dir DIR] [--base-minutes 1.5] [--sft-minutes 2]
                                              [--dpo-minutes 1.5] [--threads 2]

1. base: `scratchlm run` on the shared TinyStories samples (both heads, ~1 MB) for --base-minutes of pretraining
   (context 512, so that most instructions and their replies fit);
2. sft:  `scratchlm sft` on alpaca_en_demo.json for --sft-minutes (5% held out);
3. dpo:  `scratchlm dpo` on instruction_preference_1k.json for --dpo-minutes (5% held out).
Each is the CLI, in its own process. Printed: the held-out masked loss before and after SFT,
the share of greedy replies to held-out instructions that end their turn, DPO's held-out
preference accuracy and reward margin before and after, and three held-out instructions
answered by the base model (plain-text prompt), the SFT model and the DPO model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CORPUS = [SHARED / "corpora" / name for name in ("tinystories_train_head.txt", "tinystories_valid_head.txt")]
SFT_DATA = SHARED / "sft" / "alpaca_en_demo.json"
DPO_DATA = SHARED / "preference" / "instruction_preference_1k.json"
BIN = Path(sys.executable).parent


def scratchlm(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$ scratchlm " + " ".join(args), file=sys.stderr)
    subprocess.run([str(BIN / "scratchlm"), *args], env=env, check=True, cwd=REPO)


def replies(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 96) -> list[str]:
    """Greedy replies; the base model gets the plain-text format (it has no chat tokens)."""
    import torch

    from scratchlm.model.directory import load_model
    from scratchlm.post.chat import render_prompt, stop_ids, stop_strings

    model, tokenizer = load_model(model_dir)
    texts = []
    for messages in prompts:
        ids = torch.tensor([render_prompt(tokenizer, messages)])
        text = tokenizer.decode(model.generate(ids, max_new_tokens, temperature=0.0, stop_token=stop_ids(tokenizer)[0]))
        for stop in stop_strings(tokenizer):
            text = text.split(stop)[0]
        texts.append(text.strip())
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--base-minutes", type=float, default=1.5)
    parser.add_argument("--sft-minutes", type=float, default=2.0)
    parser.add_argument("--dpo-minutes", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for path in (*CORPUS, SFT_DATA, DPO_DATA):
        if not path.is_file():
            parser.error(f"{path} not found (the shared data beside the repository)")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        t = args.threads
        scratchlm("run", "--corpus", *map(str, CORPUS), "--minutes", str(args.base_minutes), "--context-length", "512",
                  "--micro-batch-size", "8", "--global-batch-tokens", "8192", "--vocab-size", "4096",
                  "--stages", "tokenizer,data,pretrain", "-o", str(work / "base"), "--overwrite", "--no-progress",
                  threads=t)
        base = work / "base" / "pretrain" / "final"
        scratchlm("sft", str(base), "--data", str(SFT_DATA), "-o", str(work / "sft"), "--minutes",
                  str(args.sft_minutes), "--overwrite", "--no-progress", threads=t)
        scratchlm("dpo", str(work / "sft"), "--data", str(DPO_DATA), "-o", str(work / "dpo"), "--minutes",
                  str(args.dpo_minutes), "--overwrite", "--no-progress", threads=t)
        sft = json.loads((work / "sft" / "summary.json").read_text())
        dpo = json.loads((work / "dpo" / "summary.json").read_text())
        base_run = json.loads((work / "base" / "pretrain" / "summary.json").read_text())
        shown = [r["messages"] for r in sft["replies"][:3]]
        answers = {name: replies(path, shown) for name, path in
                   (("base", base), ("sft", work / "sft"), ("dpo", work / "dpo"))}
        (work / "results.json").write_text(json.dumps({"sft": sft, "dpo": dpo, "answers": answers}, indent=2))

    print(f"base: {base_run['steps']} steps, {base_run['tokens']:,} tokens, val bpb {base_run['val_bpb']:.3f}\n")
    print("| stage | minutes | steps | held-out figure | before | after |")
    print("|---|---|---|---|---|---|")
    print(f"| sft (alpaca_en_demo, {sft['train_conversations']} conversations, {sft['truncated']} cut to the context) | "
          f"{args.sft_minutes} | {sft['steps']} | masked loss on replies | {sft['base_val_loss']:.3f} | "
          f"{sft['val_loss']:.3f} |")
    print(f"| sft | | | greedy replies that end their turn ({len(sft['replies'])} held-out instructions) | - | "
          f"{sft['replies_ended']:.0%} |")
    print(f"| dpo (instruction_preference_1k, {dpo['train_pairs']} pairs) | {args.dpo_minutes} | {dpo['steps']} | "
          f"preference accuracy | {dpo['base_val_preference_accuracy']:.3f} | {dpo['val_preference_accuracy']:.3f} |")
    print(f"| dpo | | | reward margin | {dpo['base_val_reward_margin']:.3f} | {dpo['val_reward_margin']:.3f} |")
    print()
    for i, messages in enumerate(shown):
        print(f"**{messages[-1]['content']!r}**\n")
        for name in ("base", "sft", "dpo"):
            print(f"- {name}: {answers[name][i]!r}")
        print()


if __name__ == "__main__":
    main()
