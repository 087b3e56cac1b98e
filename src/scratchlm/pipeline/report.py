"""The report card of `scratchlm run`: one page, top to bottom in pipeline order.

    report.json   the figures, for scripts
    report.md     the page in Markdown (plots linked from the run directory)
    report.html   the same page as one self-contained file: plots inlined as data: URIs, no
                  network asset, so it can be mailed or attached to an issue

The page is built once as a list of blocks (heading, paragraph, table, image, code) and
written by two small renderers, so the Markdown and the HTML never say different things.
Text in paragraphs and table cells may hold `code` and **bold**, nothing else.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchlm.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from scratchlm.pipeline.run import _Run

# A block: ("h1" | "h2" | "h3", text), ("p", text), ("table", header, rows), ("code", text),
# ("image", path relative to the run directory, caption).
Block = tuple


def write_report(run: _Run) -> dict[str, Any]:
    """Write report.json, report.md and report.html from run.json and the stages' files."""
    figures = report_figures(run)
    atomic_write_json(run.dir / "report.json", figures)
    blocks = report_blocks(run, figures)
    atomic_write_text(run.dir / "report.md", to_markdown(blocks, run.dir))
    atomic_write_text(run.dir / "report.html", to_html(blocks, run.dir, title=f"scratchlm run: {run.dir.name}"))
    return figures


# ---------------------------------------------------------------------- figures
def report_figures(run: _Run) -> dict[str, Any]:
    from scratchlm.model import count_params, load_config

    stages = run.state["stages"]
    pretrain, evaluation = stages.get("pretrain", {}), stages.get("eval", {})
    bpb = evaluation.get("bits_per_byte", {})
    config, _ = load_config(run.base_dir())
    return {
        "val_bpb": bpb.get("val_bpb"), "gzip_bpb": bpb.get("gzip_bpb"), "xz_bpb": bpb.get("xz_bpb"),
        "val_loss": bpb.get("val_loss"),
        "train_tokens_per_s": pretrain.get("tokens_per_s"), "mfu": pretrain.get("mfu"),
        "params": int(count_params(config).total),
        "train_tokens": pretrain.get("tokens"), "train_steps": pretrain.get("steps"),
        "sft": {k: v for k, v in stages.get("sft", {}).items() if k not in ("inputs", "finished")},
        "dpo": {k: v for k, v in stages.get("dpo", {}).items() if k not in ("inputs", "finished")},
        "chat": {k: v for k, v in evaluation.get("chat", {}).items() if k != "replies"},
        "suite": evaluation.get("suite", {}),
        "export": stages.get("export", {}).get("files", {}),
        "stage_seconds": {name: round(stages.get(name, {}).get("seconds", 0.0), 2) for name in run.settings.chain()},
        "base_model_dir": str(run.base_dir()),
        "model_dir": str(run.model_dir()),
        "hardware": _hardware(),
        "settings": run.state["settings"],
        "tokenizer": stages.get("tokenizer", {}),
        "data": stages.get("data", {}),
    }


def _hardware() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


# ---------------------------------------------------------------------- the page
def report_blocks(run: _Run, f: dict[str, Any]) -> list[Block]:
    s = run.state["settings"]
    stages = run.state["stages"]
    blocks: list[Block] = [
        ("h1", f"scratchlm run report: {run.dir.name}"),
        ("p", f"Corpus {', '.join(f'`{c}`' for c in s['corpus'])}; a {f['params']:,}-parameter `{s['preset']}` "
              f"model pretrained {_fmt(stages.get('pretrain', {}).get('minutes'), '.1f')} min"
              + (", then instruction-tuned" if f["chat"] else "") + f". Result: `{f['model_dir']}`. "
              f"Total time {sum(f['stage_seconds'].values()) / 60:.1f} min."),
    ]
    blocks += _data_blocks(run, f)
    blocks += _pretraining_blocks(run, f)
    blocks += _post_training_blocks(run, f)
    blocks += _evaluation_blocks(run, f)
    blocks += _sample_blocks(run)
    blocks += _export_blocks(f)
    blocks += [("h2", "Time per stage"),
               ("table", ["stage", "seconds"], [[name, f"{sec:.1f}"] for name, sec in f["stage_seconds"].items()])]
    hw = f["hardware"]
    blocks += [("h2", "Hardware"),
               ("p", f"{hw['platform']}, Python {hw['python']}, torch {hw['torch']}, {hw['cpu_count']} CPUs, "
                     f"GPU: {hw['gpu'] or 'none'}.")]
    commands = [("reproduce", run.state.get("command", "scratchlm run")), *use_commands(run)]
    blocks += [("h2", "Reproduce and use"),
               ("code", "\n\n".join(f"# {what}\n{command}" for what, command in commands))]
    return blocks


