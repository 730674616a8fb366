"""A run's dataset (mhd_hpc/data/dataset.py find_dataset): the built-in datasets are built with
the job's partition keys; a prebuilt shards dataset refuses the keys it would ignore."""

from __future__ import annotations

from mhd_hpc.config.tree import DataConfig
from mhd_hpc.data.dataset import find_dataset


def _find(root, **keys):
    return find_dataset(DataConfig(root=str(root), **keys), 4, 0, lambda m: None)


def test_a_builtin_dataset_is_built_with_the_dirichlet_partition(tmp_path):
    folder, manifest, error = _find(tmp_path, partition="dirichlet", alpha=0.3)
    assert error is None
    settings = manifest.partition.settings
    assert settings["partition"] == "dirichlet" and settings["alpha"] == 0.3
    assert sum(map(sum, manifest.partition.counts)) == manifest.counts["client_000"] + sum(
        manifest.counts[f"client_{i:03d}"] for i in range(1, 4))
    default, _, _ = _find(tmp_path)
    assert default != folder  # each partition its own folder, found again by its settings
    assert _find(tmp_path, partition="dirichlet", alpha=0.3)[0] == folder


def test_a_partition_error_names_its_key_and_writes_nothing(tmp_path):
    _, manifest, error = _find(tmp_path / "d", partition="dirichlet", alpha=0.05,
                               min_samples=300)
    assert manifest is None and error[0] == "data.min_samples"
    assert "fewer than data.min_samples=300" in error[1]
    assert not any((tmp_path / "d").glob("*/manifest.json"))


def test_a_shards_dataset_refuses_the_partition_keys_it_would_ignore(tmp_path):
    built, _, _ = _find(tmp_path, labels_per_client=5)  # digits, used below as a shards folder
    shards = dict(dataset="shards")
    assert _find(built, **shards)[2] is None  # defaults: nothing set, nothing ignored
    assert _find(built, labels_per_client=5, **shards)[2] is None  # what it was built with
    _, manifest, error = _find(built, labels_per_client=2, skew=0.0, **shards)
    assert manifest is None and error[0] == "data.labels_per_client"
    assert "data.labels_per_client=2, data.skew=0.0" in error[1]
    assert "partition was fixed when" in error[1]
    for key, value in [("partition", "dirichlet"), ("alpha", 0.1), ("min_samples", 10),
                       ("public_fraction", 0.2), ("label_assignment", "even")]:
        assert _find(built, **{key: value}, **shards)[2][0] == f"data.{key}", key
    # the keys refused are exactly the partition's: others pass
    assert _find(built, batch_size=7, **shards)[2] is None
