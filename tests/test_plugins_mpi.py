"""Plug-ins from a module outside the package, under real mpirun: a backbone
(clients.arch: module:builder) and a partition (data.partition: module:function) written by the
test into tmp_path and put on the ranks' PYTHONPATH; bad plug-ins stop every rank before
training with the key named."""

from __future__ import annotations

import json
import os
from collections import Counter

from conftest import ROOT, SMALL, run_mpi, train_args

PLUGIN = '''
import os

import numpy as np
from torch import nn


def tiny(in_channels, image_size):
    """A backbone of our own: every call leaves a line in $PLUGIN_LOG (which rank built what)."""
    with open(os.environ["PLUGIN_LOG"], "a") as f:
        f.write(f"{os.getpid()} {in_channels} {image_size}\\n")
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16


def halves(labels, num_clients, num_classes, seed):
    """Client i gets the labels l with l * num_clients // num_classes == i."""
    idx = np.arange(labels.size)
    return [idx[labels * num_clients // num_classes == i] for i in range(num_clients)]


def overlapping(labels, num_clients, num_classes, seed):
    return [np.arange(labels.size)] * num_clients
'''


def _env(tmp_path):
    (tmp_path / "lab_plugins.py").write_text(PLUGIN)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "PLUGIN_LOG": str(tmp_path / "built.log")}


def test_a_plugin_backbone_and_partition_train_under_mpirun(tmp_path, data_root):
    out = tmp_path / "run"
    res = run_mpi(2, train_args(out, data_root, *SMALL, "run.steps=20",
                                "clients.arch=lab_plugins:tiny",
                                "data.partition=lab_plugins:halves"), env=_env(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    built = (tmp_path / "built.log").read_text().split("\n")[:-1]
    # both ranks built it for the digits' 1 x 8 x 8 images: once to check the job, once to train
    per_rank = Counter(line.split()[0] for line in built)
    assert len(per_rank) == 2 and set(per_rank.values()) == {2}, built
    assert all(line.split()[1:] == ["1", "8"] for line in built)
    partition = json.loads((out / "partition.json").read_text())
    counts = partition["counts"]
    assert partition["settings"]["partition"] == "lab_plugins:halves"
    assert sum(counts[0][5:]) == 0 and sum(counts[1][:5]) == 0  # the plug-in's split
    assert min(counts[0][:5]) > 0 and min(counts[1][5:]) > 0
    assert "step 20" in res.stdout + res.stderr


def test_bad_plugins_stop_every_rank_naming_the_key(tmp_path, data_root):
    env = _env(tmp_path)
    res = run_mpi(2, train_args(tmp_path / "a", data_root, *SMALL,
                                "clients.arch=lab_plugins:missing"), env=env, timeout=120)
    assert res.returncode == 2
    assert "config error at 'clients.arch'" in res.stderr and "no attribute 'missing'" in res.stderr
    res = run_mpi(2, train_args(tmp_path / "b", data_root, *SMALL,
                                "data.partition=lab_plugins:overlapping"), env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "config error at 'data.partition'" in res.stderr and "disjoint" in res.stderr
    assert not (tmp_path / "b" / "metrics.h5").exists()
