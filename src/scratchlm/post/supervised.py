"""Supervised fine-tuning: from a document completer to a model that answers in turns.

`sft(BASE_DIR, files, OUT_DIR)`:
1. reads the conversations (scratchlm.post.formats) and holds out a deterministic slice;
2. gives the base model the chat tokens if it lacks them (scratchlm.post.chat: new
   embedding rows at the mean embedding), saved as OUT_DIR/base;
3. renders every conversation to ids and a loss mask that is on the assistant's replies
   only (their end-of-turn token included: the model must learn to stop) and writes them as
   a data directory with a loss mask (scratchlm.post.data);
4. trains with the training loop: document packing with attention kept within each
   conversation, the prompt's targets ignored by the loss, the held-out masked loss measured
   before the first step (`base_val_loss`) and after;
5. makes OUT_DIR the chat model (or, with LoRA, an adapter directory on OUT_DIR/base or the
   given base) and writes summary.json with greedy replies to held-out prompts.

Packing versus padding: packed rows hold several conversations (no attention between
them), padded rows one each. Packing wastes fewer slots; the LOG has the measurement.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scratchlm.errors import ScratchLMError
from scratchlm.post.finetune import (BASE, DATA, TRAIN, FinetuneSettings, default_learning_rate, greedy_replies,
                                     prepare_output, publish, training_config)

REPLIES_SHOWN = 40  # held-out prompts answered at the end (summary.json)
SFT_LR = 3e-4  # peak learning rate at GPT-2 small's width (finetune.default_learning_rate)


def sft(base_dir: str | Path, data_files: list[str | Path], out_dir: str | Path,
        settings: FinetuneSettings | None = None, *, val_files: Sequence[str | Path] = (), resume: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the model in `base_dir` on the conversations of `data_files`; see the module
    docstring. The held-out conversations are those of `val_files` when given (then every
    conversation of `data_files` trains), else a deterministic slice of `data_files`.
    Returns the summary (also OUT_DIR/summary.json)."""
    from scratchlm.data import TokenLoader
    from scratchlm.model.directory import load_model, save_model
    from scratchlm.post.chat import add_chat_tokens, chat_format, render_prompt, stop_ids
    from scratchlm.post.data import files_fingerprint, prepare_masked_data
    from scratchlm.post.formats import read_sft_file, split_held_out
    from scratchlm.train import train

    settings = settings or FinetuneSettings()
    settings.check()
    if not data_files:
        raise ScratchLMError("sft: no --data file given")
    started = time.monotonic()
    conversations = [c for path in data_files for c in read_sft_file(path)]
    if val_files:
        train_set, val_set = conversations, [c for path in val_files for c in read_sft_file(path)]
        if not train_set or not val_set:
            raise ScratchLMError(f"sft: no conversations in the {'--data' if not train_set else '--val-data'} files")
    else:
        train_set, val_set = split_held_out(conversations, settings.val_fraction, settings.seed)
        if not train_set or not val_set:
            raise ScratchLMError(f"sft: {len(conversations)} conversation(s) are too few to hold out a validation "
                                 f"slice of {settings.val_fraction:.0%}; give more data, a larger --val-fraction "
                                 f"or --val-data")
    out_dir = prepare_output(Path(out_dir), resume, overwrite)  # after the data proved readable

    model, tokenizer = load_model(base_dir)
    start_dir = Path(base_dir)
    added_tokens = chat_format(tokenizer) != "chatml"
    if added_tokens:
        start_dir = out_dir / BASE
        if not (resume and (start_dir / "config.json").is_file()):  # a resumed run keeps its base
            model, tokenizer = add_chat_tokens(model, tokenizer)
            save_model(start_dir, model, tokenizer, extra={"chat_tokens_added_to": str(Path(base_dir).resolve())},
                       overwrite=True)
        model, tokenizer = load_model(start_dir)
    context = model.config.context_length

    fingerprint = files_fingerprint([*data_files, *val_files],
                                    {"val_fraction": settings.val_fraction, "seed": settings.seed,
                                     "val_files": len(val_files), "tokenizer": tokenizer.fingerprint(),
                                     "context": context})
    data_dir = out_dir / DATA
    stats = prepare_masked_data(data_dir, tokenizer, context, {"train": [[c] for c in train_set],
                                                               "val": [[c] for c in val_set]},
                                "chat", fingerprint, resume, {"conversations": len(conversations)})
    if stats["truncated"]:
        print(f"sft: {stats['truncated']} of {stats['conversations']} conversations are longer than the "
              f"context of {context} tokens and were cut to fit; a reply the cut runs through is not trained "
              f"on, so {stats['no_target_left']} conversations with no whole reply left were left out",
              file=sys.stderr)

    rows = TokenLoader(data_dir, "train", 1, context, packing="document").num_windows
    lr = default_learning_rate(SFT_LR, model.config.d_model, settings.lora_rank > 0)
    config = training_config(settings, start_dir, data_dir, context, rows, 1, default_lr=lr)
    run = train(config, out_dir / TRAIN, resume=resume, overwrite=overwrite)

    final, _ = load_model(run["final_dir"], device="cpu")
    asked = [_prompt_of(c) for c in val_set[:REPLIES_SHOWN]]
    replies = greedy_replies(final, tokenizer, [render_prompt(tokenizer, m) for m in asked], stop_ids(tokenizer)[0])
    summary = {
        "base_model": str(Path(base_dir).resolve()), "chat_tokens_added": added_tokens,
        "data": [str(Path(p).resolve()) for p in data_files],
        "val_data": [str(Path(p).resolve()) for p in val_files], **stats,
        "train_conversations": len(train_set), "val_conversations": len(val_set),
        "base_val_loss": (run.get("initial_eval") or {}).get("val_loss"), "val_loss": run["val_loss"],
        "steps": run["steps"], "tokens": run["tokens"], "train_seconds": run["elapsed_s"],
        "seconds": round(time.monotonic() - started, 1), "lora_rank": settings.lora_rank,
        "trainable_params": run["trainable_params"], "total_params": run["total_params"],
        "replies_ended": sum(ended for _, ended in replies) / max(len(replies), 1),
        "replies": [{"messages": [{"role": m.role, "content": m.content} for m in messages],
                     "reply": tokenizer.decode(ids), "ended": ended} for messages, (ids, ended) in zip(asked, replies)],
    }
    publish(out_dir, run, summary)
    return summary


def _prompt_of(conversation: list) -> list:
    """The messages before the conversation's last assistant turn: what the model answers."""
    last = max(i for i, message in enumerate(conversation) if message.role == "assistant")
    return conversation[:last]
