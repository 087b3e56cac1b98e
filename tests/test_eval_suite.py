"""`scratchlm eval`: the scorer against a plain forward pass (log-likelihoods to 1e-4), the task
prompts against lm-evaluation-harness's own definitions, chance on random weights, ~100% once
the gold answers are memorised (a mutation check of the whole scoring path), contamination,
and the command's outputs and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.eval.datasets import task_path
from scratchlm.eval.scoring import encode_pair, loglikelihoods
from scratchlm.eval.suite import evaluate, parse_tasks
from scratchlm.eval.tasks import MULTIPLE_CHOICE, load_items
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import load_model, save_model
from scratchlm.tokenizer import Tokenizer, train_bpe
from tests.conftest import SHARED_DATA, shared_file

EVAL_DATA = SHARED_DATA / "eval"


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.from_gpt2(shared_file("tokenizers/gpt2/encoder.json"), shared_file("tokenizers/gpt2/vocab.bpe"))


def _model(tokenizer: Tokenizer, seed: int = 0, **fields) -> Transformer:
    config = ModelConfig.from_preset("tiny", **{"vocab_size": tokenizer.vocab_size, "context_length": 128,
                                                "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                "d_ff": 128, **fields})
    torch.manual_seed(seed)
    return Transformer(config).eval()


def _items(task: str, shots: int = 0):
    return load_items(task, task_path(_shared_dir("eval"), task), shots)


def _shared_dir(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_dir():
        pytest.skip(f"shared data missing: {path}")
    return path


# --------------------------------------------------------------------------- the scorer
def test_token_boundaries_follow_the_harness(gpt2_tokenizer):
    eot = gpt2_tokenizer.eot_id
    # A trailing space of the context moves to the continuation; <|endoftext|> starts the text.
    context, continuation = encode_pair(gpt2_tokenizer, "Question: 2+2?\nAnswer: ", "4")
    assert context == [eot] + gpt2_tokenizer.encode("Question: 2+2?\nAnswer:")
    assert continuation == gpt2_tokenizer.encode(" 4")
    # The continuation is what follows as many tokens as the context has in the encoding of
    # the whole, even where the whole merges across the boundary ("hello"+"world").
    context, continuation = encode_pair(gpt2_tokenizer, "hello", "world")
    whole = [eot] + gpt2_tokenizer.encode("helloworld")
    assert context == [eot] + gpt2_tokenizer.encode("hello") and whole[1] != context[1]
    assert continuation == whole[len(context):]


def test_loglikelihoods_equal_a_plain_forward_pass(gpt2_tokenizer):
    """Hand-computed reference: one uncached forward over context + continuation (cut from the
    left to the window plus one, as the harness does), log-softmax, the continuation's tokens."""
    model = _model(gpt2_tokenizer, context_length=48)
    words = "the cat sat on a mat and then it ran far away into the big dark forest".split()
    generator = torch.Generator().manual_seed(0)
    requests = []
    for i in range(12):
        context = " ".join(words[int(j)] for j in torch.randint(0, len(words), (int(torch.randint(1, 80, (1,),
                                                                                        generator=generator)),),
                                                                 generator=generator))
        for n in range(1 + i % 4):  # 1-4 choices sharing the context; some contexts end in a space
            requests.append((context + (" " if n == 1 else ""), " " + " ".join(words[(i + n + k) % len(words)]
                                                                               for k in range(1 + n))))
    scores = loglikelihoods(model, gpt2_tokenizer, requests, batch_size=5, progress=False)
    window = model.config.context_length
    for (context, continuation), score in zip(requests, scores):
        context_ids, continuation_ids = encode_pair(gpt2_tokenizer, context, continuation)
        whole = (context_ids + continuation_ids)[-(window + 1):]
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0], dim=-1)
        n = len(continuation_ids)
        targets = torch.tensor(whole[-n:])
        expected = float(logprobs[-n:].gather(1, targets[:, None]).sum())
        assert score.loglikelihood == pytest.approx(expected, abs=1e-4)
        assert score.is_greedy == bool((logprobs[-n:].argmax(-1) == targets).all())
        assert score.tokens == n


def test_a_continuation_longer_than_the_context_is_refused(gpt2_tokenizer):
    model = _model(gpt2_tokenizer, context_length=4)
    with pytest.raises(ScratchLMError, match="does not fit the model's context of 4 tokens"):
        loglikelihoods(model, gpt2_tokenizer, [("A", " one two three four five six")], progress=False)


