"""A client's saved and resumed state (mhd_hpc/run/client_state.py) on a world of one rank."""

import h5py
import pytest
import torch
from torch import nn

from mhd_hpc.method.targets import NoTargets
from mhd_hpc.run.checkpoint_files import CheckpointError
from mhd_hpc.run.client_state import ClientState


def trained(seed: int, steps: int = 3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # state: moments and step counts
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def state(tmp_path, world, fingerprints=("fp-new", "fp-old"), keep=3):
    return ClientState(tmp_path, world, keep=keep, fingerprints=fingerprints, arch="tiny",
                       with_pool=False)


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_a_fresh_folder_starts_at_step_zero(tmp_path, one_rank_world):
    model, opt = trained(0, steps=0)
    assert state(tmp_path, one_rank_world).resume(model, opt, NoTargets()) == (0, [])


def test_save_then_resume_gives_identical_model_optimizer_and_rng(tmp_path, one_rank_world):
    model, opt = trained(0)
    torch.manual_seed(123)
    state(tmp_path, one_rank_world).save(10, model, opt, NoTargets())
    expected_draw = torch.rand(3)  # the draw after the checkpoint
    other, other_opt = trained(1)  # a different model: everything must be overwritten
    torch.manual_seed(999)
    start, notes = state(tmp_path, one_rank_world).resume(other, other_opt, NoTargets())
    assert (start, notes) == (10, [])
    assert_same(other.state_dict(), model.state_dict())
    assert_same(other_opt.state_dict(), opt.state_dict())
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


def test_files_of_an_older_fingerprint_spelling_resume_but_others_do_not(tmp_path,
                                                                         one_rank_world):
    model, opt = trained(0)
    state(tmp_path, one_rank_world, fingerprints=("fp-old",)).save(4, model, opt, NoTargets())
    assert state(tmp_path, one_rank_world).resume(model, opt, NoTargets())[0] == 4
    with pytest.raises(CheckpointError, match="written by a different job"):
        state(tmp_path, one_rank_world, fingerprints=("fp-other",)).resume(model, opt,
                                                                           NoTargets())


def _flip_a_weight(path):
    with h5py.File(path, "r+") as f:
        found = []
        f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset)
                     and obj.dtype.kind == "f" else None)
        ds = found[0]
        ds[...] = ds[()] + 1  # bytes changed behind the checksum's back


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, one_rank_world):
    cs = state(tmp_path, one_rank_world)
    early, early_opt = trained(0, steps=2)
    cs.save(5, early, early_opt, NoTargets())
    late, late_opt = trained(0, steps=4)
    cs.save(10, late, late_opt, NoTargets())
    _flip_a_weight(cs.ckpts.path(10))
    model, opt = trained(1)
    start, notes = state(tmp_path, one_rank_world).resume(model, opt, NoTargets())
    assert start == 5
    assert_same(model.state_dict(), early.state_dict())
    [note] = notes
    assert "step_000000010.h5" in note and "corrupt" in note
    assert cs.ckpts.steps() == [5]  # moved aside, kept for inspection
    assert (cs.ckpts.folder / "step_000000010.h5.corrupt").exists()


def test_only_the_last_checkpoints_are_kept(tmp_path, one_rank_world):
    cs = state(tmp_path, one_rank_world, keep=2)
    model, opt = trained(0)
    for step in (2, 4, 6, 8):
        cs.save(step, model, opt, NoTargets())
    assert cs.ckpts.steps() == [6, 8]
    assert not list(cs.ckpts.folder.glob("*.tmp"))
