"""`scratchlm sft`: the loss mask through the data directory and loader, the masked loss
against a hand computation, exact resume after a kill, a tiny model learning an instruction
task, and LoRA runs writing adapter directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scratchlm.data import TokenLoader
from scratchlm.data.loader import IGNORE
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import load_model, save_model
from scratchlm.post import FinetuneSettings, sft
from scratchlm.post.chat import add_chat_tokens, render_conversation, render_prompt, stop_ids
from scratchlm.post.data import fit_to_context, write_masked_data
from scratchlm.tokenizer import Tokenizer, train_bpe
from tests.conftest import REPO_ROOT
from tests.stop_at import wait_until_stopped

# A task a 2-layer model learns in a few hundred steps: each animal has one sound, asked in
# a few phrasings. Every reply must come out exactly and end its turn.
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "snake": "hiss", "horse": "neigh", "pig": "oink", "frog": "ribbit", "bee": "buzz"}
PHRASES = ("What sound does a {} make?", "Which noise comes from a {}?", "A {} says what?")


def _conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": phrase.format(animal)}, {"role": "assistant", "content": sound}]
            for animal, sound in SOUNDS.items() for phrase in PHRASES]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random-weight base model with a tokenizer learnt from the task's text (no chat tokens)."""
    texts = [m["content"] for c in _conversations() for m in c] + ["user\nassistant\n"]
    tokenizer = Tokenizer(*train_bpe(texts * 5, 300), ["<|endoftext|>"])
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=64, d_model=64,
                                     n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192)
    return save_model(tmp_path_factory.mktemp("base") / "model", Transformer(config), tokenizer)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "animals.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _conversations()))
    return path


# --------------------------------------------------------------------------- the loss mask
def test_loader_ignores_the_targets_outside_the_mask(base_dir, tmp_path):
    model, tokenizer = add_chat_tokens(*load_model(base_dir))
    rendered = [render_conversation(tokenizer, c) for c in _conversations()[:6]]
    sequences = [fit_to_context(r.ids, r.loss_mask, 64, tokenizer.eot_id)[:2] for r in rendered]
    write_masked_data(tmp_path / "data", tokenizer, {"train": sequences, "val": sequences[:1]}, {})
    loader = TokenLoader(tmp_path / "data", "train", 6, 64, packing="document")
    x, y = (torch.cat(parts) for parts in zip(*loader.one_pass()))  # every row once
    # Each target that is not ignored is an assistant token (or its end-of-turn), and every
    # one of those appears: the ids under the mask, all of them, nothing else.
    expected = sorted(i for ids, mask in sequences for i, m in zip(ids, mask) if m)
    assert sorted(y[y != IGNORE].tolist()) == expected
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert (y == im_end).sum() == 6 and (x == im_end).sum() == 12  # learnt at the reply, read after both turns


def test_masked_loss_equals_a_hand_computation(base_dir, tmp_path):
    model, tokenizer = add_chat_tokens(*load_model(base_dir))
    conversation = _conversations()[0]
    ids, mask = render_conversation(tokenizer, conversation)
    x = torch.tensor([ids[:-1]])
    targets = torch.tensor(ids[1:])
    trained = torch.tensor(mask[1:])
    y = torch.where(trained, targets, IGNORE)[None]
    with torch.no_grad():
        loss = model(x, y).item()
        log_probs = F.log_softmax(model(x)[0], dim=-1)
    # By hand: the mean over the reply's tokens (and its <|im_end|>) of -log p(token).
    positions = [t for t in range(len(ids) - 1) if mask[t + 1]]
    by_hand = -sum(log_probs[t, ids[t + 1]].item() for t in positions) / len(positions)
    assert loss == pytest.approx(by_hand, rel=1e-5)
    assert len(positions) == len(tokenizer.encode_ordinary(conversation[1]["content"])) + 1
    # Targets under the prompt do not matter: other ids there leave the loss as it is.
    scrambled = torch.where(trained, targets, torch.randint(0, tokenizer.vocab_size, targets.shape))
    with torch.no_grad():
        assert model(x, torch.where(trained, scrambled, IGNORE)[None]).item() == loss


# --------------------------------------------------------------------------- a run
def _settings(**fields) -> FinetuneSettings:
    base = dict(steps=120, lr=3e-3, batch_size=8, micro_batch_size=8, eval_every=0, threads=1, progress=False,
                val_fraction=0.1)
    return FinetuneSettings(**{**base, **fields})