# --------------------------------------------------------------------------- prompts
def test_prompts_are_the_harness_prompts():
    """The first item of each shared file, against the harness's templates written out."""
    hellaswag = _items("hellaswag")[0]
    assert hellaswag.requests[0] == ("Pole vault: Pole vault is a sport where you run with a pole and stop and swing "
                                     "your body. A few women", " go down a rock and stop.")
    assert hellaswag.gold == 3 and hellaswag.choices[3].startswith("are in the gym")
    arc = _items("arc_easy")[0]
    assert arc.requests[0][0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                                  "of most food webs?\nAnswer:")
    assert arc.requests[0][1] == " Sunlight is the source of energy for nearly all ecosystems."
    piqa = _items("piqa")[0]
    assert piqa.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    winogrande = _items("winogrande")[0]
    assert winogrande.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                                   ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert winogrande.gold == 1
    lambada = _items("lambada_openai")[0]
    assert lambada.requests[0][0].endswith("I don't care about") and lambada.requests[0][1] == " signs"
    mmlu = _items("mmlu", shots=2)[0]
    context, continuation = mmlu.requests[0]
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert continuation == " A" and [c for _, c in mmlu.requests] == [" A", " B", " C", " D"]
    # The harness's template written out: two solved dev examples (never the question itself),
    # then the question.
    import csv

    with open(EVAL_DATA / "mmlu" / "dev" / "abstract_algebra_dev.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))

    def shown(row):
        return (row["question"].strip() + "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate("ABCD"))
                + "\nAnswer:")

    expected = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                + "".join(shown(row) + " " + "ABCD"[int(row["answer"])] + "\n\n" for row in rows[1:3]) + shown(rows[0]))
    assert context == expected and mmlu.gold == int(rows[0]["answer"])


def test_mmlu_shots_beyond_the_dev_set_are_refused():
    with pytest.raises(ScratchLMError, match="--shots 5 is more than the 4 dev examples"):
        _items("mmlu", shots=5)
    with pytest.raises(ScratchLMError, match="--shots applies to mmlu only"):
        _items("arc_easy", shots=1)


# --------------------------------------------------------------------------- accuracy
def test_random_weights_score_chance(gpt2_tokenizer, tmp_path):
    data = _shared_dir("eval")
    model_dir = save_model(tmp_path / "model", _model(gpt2_tokenizer, seed=3), gpt2_tokenizer)
    report = evaluate(model_dir, "core", limit=150, data_dir=data, progress=False)
    for task in MULTIPLE_CHOICE:
        metrics = report["tasks"][task]
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                assert abs(metrics[metric] - metrics["chance"]) <= 3 * metrics[f"{metric}_stderr"], (task, metrics)
    assert abs(report["tasks"]["core"]["centered_accuracy"]) < 0.1


