"""`scratchlm eval`: a model directory scored on the standard benchmarks.

    evaluate("runs/x/pretrain/final", ["core", "lambada_openai"], data_dir="eval_data", limit=500)

Tasks: the log-likelihood tasks of scratchlm.eval.tasks, `humaneval` (generated code run in
a sandbox), `bpb` (bits per byte on a prepared data directory's validation split) and `core`,
the six multiple-choice tasks with their centered accuracies averaged, as nanochat's CORE and
DCLM report: (acc - chance) / (1 - chance), acc_norm where the task has it. The results go
to the terminal (results_table), to `--json FILE`, and to `eval.json` in the model directory
(merged with earlier results, task by task).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from scratchlm.errors import ScratchLMError
from scratchlm.eval.tasks import LOGLIKELIHOOD_TASKS, MULTIPLE_CHOICE, Item, chance, load_items, mean_and_stderr

TASKS = (*LOGLIKELIHOOD_TASKS, "humaneval", "bpb", "core")


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """Task names from "a,b,c" (or a list); `core` brings in its six tasks. Unknown names are
    refused with the valid ones listed."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ScratchLMError(f"no task given (valid: {', '.join(TASKS)})")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ScratchLMError(f"unknown task(s) {', '.join(unknown)} (valid: {', '.join(TASKS)})")
    wanted = []
    for name in names:
        for task in (*MULTIPLE_CHOICE, "core") if name == "core" else (name,):
            if task not in wanted:
                wanted.append(task)
    return wanted


def evaluate(model_dir: str | os.PathLike, tasks: str | Sequence[str], *, limit: int | None = None, shots: int = 0,
             batch_size: int = 32, data_dir: str | os.PathLike | None = None, bpb_data: str | os.PathLike | None = None,
             contamination: str | os.PathLike | None = None, samples: int = 1, k: Sequence[int] = (1,),
             temperature: float = 0.8, seed: int = 0, device: str = "auto", json_path: str | os.PathLike | None = None,
             log_samples: str | os.PathLike | None = None, progress: bool = True, update_model_dir: bool = True,
             ) -> dict[str, Any]:
    """Score the model in `model_dir` on `tasks`; returns {"model", "settings", "tasks"}, also
    written to `json_path` and (unless `update_model_dir` is false) merged into the model
    directory's eval.json.

    `data_dir` holds the task files (layout: scratchlm.eval.datasets); without it they are
    downloaded once into the cache. `limit` scores the first N items of each task (of each
    subject, for MMLU). `samples`, `k`, `temperature` are HumanEval's (pass@k from `samples`
    completions per problem); `contamination` names the model's training data directory.
    """
    from scratchlm.model.directory import load_model
    from scratchlm.model.onednn import route_linears_through_onednn
    from scratchlm.train.distributed import pick_device

    names = parse_tasks(tasks)
    _check_settings(limit, shots, batch_size, samples, k, names, bpb_data)
    model, tokenizer = load_model(model_dir)
    if contamination is not None:
        from scratchlm.eval.contamination import check_tokenizer_matches

        check_tokenizer_matches(tokenizer, contamination)
    loglikelihood_tasks = [n for n in names if n in LOGLIKELIHOOD_TASKS]
    items = _load_task_items(loglikelihood_tasks, data_dir, limit, shots, progress) if loglikelihood_tasks else {}
    model = model.to(pick_device(device))
    route_linears_through_onednn(model)  # scoring needs no gradients (see scratchlm.model.onednn)
    results: dict[str, dict[str, Any]] = {}
    logs: list[dict[str, Any]] = []
    for name in names:
        if name in items:
            results[name], task_logs = score_task(name, items[name], model, tokenizer, batch_size, progress)
            logs += task_logs
        elif name == "humaneval":
            from scratchlm.eval.humaneval import evaluate_humaneval

            outcome = evaluate_humaneval(model, tokenizer, limit=limit, samples=samples, k=tuple(k),
                                         temperature=temperature, seed=seed, progress=progress)
            results[name] = {**outcome["metrics"], "n": outcome["n"]}
            logs += [{"task": name, **sample} for sample in outcome["samples"]]
        elif name == "bpb":
            results[name] = _bits_per_byte(model, tokenizer, bpb_data, limit, batch_size)
    if "core" in names:
        results["core"] = core_score(results, items)
    if contamination is not None and items:
        from scratchlm.eval.contamination import contaminated_items

        flags = contaminated_items({name: [tokenizer.encode_ordinary(item.text) for item in task_items]
                                    for name, task_items in items.items()}, contamination, progress=progress)
        for name, task_flags in flags.items():
            results[name]["contaminated"] = sum(task_flags) / len(task_flags)
    report = {"model": str(model_dir), "settings": {"limit": limit, "shots": shots, "data_dir": str(data_dir or ""),
                                                    "contamination": str(contamination or "")},
              "tasks": results}
    _write_outputs(report, Path(model_dir), json_path, log_samples, logs, update_model_dir)
    return report