def test_a_tiny_model_learns_the_instruction_task(base_dir, data_file, tmp_path):
    out = tmp_path / "chat"
    summary = sft(base_dir, [data_file], out, _settings(steps=250))
    assert summary["chat_tokens_added"] and summary["val_loss"] < summary["base_val_loss"]
    model, tokenizer = load_model(out)
    right = ended = 0
    for conversation in _conversations():
        prompt = torch.tensor([render_prompt(tokenizer, conversation[:1])])
        reply = list(model.generate(prompt, 8, temperature=0.0, stop_token=stop_ids(tokenizer)[0]))
        ended += len(reply) < 8
        right += tokenizer.decode(reply) == conversation[1]["content"]
    n = len(_conversations())
    assert right >= 0.95 * n and ended == n, (right, ended, n)
    # OUT_DIR is the chat model, with its summary, curve, the base with chat tokens, data, run.
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "summary.json", "loss.png", "base", "data", "train"} <= names
    assert json.loads((out / "summary.json").read_text())["replies_ended"] == summary["replies_ended"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT}")


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(base_dir, data_file, tmp_path):
    args = ["sft", str(base_dir), "--data", str(data_file), "--steps", "12", "--batch-size", "4",
            "--micro-batch-size", "2", "--lr", "1e-3", "--eval-every", "0", "--checkpoint-every", "4",
            "--threads", "1", "--no-progress", "--resume"]
    subprocess.run([sys.executable, "-m", "scratchlm", *args, "-o", str(tmp_path / "reference")], env=_env(),
                   check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    interrupted = tmp_path / "interrupted"
    for event in ("after-checkpoint", "mid-step"):
        proc = subprocess.Popen([sys.executable, "-m", "tests.stop_at", event, "--", *args, "-o", str(interrupted)],
                                env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_stopped(proc)
        finally:
            proc.kill()
            proc.wait()
    subprocess.run([sys.executable, "-m", "scratchlm", *args, "-o", str(interrupted)], env=_env(), check=True,
                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from safetensors.torch import load_file

    expected = load_file(str(tmp_path / "reference" / "model.safetensors"))
    got = load_file(str(interrupted / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_lora_sft_writes_an_adapter_directory(base_dir, data_file, tmp_path):
    out = tmp_path / "lora"
    summary = sft(base_dir, [data_file], out, _settings(steps=30, lora_rank=4, lr=1e-2))
    assert summary["val_loss"] < summary["base_val_loss"]
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    model, _ = load_model(out)  # the adapters merged into their base (OUT_DIR/base)
    base, _ = load_model(out / "base")
    trained = dict(model.named_parameters())
    changed = [name for name, p in base.named_parameters() if not torch.equal(p, trained[name])]
    # Only the projections that carry adapters changed; embeddings and norms are the base's.
    assert changed and all(".attn." in name or ".mlp." in name for name in changed)
    assert summary["trainable_params"] < 0.2 * summary["total_params"]


def test_data_errors_are_one_line(base_dir, tmp_path, capsys):
    from scratchlm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}\n')
    code = main(["sft", str(base_dir), "--data", str(bad), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2" in err and "wizard" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fit_to_context_cuts_the_end_and_counts(base_dir):
    model, tokenizer = add_chat_tokens(*load_model(base_dir))
    im_end = stop_ids(tokenizer)[0]
    conversation = _conversations()[0] + [{"role": "user", "content": "And a dog?"},
                                          {"role": "assistant", "content": "woof woof woof woof woof"}]
    ids, mask = render_conversation(tokenizer, conversation)
    whole, whole_mask, cut = fit_to_context(ids, mask, len(ids), tokenizer.eot_id, im_end)
    assert not cut and whole == ids[1:] and whole_mask == mask[1:]
    # Cut inside the second reply: the tokens kept are the first ones, and only the first,
    # complete reply is still trained on.
    first_end = ids.index(im_end, ids.index(im_end) + 1)  # the user turn's end, then the first reply's
    length = len(ids) - 4
    kept, kept_mask, cut = fit_to_context(ids, mask, length, tokenizer.eot_id, im_end)
    assert cut and kept == ids[1:length]
    assert kept_mask == mask[1:first_end + 1] + [False] * (length - 1 - first_end)
    # Cut inside the only reply: nothing left to train on.
    short = fit_to_context(ids, mask, first_end - 1, tokenizer.eot_id, im_end)
    assert short[2] and not any(short[1])


@pytest.mark.parametrize("max_new_tokens", [5, 40])
def test_batched_greedy_replies_equal_generating_each_alone(max_new_tokens):
    from scratchlm.post.finetune import greedy_replies

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300, context_length=48)).eval()
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 45, list(range(60))]  # ragged; one fills the context
    # The stop id: the third token of one free-running reply, so that row ends its turn early.
    stop = list(model.generate(torch.tensor([prompts[1]]), 3, temperature=0.0))[2]
    reference = []
    for prompt in prompts:
        budget = max(1, min(max_new_tokens, 48 - len(prompt[-48:])))
        ids = list(model.generate(torch.tensor([prompt[-48:]]), budget, temperature=0.0, stop_token=stop))
        reference.append((ids, len(ids) < budget))
    assert greedy_replies(model, None, prompts, stop, max_new_tokens) == reference
    assert reference[1] == (reference[1][0][:2], True)  # the row that met the stop id ended its turn
    assert greedy_replies(model, None, [], stop) == []