def _data_blocks(run: _Run, f: dict[str, Any]) -> list[Block]:
    from scratchlm.data import format_stats_table, read_manifest
    from scratchlm.model import load_config
    from scratchlm.model.report import model_info

    tok = f["tokenizer"]
    config, _ = load_config(run.base_dir())
    return [
        ("h2", "Data"),
        ("p", "Documents and bytes after each step of cleaning, filtering and deduplication, what each filter "
              "dropped, and the tokens of each split:"),
        ("code", format_stats_table(read_manifest(run.dir / "data"))),
        ("h2", "Tokenizer"),
        ("p", f"Byte-level BPE, {tok.get('vocab_size')} tokens, trained on {_fmt(tok.get('sample_bytes'), ',')} "
              f"bytes in {_fmt(tok.get('train_seconds'), '.1f')} s ({_fmt(tok.get('train_mb_per_s'), '.2f')} MB/s); "
              f"{_fmt(tok.get('bytes_per_token'), '.2f')} bytes per token on held-out text."),
        ("h2", "Model"),
        ("code", model_info(config, "model")),
    ]


def _pretraining_blocks(run: _Run, f: dict[str, Any]) -> list[Block]:
    mfu = _fmt(f["mfu"], ".1%") if f["mfu"] else "n/a (no GPU peak known for this device)"
    return [
        ("h2", "Pretraining"),
        ("image", "pretrain/loss.png", "pretraining loss (train and held-out) against tokens seen"),
        ("table", ["", ""], [["steps", str(f["train_steps"])], ["tokens", _fmt(f["train_tokens"], ",")],
                             ["throughput", f"{_fmt(f['train_tokens_per_s'], ',.0f')} tokens/s"], ["MFU", mfu]]),
    ]


def _post_training_blocks(run: _Run, f: dict[str, Any]) -> list[Block]:
    sft, dpo = f["sft"], f["dpo"]
    blocks: list[Block] = [("h2", "Instruction tuning (SFT)")]
    if not sft.get("done"):
        return [*blocks, ("p", f"Not run: {sft.get('skipped', 'the stage was left out of this run')}.")]
    if sft.get("instructions") == "--sft-data":
        source = f"the conversations of {', '.join(f'`{Path(p).name}`' for p in sft['data'])}"
    else:
        source = (f"{sft['train_pairs']:,} instruction/answer pairs derived from the corpus (a documented "
                  f"function's docstring asks for it, its body answers), {sft['val_pairs']:,} held out from the "
                  f"held-out files")
    blocks += [
        ("p", f"Trained on {source}: loss on the assistant's replies only. {sft['truncated']} of "
              f"{sft['conversations']} conversations were cut to the context."),
        ("image", "sft/loss.png", "SFT loss on replies (train and held-out) against tokens seen"),
        ("table", ["", ""], [["steps", str(sft["steps"])], ["tokens", f"{sft['tokens']:,}"],
                             ["held-out reply loss before / after", f"{sft['base_val_loss']:.3f} / {sft['val_loss']:.3f}"]]),
    ]
    if dpo.get("done"):
        blocks += [
            ("h2", "Preference tuning (DPO)"),
            ("image", "dpo/loss.png", "DPO loss, preference accuracy and reward margin"),
            ("table", ["", ""], [["steps", str(dpo["steps"])], ["pairs", f"{dpo['train_pairs']:,}"],
                                 ["held-out preference accuracy before / after",
                                  f"{dpo['base_val_preference_accuracy']:.3f} / {dpo['val_preference_accuracy']:.3f}"]]),
        ]
    return blocks


