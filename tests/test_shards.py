"""Sample shards (mhd_hpc/data/shards.py): round trip, interrupted writes, errors naming files."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mhd_hpc.data.shards import Samples, read_shards, write_shards


def _toy(n: int, shape: tuple[int, int, int] = (1, 2, 2)) -> Samples:
    rng = np.random.default_rng(123)
    return Samples(keys=[f"s{i:03d}" for i in range(n)],
                   images=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                   labels=np.arange(n, dtype=np.int64) % 7)


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
