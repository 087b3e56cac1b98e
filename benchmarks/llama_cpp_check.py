"""llama.cpp runs our GGUF files: the same token ids, the same greedy continuation, and how
fast it decodes beside us on the same CPU threads.

    pip install llama-cpp-python      # builds llama.cpp from source (~12 min on 2 cores); not a dependency
    .venv/bin/python benchmarks/llama_cpp_check.py [--model-dir DIR] [--threads 2] [--json FILE]

Models:
- `--model-dir`: a trained model directory; without it the script first trains one, the
  command below (5 minutes of a `small` Llama-style model on TinyStories):
      scratchlm run --corpus ../shared/data/corpora/tinystories_valid_head.txt --preset small \\
          --vocab-size 4096 --minutes 5 -o <tmp>/stories
- random-weight models for the other architectures: Llama with MHA, untied head, biases and
  rope_theta 500000 (a trained gpt2-pattern tokenizer); Qwen3-style q/k norms (gpt4-pattern
  tokenizer: llama.cpp's "llama-bpe" pre-tokenizer); GPT-2 124M's shape with GPT-2's own
  tokenizer (the decode-speed figure for a 124M model).

For each model: llama.cpp's tokenizer on every shared corpus (ids and detokenized bytes);
then for each of f32, f16, q8_0: greedy continuations of 5 prompts (48 tokens, our fp32
model against llama.cpp), teacher-forced logits over a context of text (max |difference|,
top-1 agreement), and decode tokens/s (128 tokens after a short prompt, greedy, KV cache, the
same number of threads) for llama.cpp and for us.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPORA = ["tinystories_valid_head.txt", "tinystories_train_head.txt", "tinyshakespeare.txt", "wiki_demo.txt",
           "c4_demo.jsonl"]
DTYPES = ("f32", "f16", "q8_0")
GREEDY_TOKENS, DECODE_TOKENS = 48, 128


def corpus_texts() -> dict[str, str]:
    texts = {}
    for name in CORPORA:
        text = (SHARED / "corpora" / name).read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        texts[name] = text
    return texts


def random_models(root: Path) -> dict[str, Path]:
    from scratchlm.model import ModelConfig, Transformer
    from scratchlm.model.directory import save_model
    from scratchlm.tokenizer import Tokenizer, train_bpe

    text = (SHARED / "corpora" / "tinystories_train_head.txt").read_text(encoding="utf-8")
    tokenizers = {pattern: Tokenizer(*train_bpe([text], 1024, pattern=pattern), ["<|endoftext|>"], pattern=pattern)
                  for pattern in ("gpt2", "gpt4")}
    tokenizers["gpt2-own"] = Tokenizer.from_gpt2(SHARED / "tokenizers/gpt2/encoder.json",
                                                 SHARED / "tokenizers/gpt2/vocab.bpe")
    specs = {
        "llama-mha-untied-bias": ("gpt2", "tiny", dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                                                        d_ff=704, tie_embeddings=False, bias=True,
                                                        rope_theta=500000.0)),
        "qwen3-qk-norm-gqa": ("gpt4", "tiny", dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=704,
                                                    qk_norm=True)),
        "gpt2-124m-shape": ("gpt2-own", "gpt2-124m", {}),
    }
    paths = {}
    for name, (tokenizer_name, preset, fields) in specs.items():
        tokenizer = tokenizers[tokenizer_name]
        config = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, context_length=512, **fields)
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():  # norms start at ones: perturb them too
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths[name] = save_model(root / name, model, tokenizer)
    return paths


def check_tokenizer(llm, tokenizer, texts: dict[str, str]) -> dict:
    result = {}
    for name, text in texts.items():
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        result[name] = {"tokens": len(ours), "ids_equal": theirs == ours,
                        "detokenize_equal": llm.detokenize(ours) == tokenizer.decode_bytes(ours)}
    return result


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def decode_rate(tokens_iter, n: int) -> float:
    """Tokens/s between the first token (prefill done) and the n-th."""
    start, count = None, 0
    for _ in tokens_iter:
        count += 1
        if count == 1:
            start = time.perf_counter()
        if count == n:
            break
    return (count - 1) / (time.perf_counter() - start)


def check_model(name: str, model_dir: Path, gguf_root: Path, texts: dict[str, str], threads: int) -> dict:
    from llama_cpp import Llama

    from scratchlm.export import export_gguf
    from scratchlm.model.directory import load_model

    model, tokenizer = load_model(model_dir)
    window = model.config.context_length
    prompts = [[tokenizer.eot_id] + tokenizer.encode(text[i * 4000:i * 4000 + 200])[:24]
               for i, text in enumerate(texts.values())]
    ours_greedy = [list(model.generate(torch.tensor([p]), GREEDY_TOKENS, temperature=0.0)) for p in prompts]
    forced = [tokenizer.eot_id] + tokenizer.encode(texts["tinystories_valid_head.txt"][:20000])[:window - 1]
    with torch.no_grad():
        ours_logits = model(torch.tensor([forced]))[0].numpy()
    ours_rate = decode_rate(model.generate(torch.tensor([prompts[0]]), DECODE_TOKENS, temperature=0.0),
                            DECODE_TOKENS)
    report = {"model": name, "params": model.num_params(), "architecture": model.config.position,
              "ours_decode_tok_s": ours_rate, "dtypes": {}}
    for dtype in DTYPES:
        path = export_gguf(model_dir, gguf_root / f"{name}-{dtype}.gguf", dtype=dtype, overwrite=True)
        llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, verbose=False)
        if dtype == "f32":
            report["tokenizer"] = check_tokenizer(llm, tokenizer, texts)
        theirs_greedy = [llama_greedy(llm, p, GREEDY_TOKENS) for p in prompts]
        llm.reset()
        llm.eval(forced)
        theirs_logits = np.array(llm.scores[:len(forced)])
        difference = np.abs(theirs_logits - ours_logits)
        fast = Llama(model_path=str(path), n_ctx=window, n_threads=threads, n_threads_batch=threads, verbose=False)
        rate = decode_rate(fast.generate(prompts[0], top_k=1, temp=0.0, repeat_penalty=1.0), DECODE_TOKENS)
        report["dtypes"][dtype] = {
            "file_mb": path.stat().st_size / 1e6,
            "greedy_equal": sum(a == b for a, b in zip(ours_greedy, theirs_greedy)),
            "greedy_first_difference": [first_difference(a, b) for a, b in zip(ours_greedy, theirs_greedy)],
            "logits_max_abs_diff": float(difference.max()),
            "logits_mean_abs_diff": float(difference.mean()),
            "top1_agreement": float((theirs_logits.argmax(-1) == ours_logits.argmax(-1)).mean()),
            "llama_cpp_decode_tok_s": rate,
        }
        del llm, fast
    return report


def train_default_model(root: Path) -> Path:
    out = root / "stories"
    subprocess.run([sys.executable, "-m", "scratchlm", "run", "--corpus",
                    str(SHARED / "corpora" / "tinystories_valid_head.txt"), "--preset", "small", "--vocab-size",
                    "4096", "--minutes", "5", "--stages", "tokenizer,data,pretrain", "-o", str(out), "--no-progress"],
                   check=True)
    return out / "pretrain" / "final"


def print_table(reports: list[dict], prompts: int) -> None:
    print("\n| model | params | tokenizer ids equal (corpora) | dtype | file MB | greedy equal | "
          "logits max abs diff | top-1 agree | llama.cpp tok/s | ours tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        tokenizer_ok = sum(v["ids_equal"] and v["detokenize_equal"] for v in r["tokenizer"].values())
        for dtype, d in r["dtypes"].items():
            print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {tokenizer_ok}/{len(r['tokenizer'])} | {dtype} | "
                  f"{d['file_mb']:.1f} | {d['greedy_equal']}/{prompts} | {d['logits_max_abs_diff']:.2g} | "
                  f"{d['top1_agreement']:.3f} | {d['llama_cpp_decode_tok_s']:.0f} | {r['ours_decode_tok_s']:.0f} | "
                  f"{d['llama_cpp_decode_tok_s'] / r['ours_decode_tok_s']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="a trained model (default: train one, 5 min)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    parser.add_argument("--json", type=Path, default=None, help="also write the full results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = corpus_texts()
    with tempfile.TemporaryDirectory(prefix="llama-cpp-check-") as tmp:
        root = Path(tmp)
        models = {"trained": args.model_dir or train_default_model(root)}
        models.update(random_models(root))
        reports = []
        for name, directory in models.items():
            print(f"checking {name}", file=sys.stderr)
            reports.append(check_model(name, directory, root, texts, args.threads))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    print_table(reports, prompts=len(CORPORA))


if __name__ == "__main__":
    main()
