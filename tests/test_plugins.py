"""Plug-ins named by import path (mhd_hpc/runtime/plugins.py, mhd_hpc/models/plugin.py, their
checks in mhd_hpc/job.py): a backbone of the researcher's own, errors naming the key. Training
with plug-ins under mpirun: tests/test_plugins_mpi.py."""

from __future__ import annotations

import pytest
import torch

from mhd_hpc.config import ConfigError
from mhd_hpc.job import load_job
from mhd_hpc.models import build_model
from mhd_hpc.runtime.plugins import PluginError, is_import_path, load_callable

from conftest import ROOT

MODELS = '''
from torch import nn

def tiny(in_channels, image_size):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 6

def not_a_pair(in_channels, image_size):
    return nn.Linear(3, 3)

def wrong_width(in_channels, image_size):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 9

def breaks(in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 6)), 6

NOT_CALLABLE = 3
'''
JOB = str(ROOT / "jobs" / "digits.yaml")


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models"


def test_import_paths_are_found_or_refused_saying_why(models):
    assert is_import_path("a.b:c") and not is_import_path("resnet18")
    assert callable(load_callable("my_models:tiny"))
    for path, words in [("my_models", "import path of the form"),
                        ("no_such_module:x", "cannot import module 'no_such_module'"),
                        ("my_models:nothing", "has no attribute 'nothing'"),
                        ("my_models:NOT_CALLABLE", "not a function")]:
        with pytest.raises(PluginError, match=words):
            load_callable(path)


def test_a_plugin_backbone_gets_the_framework_heads(models):
    model = build_model("my_models:tiny", num_classes=10, aux_heads=2, in_channels=1,
                        image_size=8)
    emb, logits = model(torch.zeros(3, 1, 8, 8))
    assert model.embedding_dim == 6 and emb.shape == (3, 6)
    assert model.head_names == ["main", "aux1", "aux2"] and logits[2].shape == (3, 10)
    projected = build_model("my_models:tiny", 10, 1, 1, 8, embedding_dim=16)
    assert projected(torch.zeros(2, 1, 8, 8))[0].shape == (2, 16)


def test_a_job_with_a_plugin_backbone_is_checked_naming_the_key(models):
    cfg = load_job(JOB, ["clients.arch=my_models:tiny"])
    assert cfg.client_archs() == ["my_models:tiny"] * 4
    for arch, words in [("my_models:not_a_pair", "returned Linear"),
                        ("my_models:wrong_width", r"expected a float tensor of shape \(2, 9\)"),
                        ("my_models:breaks", "failed on a batch of shape"),
                        ("my_models:gone", "no attribute 'gone'"),
                        ("vit_b_16", "unknown architecture 'vit_b_16'.*package.module:builder")]:
        with pytest.raises(ConfigError, match=words) as info:
            load_job(JOB, [f"clients.arch={arch}"])
        assert info.value.key == "clients.arch"
    with pytest.raises(ConfigError) as info:
        load_job(JOB, ["clients.arch=[cnn_small,cnn_small,my_models:gone,cnn_small]"])
    assert info.value.key == "clients.arch[2]"
    with pytest.raises(ConfigError, match="different widths") as info:
        load_job(JOB, ["clients.arch=[cnn_small,cnn_small,my_models:tiny,cnn_small]"])
    assert info.value.key == "model.embedding_dim"
    load_job(JOB, ["clients.arch=[cnn_small,cnn_small,my_models:tiny,cnn_small]",
                   "model.embedding_dim=16"])


def test_a_plugin_partition_path_is_checked_naming_the_key(models):
    with pytest.raises(ConfigError, match="no attribute 'split'") as info:
        load_job(JOB, ["data.partition=my_models:split"])
    assert info.value.key == "data.partition"
    with pytest.raises(ConfigError, match="'clusters' is not one of primary, dirichlet"):
        load_job(JOB, ["data.partition=clusters"])
    with pytest.raises(ConfigError, match="data.alpha"):
        load_job(JOB, ["data.partition=dirichlet", "data.alpha=0"])
    with pytest.raises(ConfigError, match="data.min_samples"):
        load_job(JOB, ["data.min_samples=0"])
