"""Member checksums of JPEG shards (mhd_hpc/data/checksums.py): written by make_shards, checked
as samples are read (PIL loader, DALI's byte source) and, for the shard sizes, before a run."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from _jpeg_tree import build_dataset, make_image_folder
from mhd_hpc.data.checksums import (DamagedSample, check_shard_sizes, read_sums, sums_path,
                                    write_sums)
from mhd_hpc.data.manifest import Manifest
from mhd_hpc.data.read.stream_factory import dali_available, open_stream
from mhd_hpc.data.read.streams import ByteReader, SplitTable
from mhd_hpc.data.tarindex import index_path

needs_dali = pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali not importable (pip install nvidia-dali-cuda120)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("jpegs")
    make_image_folder(root / "src")
    return root / "out", build_dataset(root / "src", root / "out")


@pytest.fixture
def copy(built, tmp_path) -> tuple[Path, Manifest]:
    """A copy of the built dataset that a test may damage."""
    out = tmp_path / "ds"
    shutil.copytree(built[0], out)
    return out, Manifest.read(str(out))


def first_tar(ds: Path) -> Path:
    return sorted(ds.glob("client_000/shard-*.tar"))[0]


def zero_first_jpeg(tar_path: Path, keep: float = 0.0) -> str:
    """Zero the bytes of the shard's first .jpg member in place (same size; the first ``keep``
    of them left as they are); its key."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(tar_path.read_bytes())
    lo, end = member.offset_data + int(member.size * keep), member.offset_data + member.size
    data[lo:end] = bytes(end - lo)
    tar_path.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_sums_are_the_crc32_of_every_member_as_written(built) -> None:
    ds, _ = built
    tar_path = first_tar(ds)
    sums = read_sums(sums_path(str(tar_path)))
    assert sums.tar_bytes == tar_path.stat().st_size
    with tarfile.open(tar_path) as tar:
        found = {m.name: (m.size, zlib.crc32(tar.extractfile(m).read())) for m in tar}
    assert {f"{k}.{ext}": v for k, exts in sums.members.items() for ext, v in exts.items()} \
        == found
    # Written while building, or read back from the tar: the same file.
    before = Path(sums_path(str(tar_path))).read_text()
    write_sums(str(tar_path))
    assert Path(sums_path(str(tar_path))).read_text() == before


def test_a_zeroed_member_is_named_when_read(copy) -> None:
    ds, manifest = copy
    key = zero_first_jpeg(first_tar(ds))
    table = SplitTable.load(str(ds), "client_000", manifest)
    reader = ByteReader(table)
    i = table.keys.index(key)
    with pytest.raises(DamagedSample, match=rf"client_000/shard-000000.tar: sample '{key}'.*"
                                            r"CRC32 mismatch"):
        reader.read(i)
    reader.read((i + 1) % len(table))  # the others are intact


def test_a_zeroed_member_stops_the_pil_loader_naming_it(copy) -> None:
    """...and closing the stream ends its worker, though the error's traceback still holds the
    loader (a worker left behind blocks SIGTERM: the process would wait for it at exit)."""
    ds, manifest = copy
    key = zero_first_jpeg(first_tar(ds))
    before = set(multiprocessing.active_children())
    stream, _ = open_stream(str(ds), "client_000", 64, 0, "train", loader="wds", threads=1,
                            manifest=manifest)
    try:
        with pytest.raises(DamagedSample, match=rf"shard-000000.tar: sample '{key}'.*CRC32") as e:
            stream.batch(0)  # the batch of 64 holds every sample of the client
    finally:
        stream.close()
    assert e.value.__traceback__ is not None
    assert set(multiprocessing.active_children()) <= before


@needs_dali
def test_a_zeroed_member_stops_the_dali_loader_naming_it(copy) -> None:
    ds, manifest = copy
    key = zero_first_jpeg(first_tar(ds))
    stream, _ = open_stream(str(ds), "client_000", 64, 0, "train", loader="dali", threads=1,
                            manifest=manifest)
    try:
        with pytest.raises(DamagedSample, match=rf"shard-000000.tar: sample '{key}'.*CRC32"):
            stream.batch(0)
    finally:
        stream.close()


