"""Learning-rate schedules as a multiplier of the peak rate, driven by the budget used so far.

The run may be bounded by steps, tokens or wall-clock minutes, so the decay is expressed in
*progress*: the fraction of the budget used, in [0, 1]. With a step budget progress is
step / total_steps and these are the textbook formulas; with a time budget progress is
elapsed / budget, so the rate reaches min_lr exactly when the time runs out however fast
the steps turn out to be (an estimate of the total step count would drift with evaluation
pauses and machine load). The warmup is counted in steps in every case: it exists to let
Adam's second-moment estimates settle, which takes a number of updates, not of seconds.

`warmup_end` is the progress at which warmup finished (warmup_steps / total_steps for step
budgets; measured and stored in the checkpoint for time budgets), so the decay phase spans
exactly the rest of the budget.
"""

from __future__ import annotations

import math

from scratchlm.train.config import ScheduleSection


def lr_factor(cfg: ScheduleSection, step: int, progress: float, warmup_end: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # linear, reaching 1 on the last warmup step
    min_ratio = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        # Warmup-stable-decay (Hu et al. 2024, MiniCPM): hold the peak, then decay linearly
        # over the last decay_fraction of the budget. The stable phase can be extended without
        # knowing the budget up front, and the final decay recovers cosine's loss.
        decay_start = 1.0 - cfg.decay_fraction
        if progress <= decay_start:
            return 1.0
        t = min(1.0, (progress - decay_start) / cfg.decay_fraction)
        return 1.0 - (1.0 - min_ratio) * t
    span = 1.0 - warmup_end
    t = 1.0 if span <= 0 else min(1.0, max(0.0, (progress - warmup_end) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
