"""Tests of the data I/O layer: shards, the embedded digits dataset, and step-indexed loading."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mhd_hpc.data.batches import StepBatches, iterate_eval, key_hash, load_split
from mhd_hpc.data.embedded import (
    build_digits_shards, dataset_dir_name, digits_settings, load_digits_arrays,
    digits_test_split,
)
from mhd_hpc.data.manifest import load_manifest
from mhd_hpc.data.stream_factory import LOADERS, open_stream
from mhd_hpc.data.partition import make_partition
from mhd_hpc.data.shards import Samples, read_shards, write_shards

REPO = Path(__file__).resolve().parents[1]
NORM = {"scale": 1.0, "mean": [0.0], "std": [1.0]}
BUILD = dict(num_clients=3, public_fraction=0.1, label_assignment="random",
             labels_per_client=3, skew=10.0)


def _toy(n: int, shape: tuple[int, int, int] = (1, 2, 2)) -> Samples:
    rng = np.random.default_rng(123)
    return Samples(keys=[f"s{i:03d}" for i in range(n)],
                   images=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                   labels=np.arange(n, dtype=np.int64) % 7)


# ---------------------------------------------------------------- shards

def test_shard_round_trip(tmp_path: Path) -> None:
    s = _toy(10, (3, 4, 5))
    paths = write_shards(str(tmp_path), s.keys, s.images, s.labels, samples_per_shard=3)
    assert [os.path.basename(p) for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    back = read_shards(paths)
    assert back.keys == s.keys
    assert back.images.dtype == np.uint8 and np.array_equal(back.images, s.images)
    assert back.labels.dtype == np.int64 and np.array_equal(back.labels, s.labels)


def test_interrupted_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    s = _toy(10)

    def images():
        for i, img in enumerate(s.images):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield img

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(str(tmp_path), s.keys, images(), s.labels, samples_per_shard=3)
    # Shard 0 was complete; shard 1 was in progress and must leave nothing behind, not even a temp.
    assert os.listdir(tmp_path) == ["shard-000000.tar"]
    assert read_shards([str(tmp_path / "shard-000000.tar")]).keys == s.keys[:3]


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        buf = io.BytesIO()
        np.save(buf, np.zeros((1, 2, 2), np.uint8))
        info = tarfile.TarInfo("k0.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(ValueError, match=r"bad\.tar.*\.cls"):
        read_shards([str(bad)])
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        read_shards([str(tmp_path / "nope.tar")])

    good = write_shards(str(tmp_path / "t"), _toy(6).keys, _toy(6).images, _toy(6).labels)[0]
    Path(good).write_bytes(Path(good).read_bytes()[:3000])  # truncated copy
    with pytest.raises(ValueError, match=r"t/shard-000000\.tar: corrupt or truncated"):
        read_shards([good])

    a = write_shards(str(tmp_path / "a"), ["x0"], _toy(1, (1, 2, 2)).images, [0])
    b = write_shards(str(tmp_path / "b"), ["x1"], _toy(1, (1, 3, 3)).images, [0])
    with pytest.raises(ValueError, match=r"b/shard-000000\.tar"):
        read_shards(a + b)


def test_write_rejects_bad_keys_and_images(tmp_path: Path) -> None:
    img = np.zeros((1, 1, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shards(str(tmp_path), ["a.b"], img, [0])
    with pytest.raises(ValueError, match="uint8"):
        write_shards(str(tmp_path), ["a"], img.astype(np.float32), [0])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- embedded digits

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


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_manifest(str(tmp_path))


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


# ---------------------------------------------------------------- loader

def test_loader_factory_rejects_dali(tmp_path: Path) -> None:
    # The backend choice moved from load_split (a .npy reader only) to the stream factory: an
    # .npy dataset cannot be read by DALI, and an unknown backend names the valid ones.
    d0 = build_digits_shards(str(tmp_path), num_clients=2, public_fraction=0.1,
                             label_assignment="random", labels_per_client=3, skew=10.0, seed=0)
    with pytest.raises(ValueError, match="DALI backend reads JPEG shards only.*wds"):
        open_stream(d0, "test", 8, 0, "eval", loader="dali")
    with pytest.raises(ValueError, match="unknown loader backend") as err:
        open_stream(d0, "test", 8, 0, "eval", loader="pillow")
    assert all(b in str(err.value) for b in LOADERS)


def test_step_batches_deterministic_and_aligned() -> None:
    s = _toy(10)
    a, b = StepBatches(s, 4, NORM, seed=7), StepBatches(s, 4, NORM, seed=7)
    c = StepBatches(s, 4, NORM, seed=8)
    keys_a = [a.batch(t).keys for t in range(6)]
    assert keys_a == [b.batch(t).keys for t in range(6)]  # two clients, same public stream
    assert keys_a == [a.batch(t).keys for t in range(6)]  # repeatable
    assert keys_a != [c.batch(t).keys for t in range(6)]
    bt = a.batch(3)
    assert bt.images.shape == (4, 1, 2, 2) and bt.labels.dtype == torch.int64
    assert a.global_key_hash(3) == key_hash(bt.keys) == b.global_key_hash(3)


def test_step_batches_epochs_and_resume() -> None:
    s = _toy(10)
    sb = StepBatches(s, 5, NORM, seed=3)
    for epoch in range(3):  # with B | N, each epoch is two batches covering all once
        keys = sb.batch(2 * epoch).keys + sb.batch(2 * epoch + 1).keys
        assert sorted(keys) == s.keys
    assert sb.epoch_of(4) == 2.0
    # Batches crossing epoch boundaries (B does not divide N), and B > N.
    for bs in (3, 23):
        stream = [k for t in range(10) for k in StepBatches(s, bs, NORM, seed=3).batch(t).keys]
        resumed = StepBatches(s, bs, NORM, seed=3)  # fresh object = restarted job
        assert [k for t in range(4, 10) for k in resumed.batch(t).keys] == stream[4 * bs:]
        for e in range(len(stream) // 10):
            assert sorted(stream[10 * e:10 * e + 10]) == s.keys
    plain = StepBatches(s, 4, NORM, seed=0, shuffle=False)
    assert plain.batch(2).keys == ["s008", "s009", "s000", "s001"]


def test_step_batches_parts_and_errors() -> None:
    s = _toy(10)
    full = StepBatches(s, 7, NORM, seed=1)
    parts = [StepBatches(s, 7, NORM, seed=1, part=p, num_parts=3) for p in range(3)]
    for t in range(4):
        got = [p.batch(t) for p in parts]
        assert [len(g) for g in got] == [3, 2, 2]
        assert sum((g.keys for g in got), []) == full.batch(t).keys
        assert torch.equal(torch.cat([g.images for g in got]), full.batch(t).images)
    with pytest.raises(ValueError):
        StepBatches(s, 0, NORM, seed=1)
    with pytest.raises(ValueError):
        StepBatches(_toy(0), 4, NORM, seed=1)


def test_key_hash_and_iterate_eval() -> None:
    assert key_hash(["a", "b"]) != key_hash(["b", "a"])
    assert key_hash(["ab", "c"]) != key_hash(["a", "bc"])
    assert 0 <= key_hash(["a"]) < 2**64
    s = _toy(10)
    batches = list(iterate_eval(s, 4, NORM))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum((b.keys for b in batches), []) == s.keys
    assert torch.equal(torch.cat([b.images for b in batches]), torch.from_numpy(s.images).float())