def _evaluation_blocks(run: _Run, f: dict[str, Any]) -> list[Block]:
    ev = run.state["stages"].get("eval", {})
    bpb = ev.get("bits_per_byte", {})
    rows = [
        ["bits per byte, held-out text (base model)", _fmt(f["val_bpb"]),
         f"gzip -9 {_fmt(f['gzip_bpb'])}, xz -9 {_fmt(f['xz_bpb'])}"],
    ]
    chat = f["chat"]
    if chat:
        rows.append(["held-out reply loss (nats/token), before / after SFT",
                     f"{chat['sft_base_val_loss']:.3f} / {chat['sft_val_loss']:.3f}", "-"])
        replies = ev["chat"]["replies"]
        rows.append(["greedy replies to held-out instructions that end their turn",
                     f"{chat['replies_ended']:.0%} ({sum(r['ended'] for r in replies)}/{len(replies)})", "-"])
        if "val_preference_accuracy" in chat:
            rows.append(["held-out preference accuracy after DPO", f"{chat['val_preference_accuracy']:.3f}",
                         "chance 0.5"])
    blocks: list[Block] = [
        ("h2", "Evaluation"),
        ("p", f"Bits per byte on {bpb.get('eval_documents', 0)} held-out documents "
              f"({bpb.get('eval_bytes', 0):,} bytes), each scored and compressed on its own. Lower is better; "
              f"below xz means the model predicts this text better than a strong general-purpose compressor."),
        ("table", ["measurement", "this model", "reference"], rows),
        ("h3", "Benchmarks (scored as lm-evaluation-harness scores them, base model)"),
    ]
    suite = f["suite"]
    if "tasks" not in suite:
        return [*blocks, ("p", f"Not run: {suite.get('skipped', 'the eval stage has not run')}.")]
    rows = []
    for name, metrics in suite["tasks"].items():
        if name == "core":
            rows.append(["core (mean centered accuracy)", "-", f"{metrics['centered_accuracy']:.3f}", "0.000"])
            continue
        metric = "acc_norm" if "acc_norm" in metrics else "acc"
        rows.append([f"{name} ({metric})", str(metrics.get("n", "-")), f"{metrics[metric]:.3f}",
                     _fmt(metrics.get("chance"))])
    return [*blocks,
            ("p", f"The first {suite['limit']} items of each task (of each MMLU subject); a tiny model scores near "
                  f"chance, so read each figure against its chance level."),
            ("table", ["task", "items", "score", "chance"], rows)]


def _sample_blocks(run: _Run) -> list[Block]:
    import json

    path = run.dir / "samples.json"
    if not path.exists():
        return []
    samples = json.loads(path.read_text())
    blocks: list[Block] = [("h2", "Samples"), ("p", "The base model continuing prompts (temperature 0.8, top-k 50):")]
    for sample in samples["continuations"]:
        blocks.append(("code", sample["prompt"] + sample["completion"]))
    if samples["answers"]:
        blocks.append(("p", "Held-out instructions answered greedily by the base model (plain-text "
                            "'User:/Assistant:' prompt) and by the chat model:"))
        for answer in samples["answers"]:
            blocks += [("p", f"**Instruction:** {answer['instruction']}"),
                       ("p", "Base model:"), ("code", answer["base"] or "(nothing)"),
                       ("p", "Chat model:"), ("code", answer["chat"] or "(nothing)")]
    return blocks


