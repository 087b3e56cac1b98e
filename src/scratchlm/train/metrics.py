"""Run metrics: one JSON line per record, TensorBoard when installed, a loss-curve PNG, MFU.

Only rank 0 creates a `MetricsLog` that writes; the others get a disabled one, so call sites
need no rank checks.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from scratchlm.fsutil import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self._tensorboard_dir = run_dir / "tensorboard" if enabled and tensorboard else None
        self._tb = None  # opened at the first record, so a run refused at setup leaves no files

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint: those steps are about to be redone,
        and keeping both copies would draw the curve twice."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Appending a line is the one write not done atomically: a crash can at worst cut the
        # last line, which read_metrics skips.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None and self._tensorboard_dir is not None:
            self._tb = _tensorboard_writer(self._tensorboard_dir)
            self._tensorboard_dir = None  # one attempt: tensorboard may not be installed
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return records


_NOT_PLOTTED = {"step", "tokens", "elapsed_s", "val_loss", "val_bpb"}


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """Training loss (and validation loss at eval steps) against tokens seen; other figures
    of the evaluations (DPO's preference accuracy and reward margin) in a second panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; works on headless training nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    evals = [r for r in records if r.get("kind") == "eval"]
    others = sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float))} - _NOT_PLOTTED)
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 7, 4), squeeze=False)
    ax = axes[0][0]
    for kind, key, style in (("train", "loss", "-"), ("eval", "val_loss", "o-")):
        points = [(r["tokens"], r[key]) for r in records if r.get("kind") == kind and key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per target)")
    ax.grid(alpha=0.3)
    ax.legend()
    if others:
        extra = axes[0][1]
        for key in others:
            points = [(r["tokens"], r[key]) for r in evals if r.get(key) is not None]
            extra.plot(*zip(*points), "o-", label=key.replace("_", " "), markersize=3)
        extra.set_xlabel("tokens")
        extra.grid(alpha=0.3)
        extra.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buf.getvalue())


def matched_gpu(device: torch.device) -> str | None:
    """The key of the peak-FLOP/s table (model.accounting.GPU_PEAK_FLOPS) that the CUDA device's
    name matched ("H100", "H200", ...), or None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    from scratchlm.errors import ScratchLMError
    from scratchlm.model.accounting import gpu_key

    try:
        return gpu_key(torch.cuda.get_device_name(device))
    except ScratchLMError:
        return None


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device from the model stage's table, or None (CPUs and
    unknown GPUs: MFU is then reported as n/a). MFU is always quoted against the bf16 peak,
    the precision large runs train in."""
    from scratchlm.model.accounting import GPU_PEAK_FLOPS

    gpu = matched_gpu(device)
    return None if gpu is None else GPU_PEAK_FLOPS[gpu]


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak: float | None,
                            world_size: int) -> float | None:
    """Achieved model FLOP/s over the hardware peak (PaLM's MFU: model FLOPs only, not the
    recomputation done by activation checkpointing)."""
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)
