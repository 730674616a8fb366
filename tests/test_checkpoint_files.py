"""Checkpoints (mhd_hpc/run/checkpoint_files.py): round trip, corrupt files named, rotation."""

import h5py
import pytest
import torch

from mhd_hpc.run.checkpoint_files import CheckpointError, ClientCheckpoints, load, newest_common_step, save_atomic
from mhd_hpc.models import build_model


def test_model_and_optimizer_state_round_trip(tmp_path):
    model = build_model("cnn_small", 10, 2, 1, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8))[1][1].sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "torch_rng": rng, "misc": (1, "a/b", None, [0.5])}
    save_atomic(tmp_path / "c.h5", state, {"arch": "cnn_small"})
    loaded, meta = load(tmp_path / "c.h5")
    assert meta == {"arch": "cnn_small"} and loaded["step"] == 7
    assert loaded["misc"] == (1, "a/b", None, [0.5])
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v) and loaded["model"][k].dtype == v.dtype
    assert set(loaded["optimizer"]["state"]) == set(opt.state_dict()["state"])  # int keys kept
    opt2 = torch.optim.SGD(build_model("cnn_small", 10, 2, 1, 8).parameters(), lr=0.1,
                           momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    # The optimizer state comes back exactly: every momentum buffer and every hyperparameter.
    want, got = opt.state_dict(), opt2.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert set(want["state"]) == set(got["state"]) and want["state"]
    for i, entry in want["state"].items():
        assert set(entry) == set(got["state"][i])
        for name, value in entry.items():
            assert torch.equal(got["state"][i][name], value), (i, name)
    assert torch.equal(loaded["torch_rng"], rng) and loaded["torch_rng"].dtype == rng.dtype


def test_corrupt_or_partial_checkpoints_are_named(tmp_path):
    path = tmp_path / "bad.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match="bad.h5"):
        load(path)
    with h5py.File(tmp_path / "partial.h5", "w") as f:  # a writer killed before 'complete'
        f.attrs["format_version"] = 1
    with pytest.raises(CheckpointError, match="partial.h5"):
        load(tmp_path / "partial.h5")


def test_checkpoint_rotation_ignores_temp_files(tmp_path):
    ck = ClientCheckpoints(tmp_path, 3, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"step": step}, {})
    (ck.folder / "step_000000040.h5.tmp").write_bytes(b"half")  # kill during a write
    assert ck.steps() == [20, 30]
    assert ck.load(30)[0]["step"] == 30


def test_newest_common_step():
    assert newest_common_step([[10, 20], [10, 20]]) == 20
    assert newest_common_step([[10, 20], [10]]) == 10  # client 1 died before writing 20
    assert newest_common_step([[10], []]) == 0