def _export_blocks(f: dict[str, Any]) -> list[Block]:
    if not f["export"]:
        return [("h2", "Export"), ("p", "Not run.")]
    return [("h2", "Export"),
            ("p", f"`{f['model_dir']}` for transformers (a Hugging Face directory) and llama.cpp/Ollama (GGUF, f16):"),
            ("table", ["file", "bytes"], [[f"`{name}`", f"{size:,}"] for name, size in f["export"].items()])]


def use_commands(run: _Run) -> list[tuple[str, str]]:
    """(what it does, the exact command) for using the run's model."""
    from scratchlm.pipeline.run import EXPORT, GGUF_FILE

    model = _shown_path(run.model_dir())
    prompt = shlex.quote(run.hint_prompt())
    if run.final_stage() != "pretrain":
        commands = [("talk to the model", f"scratchlm chat {model}")]
    else:
        commands = [("sample from the model", f"scratchlm generate {model} --prompt {prompt} --max-tokens 200")]
    commands.append(("serve it: an OpenAI-compatible API and a chat page at http://127.0.0.1:8000/",
                     f"scratchlm serve {model}"))
    gguf = run.dir / EXPORT / GGUF_FILE
    if gguf.exists():  # llama.cpp reads the chat template from the file (-cnv: conversation mode)
        commands.append(("run the GGUF file in llama.cpp",
                         f"llama-cli -m {_shown_path(gguf)} -cnv" if run.final_stage() != "pretrain" else
                         f"llama-cli -m {_shown_path(gguf)} -p {prompt} -n 200"))
    return commands


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when inside it (as the user typed -o), else absolute."""
    try:
        return shlex.quote(str(path.resolve().relative_to(Path.cwd().resolve())))
    except ValueError:
        return shlex.quote(str(path))


def closing_message(run: _Run) -> str:
    import json

    path = run.dir / "report.json"
    f = json.loads(path.read_text()) if path.exists() else {}
    lines = ["", "Done."]
    if f.get("val_bpb") is not None:
        lines.append(f"Held-out bits per byte: model {_fmt(f['val_bpb'])}, gzip -9 {_fmt(f['gzip_bpb'])}, "
                     f"xz -9 {_fmt(f['xz_bpb'])}.")
    if f.get("chat"):
        lines.append(f"Chat model: held-out reply loss {f['chat']['sft_base_val_loss']:.3f} -> "
                     f"{f['chat']['sft_val_loss']:.3f}; {f['chat']['replies_ended']:.0%} of greedy replies end their turn.")
    lines += [f"Model:  {_shown_path(run.model_dir())}"]
    if path.exists():
        lines.append(f"Report: {_shown_path(run.dir / 'report.html')} (and report.md)")
    lines += ["Try it:", *[f"  {command}" for _, command in use_commands(run)]]
    return "\n".join(lines)


# ---------------------------------------------------------------------- renderers
def to_markdown(blocks: list[Block], base: Path) -> str:
    """The page in Markdown; images are linked by their path in the run directory `base`."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "code":
            fence = "````" if "```" in block[1] else "```"
            out += [fence, block[1], fence, ""]
        elif kind == "image":
            path, caption = block[1], block[2]
            out += [f"![{caption}]({path})" if (base / path).exists() else f"({caption}: no plot)", ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            out += [_md_row(header), "|" + "---|" * len(header), *[_md_row(row) for row in rows], ""]
    return "\n".join(out)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; }
th { background: #f3f3f3; } pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
code { font-size: 0.9em; } img { max-width: 100%; } figcaption { color: #666; font-size: 0.9em; }
"""


def to_html(blocks: list[Block], base: Path, title: str) -> str:
    """One self-contained page: the images (paths in the run directory `base`) inlined, no
    script, no external asset."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "image":
            path, caption = base / block[1], html.escape(block[2])
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                           f"<figcaption>{caption}</figcaption></figure>")
            else:
                out.append(f"<p>({caption}: no plot)</p>")
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                                 for row in rows) + "</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** as HTML."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