@pytest.mark.parametrize("keep, why", [(0.0, "not a JPEG"), (0.5, "cannot be decoded")])
def test_undecodable_bytes_without_checksums_are_named(copy, keep, why) -> None:
    """Shards of older versions (no sums file): a member that is no JPEG, or that PIL cannot
    decode, is named."""
    ds, manifest = copy
    for sums in ds.glob("*/*.sums"):
        sums.unlink()
    key = zero_first_jpeg(first_tar(ds), keep)
    table = SplitTable.load(str(ds), "client_000", manifest)
    assert table.crc is None and table.unchecked == len(table.paths)
    stream, _ = open_stream(str(ds), "client_000", 64, 0, "train", loader="wds", threads=0,
                            manifest=manifest)
    try:
        with pytest.raises(DamagedSample, match=rf"sample '{key}': {why}"):
            stream.batch(0)
    finally:
        stream.close()


@needs_dali
def test_what_dali_cannot_decode_is_named(copy) -> None:
    """Without checksums the bytes reach DALI, whose decoder error names no sample: the batch's
    samples are tried in PIL and the undecodable one is named."""
    ds, manifest = copy
    for sums in ds.glob("*/*.sums"):
        sums.unlink()
    key = zero_first_jpeg(first_tar(ds), keep=0.5)  # a JPEG's start, then zeros
    stream, _ = open_stream(str(ds), "client_000", 64, 0, "train", loader="dali", threads=1,
                            manifest=manifest)
    try:
        with pytest.raises(DamagedSample, match=rf"sample '{key}': DALI cannot decode it"):
            stream.batch(0)
    finally:
        stream.close()


def test_truncated_shard_is_found_from_sizes_alone(copy) -> None:
    ds, manifest = copy
    assert check_shard_sizes(str(ds), manifest) == ([], 0)
    tar_path = first_tar(ds)
    os.truncate(tar_path, tar_path.stat().st_size // 2)
    problems, unchecked = check_shard_sizes(str(ds), manifest)
    assert len(problems) == 1 and problems[0].startswith(f"{tar_path} has ")
    assert "truncated" in problems[0]
    # Shards without sums: the index's last member tells the least size.
    for sums in ds.glob("*/*.sums"):
        sums.unlink()
    problems, unchecked = check_shard_sizes(str(ds), manifest)
    assert len(problems) == 1 and str(tar_path) in problems[0] and unchecked > 0


def test_stale_sums_are_refused(copy) -> None:
    ds, manifest = copy
    tar_path = first_tar(ds)
    path = Path(sums_path(str(tar_path)))
    lines = path.read_text().splitlines()
    key, first, *rest = lines[1].split()
    ext, size, crc = first.split(":")
    lines[1] = " ".join([key, f"{ext}:{int(size) + 1}:{crc}", *rest])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="does not match the index"):
        SplitTable.load(str(ds), "client_000", manifest)


def test_rerun_of_make_shards_adds_sums_to_older_shards(built, tmp_path) -> None:
    ds, _ = built
    src = ds.parent / "src"
    out = tmp_path / "ds"
    shutil.copytree(ds, out)
    for sums in out.glob("*/*.sums"):
        sums.unlink()
    build_dataset(src, out)
    for tar_path in out.glob("*/shard-*.tar"):
        assert Path(sums_path(str(tar_path))).read_text() == \
            Path(sums_path(str(ds / tar_path.relative_to(out)))).read_text()
    assert os.path.isfile(index_path(str(first_tar(out))))
    assert np.array_equal(SplitTable.load(str(out), "client_000", Manifest.read(str(out))).crc,
                          SplitTable.load(str(ds), "client_000", Manifest.read(str(ds))).crc)