def _check_settings(limit, shots, batch_size, samples, k, names, bpb_data) -> None:
    if limit is not None and limit < 1:
        raise ScratchLMError(f"--limit must be at least 1, got {limit}")
    if shots < 0:
        raise ScratchLMError(f"--shots must be 0 or more, got {shots}")
    if batch_size < 1:
        raise ScratchLMError(f"--batch-size must be at least 1, got {batch_size}")
    if samples < 1 or any(x < 1 or x > samples for x in k):
        raise ScratchLMError(f"pass@k needs 1 <= k <= samples (samples {samples}, k {', '.join(map(str, k))})")
    if "bpb" in names and bpb_data is None:
        raise ScratchLMError("task bpb needs --bpb-data DIR (a data directory made by `scratchlm data prepare`)")


def _load_task_items(names: list[str], data_dir, limit: int | None, shots: int, progress: bool) -> dict[str, list[Item]]:
    from scratchlm.eval.datasets import download_eval_data, task_path

    root = Path(data_dir) if data_dir is not None else download_eval_data(names, progress=progress)
    items = {}
    for name in names:
        loaded = load_items(name, task_path(root, name), shots)
        if limit is not None:
            loaded = _first_per_subject(loaded, limit) if name == "mmlu" else loaded[:limit]
        if not loaded:
            raise ScratchLMError(f"task {name}: {task_path(root, name)} holds no items")
        items[name] = loaded
    return items


def _first_per_subject(items: list[Item], limit: int) -> list[Item]:
    """MMLU is 57 subtasks in the harness, and its --limit applies to each."""
    kept, counts = [], {}
    for item in items:
        subject = item.where.rsplit(":", 1)[0]
        counts[subject] = counts.get(subject, 0) + 1
        if counts[subject] <= limit:
            kept.append(item)
    return kept


