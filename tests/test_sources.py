"""Dataset sources (mhd_hpc/data/build/sources.py, tools/make_shards.py idx | cifar): tiny IDX and
CIFAR files built here, read back exactly; truncated and missing files named."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from mhd_hpc.data.read.batches import load_split
from mhd_hpc.data.manifest import load_manifest, verify_shards
from mhd_hpc.data.build.sources import (DatasetFileError, load_cifar_dataset, load_idx_dataset,
                                  read_idx)

TOOL = ROOT / "tools" / "make_shards.py"


def _tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_idx(folder: Path, n_train=60, n_test=20, size=28, classes=10, gz=True, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write_idx(folder / f"{prefix}{part}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}{part}-labels-idx1-ubyte{ext}", labels)
        arrays[part] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz, prefix", [(True, ""), (False, "emnist-balanced-")])
def test_idx_files_read_back_exactly(tmp_path, gz, prefix):
    arrays = make_idx(tmp_path / "idx", gz=gz, prefix=prefix)
    data = load_idx_dataset(str(tmp_path / "idx"))
    assert data.train_images.shape == (60, 1, 28, 28) and data.test_images.shape == (20, 1, 28, 28)
    assert np.array_equal(data.train_images[:, 0], arrays["train"][0])
    assert np.array_equal(data.test_labels, arrays["t10k"][1])
    assert data.classes == [str(c) for c in range(10)]


def test_truncated_or_missing_idx_files_are_named(tmp_path):
    make_idx(tmp_path / "idx", gz=False)
    path = tmp_path / "idx" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFileError, match="t10k-images-idx3-ubyte: holds .*truncated"):
        load_idx_dataset(str(tmp_path / "idx"))
    gz = tmp_path / "gz"
    make_idx(gz)
    labels = gz / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(DatasetFileError, match="train-labels-idx1-ubyte.gz"):
        load_idx_dataset(str(gz))
    (gz / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetFileError, match="train-labels-idx1-ubyte.*missing"):
        load_idx_dataset(str(gz))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetFileError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))


def make_cifar(folder: Path, hundred: bool) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def batch(n, offset):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [(i + offset) % 100 for i in range(n)]
        out = {b"data": data}
        if hundred:
            out.update({b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
        else:
            out[b"labels"] = [(i + offset) % 10 for i in range(n)]
        return out
    batches = {}
    if hundred:
        batches = {"train": batch(50, 0), "test": batch(10, 3)}
        meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))
    else:
        batches = {f"data_batch_{i}": batch(12, i) for i in range(1, 6)}
        batches["test_batch"] = batch(10, 7)
        (folder / "batches.meta").write_bytes(pickle.dumps(
            {b"label_names": [f"class{i}".encode() for i in range(10)]}))
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return batches


def test_cifar10_and_cifar100_fine_and_coarse(tmp_path):
    c10 = make_cifar(tmp_path / "c10", hundred=False)
    data = load_cifar_dataset(str(tmp_path / "c10"))
    assert data.name == "cifar10" and len(data.classes) == 10
    assert data.train_images.shape == (60, 3, 32, 32)
    assert np.array_equal(data.train_images[0].reshape(-1), c10["data_batch_1"][b"data"][0])
    c100 = make_cifar(tmp_path / "c100", hundred=True)
    fine = load_cifar_dataset(str(tmp_path / "c100"), "fine")
    coarse = load_cifar_dataset(str(tmp_path / "c100"), "coarse")
    assert len(fine.classes) == 100 and len(coarse.classes) == 20
    assert np.array_equal(coarse.train_labels, np.asarray(c100["train"][b"coarse_labels"]))
    # A truncated batch (a partial download) is named.
    test = tmp_path / "c100" / "test"
    test.write_bytes(test.read_bytes()[:100])
    with pytest.raises(DatasetFileError, match="c100/test"):
        load_cifar_dataset(str(tmp_path / "c100"))


@pytest.mark.parametrize("source", ["idx", "cifar"])
def test_make_shards_from_arrays(tmp_path, source, capsys):
    """The same partition, manifest, checksums and resumable writing as ImageFolder builds,
    stored as raw uint8 records."""
    if source == "idx":
        make_idx(tmp_path / "in")
        extra = []
    else:
        make_cifar(tmp_path / "in", hundred=True)
        extra = ["--cifar-labels", "coarse"]
    out = tmp_path / "out"
    args = [source, str(tmp_path / "in"), str(out), "--clients", "3", "--labels-per-client",
            "2", "--skew", "10", "--samples-per-shard", "16", *extra]
    assert _tool().main(args) == 0
    m = load_manifest(str(out))
    assert m["format"] == "u8" and m["partition"]["num_clients"] == 3
    assert sum(m["counts"][f"client_{i:03d}"] for i in range(3)) + m["counts"]["public"] == \
        (60 if source == "idx" else 50)
    assert verify_shards(str(out), m) == (len(m["shard_sha256"]), [])
    first = load_split(str(out), "client_000")
    assert first.images.shape[1:] == ((1, 28, 28) if source == "idx" else (3, 32, 32))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _tool().main(args) == 0  # a rerun finds everything complete and writes nothing
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert "complete already, nothing written" in capsys.readouterr().err


def test_make_shards_names_a_missing_source(tmp_path, capsys):
    assert _tool().main(["idx", str(tmp_path / "none"), str(tmp_path / "out")]) == 1
    assert "none: no such folder" in capsys.readouterr().err


def test_an_interrupted_array_build_resumes(tmp_path, monkeypatch):
    from mhd_hpc.data.build.array_shards import FAULT_ENV

    make_idx(tmp_path / "in", n_train=200)
    args = ["idx", str(tmp_path / "in"), str(tmp_path / "out"), "--clients", "2",
            "--samples-per-shard", "10"]
    monkeypatch.setenv(FAULT_ENV, "3")
    with pytest.raises(RuntimeError, match="injected"):
        _tool().main(args)
    assert not (tmp_path / "out" / "manifest.json").exists()
    done = sorted((tmp_path / "out").rglob("*.done"))
    assert len(done) == 3
    stamps = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.delenv(FAULT_ENV)
    assert _tool().main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not rewritten
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["test"] == 20
