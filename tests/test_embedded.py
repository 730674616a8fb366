"""The digits dataset (mhd_hpc/data/build/embedded.py): splits, rebuilds, MHD+ public set, the CLI."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mhd_hpc.data.read.batches import iterate_eval, load_split
from mhd_hpc.data.build.embedded import (
    build_digits_shards, dataset_dir_name, digits_settings, load_digits_arrays,
    digits_test_split,
)
from mhd_hpc.data.manifest import content_digest, load_manifest
from mhd_hpc.data.build.partition import make_partition

REPO = Path(__file__).resolve().parents[1]
BUILD = dict(num_clients=3, public_fraction=0.1, label_assignment="random",
             labels_per_client=3, skew=10.0)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    root = str(tmp_path_factory.mktemp("digits"))
    d0 = build_digits_shards(root, seed=0, **BUILD)
    d1 = build_digits_shards(root, seed=1, **BUILD)
    return root, d0, d1


def test_digits_splits_disjoint_and_complete(digits_root: tuple[str, str, str]) -> None:
    _, d0, _ = digits_root
    manifest = load_manifest(d0)
    assert manifest["dataset"] == "digits" and manifest["num_classes"] == 10
    assert manifest["image_shape"] == [1, 8, 8]
    assert set(manifest["splits"]) == {"test", "public", "client_000", "client_001", "client_002"}
    all_keys: list[str] = []
    for split in manifest["splits"]:
        s = load_split(d0, split)
        assert s.images.shape[1:] == (1, 8, 8) and s.images.max() <= 16
        assert len(s) == manifest["counts"][split]
        all_keys += s.keys
    assert len(all_keys) == len(set(all_keys)) == 1797
    assert set(all_keys) == {f"digits-{i:05d}" for i in range(1797)}


def test_digits_test_split_fixed_and_client_counts(digits_root: tuple[str, str, str]) -> None:
    _, d0, d1 = digits_root
    assert d0 != d1  # different settings live side by side
    t0, t1 = load_split(d0, "test"), load_split(d1, "test")
    assert t0.keys == t1.keys and len(t0) == 360
    assert np.array_equal(np.bincount(t0.labels), np.bincount(load_digits_arrays()[1][
        digits_test_split(load_digits_arrays()[1])[0]]))

    manifest = load_manifest(d0)
    counts = np.asarray(manifest["partition"]["counts"])
    for i in range(BUILD["num_clients"]):
        labels = load_split(d0, f"client_{i:03d}").labels
        assert np.array_equal(np.bincount(labels, minlength=10), counts[i])
    # The partition recorded is the one make_partition gives on the pool labels.
    _, labels = load_digits_arrays()
    _, pool = digits_test_split(labels)
    part = make_partition(labels[pool], seed=0, num_classes=10, **BUILD)
    assert np.array_equal(part.counts, counts)
    assert len(load_split(d0, "public")) == part.public.size


def test_digits_rebuild_is_noop(digits_root: tuple[str, str, str]) -> None:
    root, d0, _ = digits_root
    mpath = os.path.join(d0, "manifest.json")
    before = (os.stat(mpath).st_mtime_ns, os.stat(d0).st_mtime_ns)
    assert build_digits_shards(root, seed=0, **BUILD) == d0
    assert (os.stat(mpath).st_mtime_ns, os.stat(d0).st_mtime_ns) == before
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # no temp folders left


def test_dataset_dir_name() -> None:
    s = digits_settings(seed=0, **BUILD)
    name = dataset_dir_name(s)
    assert name.startswith("digits-") and len(name) == len("digits-") + 12
    assert name == dataset_dir_name(dict(reversed(list(s.items()))))  # canonical: order-free
    assert name != dataset_dir_name(digits_settings(seed=0, **{**BUILD, "num_clients": 4}))


def test_normalised_pool_and_cli(digits_root: tuple[str, str, str], capsys) -> None:
    root, d0, _ = digits_root
    norm = load_manifest(d0)["normalize"]
    batches = list(iterate_eval(load_split(d0, "client_000"), 512, norm))
    x = torch.cat([b.images for b in batches])
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3

    spec = importlib.util.spec_from_file_location("mds", REPO / "tools" / "make_digits_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--root", root, "--clients", "3", "--labels-per-client", "3",
                      "--skew", "10", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == d0 and "client_002" in out


def test_mhd_plus_public_set_is_the_whole_pool(tmp_path):
    args = dict(num_clients=3, public_fraction=0.1, label_assignment="random",
                labels_per_client=3, skew=10.0, seed=0)
    split = build_digits_shards(str(tmp_path), **args)
    plus = build_digits_shards(str(tmp_path), **args, public_source="all")
    assert split != plus
    ms, mp = load_manifest(split), load_manifest(plus)
    assert mp["public_source"] == "all" and "public_source" not in ms
    pool = sum(ms["counts"][s] for s in ms["counts"] if s != "test")
    assert mp["counts"]["public"] == pool == 1797 - 360
    public = load_split(plus, "public", mp)
    assert len(public) == pool and len(set(public.keys)) == pool
    for i in range(3):  # the private splits are unchanged
        assert load_split(plus, f"client_{i:03d}").keys == load_split(split, f"client_{i:03d}").keys
    assert content_digest(mp) != content_digest(ms)
