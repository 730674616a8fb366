"""Injected faults (mhd_hpc/signals.py): MHD_INJECT_FAULT is parsed for its own rank only."""

import pytest

from mhd_hpc.signals import Fault


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
