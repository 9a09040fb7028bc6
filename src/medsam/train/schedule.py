"""The learning-rate schedule every trainer follows: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier of optimiser step ``step`` (0-based): linear warm-up, then cosine decay.

    Warm-up: ``(step + 1) / warmup_steps``; then ``min_ratio + (1 - min_ratio) x 0.5 (1 + cos(pi t))``
    with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``: 1 after the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
