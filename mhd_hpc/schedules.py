"""Per-step schedules as pure functions of the step: the learning rate (and, later, the
distillation weights). Pure so that a resumed run computes exactly the values an uninterrupted
one would have, and so that they can be tested without training anything."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_at", "distill_ramp"]

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine") -> float:
    """Learning rate of 0-based ``step``: linear warm-up over ``warmup_steps``, then ``constant``
    or a ``cosine`` decay that reaches 0 at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def distill_ramp(step: int, warmup_steps: int) -> float:
    """Factor on the distillation weights at 1-based ``step``: ``step / warmup_steps`` during the
    warm-up, then 1 (always 1 without a warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)
