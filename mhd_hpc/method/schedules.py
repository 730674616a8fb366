"""Per-step schedules as pure functions of the 1-based step (step 1 is the first training step):
the learning rate and the distillation ramp. Pure so that a resumed run computes exactly the
values an uninterrupted one would have, and so that they can be tested without training."""

from __future__ import annotations

import math
from typing import Callable
from mhd_hpc.config.choices import SCHEDULES  # noqa: F401 (re-exported)

__all__ = ["SCHEDULES", "lr_at", "learning_rate", "distill_ramp", "schedule_change_note"]



def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine") -> float:
    """Learning rate of 1-based ``step``: linear warm-up over the first ``warmup_steps`` steps,
    then ``constant`` or a ``cosine`` decay that reaches 0 after step ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    done = step - 1  # steps completed before this one
    if done < warmup_steps:
        return base_lr * (done + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - warmup_steps) / span)))


def learning_rate(base_lr: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine") -> Callable[[int], float]:
    """The job's learning rate as one function of the 1-based step, built once."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return lambda step: lr_at(step, base_lr, total_steps, warmup_steps, schedule)


def distill_ramp(step: int, warmup_steps: int) -> float:
    """Factor on the distillation weights at 1-based ``step``: ``step / warmup_steps`` during the
    warm-up, then 1 (always 1 without a warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def schedule_change_note(old_steps: int | None, steps: int, start: int, base_lr: float,
                         warmup_steps: int, schedule: str) -> str | None:
    """What a changed ``run.steps`` does to the learning rate from the resumed ``start`` on
    (None when nothing changes)."""
    if old_steps is None or not start or old_steps == steps or schedule == "constant":
        return None
    before = lr_at(start + 1, base_lr, old_steps, warmup_steps, schedule)
    after = lr_at(start + 1, base_lr, steps, warmup_steps, schedule)
    return (f"run.steps changed from {old_steps} to {steps} on resume: the {schedule} "
            f"learning-rate schedule now spans {steps} steps, so at step {start + 1} the lr is "
            f"{after:.6g} instead of {before:.6g} (and follows the new curve from there)")
