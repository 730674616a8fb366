"""Injected faults (mhd_hpc/runtime/signals.py): MHD_INJECT_FAULT is parsed for its own rank only."""

import pytest

from mhd_hpc.runtime.signals import Fault


def test_fault_spec_is_parsed_for_its_rank_only(monkeypatch):
    monkeypatch.setenv("MHD_INJECT_FAULT", "1:20:kill_in_checkpoint")
    assert Fault.for_rank(0) is None
    fault = Fault.for_rank(1)
    assert fault.in_checkpoint(20) and not fault.in_checkpoint(10)
    fault.at_step_start(20)  # the checkpoint mode does nothing at the start of a step
    monkeypatch.setenv("MHD_INJECT_FAULT", "0:3")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        Fault.for_rank(0).at_step_start(3)
    monkeypatch.setenv("MHD_INJECT_FAULT", "0:3:explode")
    with pytest.raises(ValueError, match="RANK:STEP"):
        Fault.for_rank(0)


def test_a_straggler_is_stretched_by_its_factor(monkeypatch):
    import time

    monkeypatch.setenv("MHD_INJECT_FAULT", "0:5:slow:3")
    fault = Fault.for_rank(0)
    assert fault.mode == "slow" and fault.factor == 3.0
    t0 = time.perf_counter()
    fault.after_step(4, 0.05)  # before its step: full speed
    assert time.perf_counter() - t0 < 0.03
    fault.after_step(5, 0.05)  # from its step on: 2 x 50 ms more
    assert time.perf_counter() - t0 >= 0.1
    monkeypatch.setenv("MHD_INJECT_FAULT", "0:5:pause:0.2")
    fault = Fault.for_rank(0)
    t0 = time.perf_counter()
    fault.at_step_start(4)
    assert time.perf_counter() - t0 < 0.1
    fault.at_step_start(5)  # an outage: the rank stands still for 0.2 s
    assert time.perf_counter() - t0 >= 0.2
    for bad in ("0:5:slow", "0:5:slow:0.5", "0:5:kill:3", "0:5:pause"):
        monkeypatch.setenv("MHD_INJECT_FAULT", bad)
        with pytest.raises(ValueError, match="FACTOR"):
            Fault.for_rank(0)