def score_task(name: str, items: list[Item], model, tokenizer, batch_size: int,
               progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of one log-likelihood task, and one log record per item. Items with a choice
    longer than the model's whole context cannot be scored; they are left out and counted
    (`skipped`); a task none of whose items fit is an error."""
    from scratchlm.eval.scoring import encode_pair, score_tokens

    window = model.config.context_length
    encoded = [[encode_pair(tokenizer, context, continuation) for context, continuation in item.requests]
               for item in items]
    fitting = [i for i, pairs in enumerate(encoded) if all(len(cont) <= window for _, cont in pairs)]
    if not fitting:
        raise ScratchLMError(f"task {name}: the model's context of {window} tokens is too short for any item")
    skipped = len(items) - len(fitting)
    items = [items[i] for i in fitting]
    requests = [pair for i in fitting for pair in encoded[i]]
    if progress:
        print(f"{name}: {len(items)} items, {len(requests)} requests"
              + (f" ({skipped} items longer than the context left out)" if skipped else ""), file=sys.stderr)
    scores = iter(score_tokens(model, requests, batch_size=batch_size, progress=progress))
    correct, correct_norm, lls_gold, logs = [], [], [], []
    for item in items:
        item_scores = [next(scores) for _ in item.requests]
        lls = [s.loglikelihood for s in item_scores]
        if name == "lambada_openai":
            prediction = 0 if item_scores[0].is_greedy else -1
            lls_gold.append(lls[0])
        else:
            prediction = max(range(len(lls)), key=lls.__getitem__)
            normalised = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
            correct_norm.append(float(max(range(len(lls)), key=normalised.__getitem__) == item.gold))
        correct.append(float(prediction == item.gold))
        logs.append({"task": name, "where": item.where, "prompt": item.requests[item.gold][0],
                     "choices": [continuation for _, continuation in item.requests], "loglikelihoods": lls,
                     "prediction": prediction, "gold": item.gold, "correct": prediction == item.gold})
    metrics: dict[str, Any] = {}
    metrics["acc"], metrics["acc_stderr"] = mean_and_stderr(correct)
    if name in ("hellaswag", "arc_easy", "arc_challenge", "piqa"):
        metrics["acc_norm"], metrics["acc_norm_stderr"] = mean_and_stderr(correct_norm)
    if name == "lambada_openai":
        metrics["perplexity"] = math.exp(-sum(lls_gold) / len(lls_gold))
    else:
        metrics["chance"] = chance(items)
    metrics["n"] = len(items)
    if skipped:
        metrics["skipped"] = skipped
    return metrics, logs


def core_score(results: dict[str, dict[str, Any]], items: dict[str, list[Item]]) -> dict[str, Any]:
    centered = {}
    for name in MULTIPLE_CHOICE:
        metrics = results[name]
        accuracy = metrics.get("acc_norm", metrics["acc"])
        centered[name] = (accuracy - metrics["chance"]) / (1 - metrics["chance"])
    return {"centered_accuracy": sum(centered.values()) / len(centered), "tasks": centered}


def _bits_per_byte(model, tokenizer, data_dir, limit: int | None, batch_size: int) -> dict[str, Any]:
    from itertools import islice

    from scratchlm.data.shards import iter_documents, read_manifest
    from scratchlm.eval.bpb import evaluate_bits_per_byte

    if read_manifest(data_dir)["tokenizer_hash"] != tokenizer.fingerprint():
        raise ScratchLMError(f"--bpb-data {data_dir}: tokenized with another tokenizer than the model's")
    documents = islice(iter_documents(data_dir, "val"), limit)
    result = evaluate_bits_per_byte(model, tokenizer, documents, context_length=model.config.context_length,
                                    batch_size=batch_size)
    return {"bits_per_byte": result.bits_per_byte, "loss_per_token": result.loss_per_token,
            "n": result.documents, "bytes": result.bytes}


def _write_outputs(report: dict[str, Any], model_dir: Path, json_path, log_samples, logs, update_model_dir) -> None:
    from scratchlm.fsutil import atomic_write_json, atomic_write_text

    if json_path is not None:
        atomic_write_json(json_path, report)
    if log_samples is not None:
        atomic_write_text(log_samples, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in logs))
    if update_model_dir:
        from scratchlm.model.directory import EVAL_FILE

        path = model_dir / EVAL_FILE
        earlier: dict[str, Any] = {}
        if path.is_file():
            try:
                earlier = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
            except (ValueError, AttributeError):
                earlier = {}  # an unreadable earlier file is replaced, not merged
        atomic_write_json(path, {**report, "tasks": {**earlier, **report["tasks"]}})


# --------------------------------------------------------------------------- terminal
def results_table(report: dict[str, Any]) -> str:
    """A markdown table: task, n, the main metrics with standard errors, contamination."""
    lines = ["| task | n | metric | value | stderr | contaminated |", "|---|---|---|---|---|---|"]
    for name, metrics in report["tasks"].items():
        if name == "core":
            lines.append(f"| core | - | centered accuracy | {metrics['centered_accuracy']:.4f} | - | - |")
            continue
        contaminated = f"{metrics['contaminated']:.1%}" if "contaminated" in metrics else "-"
        shown = [m for m in ("acc", "acc_norm", "perplexity", "bits_per_byte") if m in metrics]
        shown += sorted(m for m in metrics if m.startswith("pass@") and not m.endswith("_stderr"))
        for metric in shown:
            stderr = metrics.get(f"{metric}_stderr")
            lines.append(f"| {name} | {metrics.get('n', '-')} | {metric} | {metrics[metric]:.4f} | "
                         f"{'-' if stderr is None or math.isnan(stderr) else f'{stderr:.4f}'} | {contaminated} |")
    return "\n".join(lines)