def _memorise(model: Transformer, tokenizer: Tokenizer, texts: list[str], steps: int = 150) -> Transformer:
    """Train on the items' gold texts (each after <|endoftext|>, as scored) until they are learnt."""
    rows = [[tokenizer.eot_id] + tokenizer.encode(text) for text in texts]
    width = max(len(r) for r in rows)
    inputs = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = torch.tensor([r[1:] + [-1] * (width - len(r) + 1) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(inputs[:, :-1] if width > 1 else inputs, targets[:, :-1] if width > 1 else targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("task", ["hellaswag", "winogrande", "lambada_openai", "mmlu"])
def test_memorised_gold_answers_score_about_100(task, tmp_path):
    from scratchlm.eval.suite import score_task

    items = _items(task)[:16]
    texts = [item.requests[item.gold][0] + item.requests[item.gold][1] for item in items]
    # A small vocabulary learnt from these texts keeps the memorising quick.
    tokenizer = Tokenizer(*train_bpe(texts, 400), ["<|endoftext|>"])
    model = _memorise(_model(tokenizer, seed=1, context_length=512), tokenizer, texts)
    metrics, logs = score_task(task, items, model, tokenizer, batch_size=16, progress=False)
    assert metrics["acc"] >= 15 / 16, (task, metrics)
    # The mutation check: the same model, with the gold answers moved, scores low.
    if task != "lambada_openai":
        shifted = [type(item)(item.requests, item.choices, (item.gold + 1) % len(item.choices), item.text, item.where)
                   for item in items]
        assert score_task(task, shifted, model, tokenizer, batch_size=16, progress=False)[0]["acc"] <= 2 / 16


# --------------------------------------------------------------------------- contamination
def test_contamination_finds_the_items_in_the_training_data(gpt2_tokenizer, tmp_path):
    from scratchlm.data import PrepareConfig, prepare_data

    items = _items("hellaswag")[:20]
    corpus = tmp_path / "corpus.jsonl"
    leaked = [0, 3, 7]  # these items' texts are in the training data, inside other text
    with open(corpus, "w", encoding="utf-8") as f:
        for i in leaked:
            f.write(json.dumps({"text": f"Some page. {items[i].text} More words follow here."}) + "\n")
        for i in range(40):
            f.write(json.dumps({"text": f"An unrelated document number {i} about cooking pasta with tomatoes."}) + "\n")
    gpt2_tokenizer.save(tmp_path / "tokenizer")
    prepare_data([str(corpus)], tmp_path / "tokenizer", tmp_path / "data",
                 config=PrepareConfig(progress=False, workers=1, val_fraction=0.05, dedup=False, filter=False))
    # Which documents landed in val is the split's choice; the leaked ones must be in train.
    from scratchlm.data import iter_documents

    train_text = " ".join(gpt2_tokenizer.decode(list(doc)) for doc in iter_documents(tmp_path / "data", "train"))
    in_train = [i for i in leaked if items[i].text in train_text]
    assert in_train, "the split put every leaked document in val"
    model_dir = save_model(tmp_path / "model", _model(gpt2_tokenizer), gpt2_tokenizer)
    report = evaluate(model_dir, "hellaswag", limit=20, data_dir=EVAL_DATA,
                      contamination=tmp_path / "data", progress=False)
    assert report["tasks"]["hellaswag"]["contaminated"] == pytest.approx(len(in_train) / 20)

    other = Tokenizer.train([str(corpus)], vocab_size=300)
    other_dir = save_model(tmp_path / "other", _model(other), other)
    with pytest.raises(ScratchLMError, match="tokenized with another tokenizer"):
        evaluate(other_dir, "hellaswag", limit=5, data_dir=EVAL_DATA, contamination=tmp_path / "data",
                 progress=False)


# --------------------------------------------------------------------------- the command
def test_eval_command_writes_table_json_samples_and_eval_json(gpt2_tokenizer, tmp_path, capsys):
    data = _shared_dir("eval")
    model_dir = save_model(tmp_path / "model", _model(gpt2_tokenizer), gpt2_tokenizer)
    assert main(["eval", str(model_dir), "--tasks", "arc_easy,lambada_openai", "--limit", "12", "--data-dir",
                 str(data), "--json", str(tmp_path / "r.json"), "--log-samples", str(tmp_path / "s.jsonl"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| arc_easy | 12 | acc |" in out and "| lambada_openai | 12 | perplexity |" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["tasks"]) == {"arc_easy", "lambada_openai"}
    arc = report["tasks"]["arc_easy"]
    assert arc["n"] == 12 and 0 <= arc["acc"] <= 1 and arc["acc_stderr"] > 0
    assert math.isfinite(report["tasks"]["lambada_openai"]["perplexity"])
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {"prompt", "choices", "loglikelihoods", "prediction", "gold"} <= set(samples[0])
    # eval.json in the model directory gathers results task by task across runs.
    assert main(["eval", str(model_dir), "--tasks", "piqa", "--limit", "5", "--data-dir", str(data),
                 "--no-progress"]) == 0
    stored = json.loads((model_dir / "eval.json").read_text())
    assert set(stored["tasks"]) == {"arc_easy", "lambada_openai", "piqa"}
    # New weights saved into the directory make those results stale: they go.
    model, tokenizer = load_model(model_dir)
    save_model(model_dir, model, tokenizer, overwrite=True)
    assert not (model_dir / "eval.json").exists()


def test_eval_bad_input_is_one_line(gpt2_tokenizer, tmp_path, capsys):
    model_dir = save_model(tmp_path / "model", _model(gpt2_tokenizer), gpt2_tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    (data / "piqa.jsonl").write_text('{"query": "Question: a\\n", "choices": ["x", "y"], "gold": 0}\n{"query": \n')
    (data / "arc_easy.jsonl").write_text('{"query": "Question: a", "choices": ["x", "y"]}\n')

    def fails(argv: list[str], message: str) -> None:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code != 0 and message in err and err.count("\n") == 1, err

    base = ["eval", str(model_dir), "--data-dir", str(data), "--no-progress"]
    fails([*base, "--tasks", "hellaswag,sqaud"], "unknown task(s) sqaud (valid: hellaswag, arc_easy")
    fails([*base, "--tasks", "piqa"], f"{data / 'piqa.jsonl'}:2: not valid JSON")
    fails([*base, "--tasks", "arc_easy"], f"{data / 'arc_easy.jsonl'}:1: missing field 'gold'")
    fails([*base, "--tasks", "winogrande"], "winogrande")
    fails([*base, "--tasks", "piqa", "--limit", "0"], "--limit must be at least 1")
    fails([*base, "--tasks", "bpb"], "task bpb needs --bpb-data")
    fails(["eval", str(tmp_path / "nope"), "--tasks", "piqa"], "config.json: not found")
    short = save_model(tmp_path / "short", _model(gpt2_tokenizer, context_length=2), gpt2_tokenizer)
    fails(["eval", str(short), "--tasks", "arc_easy", "--data-dir", str(_shared_dir("eval")), "--limit", "3", "--no-progress"],
          "the model's context of 2 tokens is too short for any item")


def test_parse_tasks_expands_core():
    assert parse_tasks("core") == [*MULTIPLE_CHOICE, "core"]
    assert parse_tasks("piqa,core,piqa") == ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "mmlu",
                                             "core"]
