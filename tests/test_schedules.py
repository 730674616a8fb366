"""The learning-rate schedule (mhd_hpc/method/schedules.py): warm-up, cosine decay, constant, errors."""

import pytest

from mhd_hpc.method.schedules import learning_rate, lr_at


def test_lr_schedule_warmup_then_cosine_to_zero():
    """1-based steps, like distill_ramp: step 1 is the first training step."""
    assert lr_at(1, 0.1, 100, warmup_steps=10) == pytest.approx(0.01)
    assert lr_at(10, 0.1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(11, 0.1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(56, 0.1, 100, warmup_steps=10) == pytest.approx(0.05)
    assert lr_at(101, 0.1, 100, warmup_steps=10) == pytest.approx(0.0)
    assert lr_at(501, 0.1, 100) == pytest.approx(0.0)  # clamped past the end
    assert lr_at(71, 0.1, 100, schedule="constant") == 0.1
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(1, 0.1, 100, schedule="linear")
    lr = learning_rate(0.1, 100, 10, "cosine")
    assert [lr(s) for s in (1, 56, 101)] == [lr_at(s, 0.1, 100, 10) for s in (1, 56, 101)]
