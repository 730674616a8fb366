"""Atomic writes (mhd_hpc/runtime/files.py): the one way the package replaces a file."""

import os

import pytest

from mhd_hpc.runtime import files
from mhd_hpc.runtime.files import (atomic_write, atomic_write_bytes, atomic_write_text,
                                   replace_durably, temp_path)


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync'ed descriptor, as the path it refers to (through /proc/self/fd)."""
    seen = []
    real = os.fsync

    def record(fd):
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_content_lands_durably_and_no_temp_file_is_left(tmp_path, fsyncs):
    path = tmp_path / "out.json"
    path.write_text("old")
    with atomic_write(path, "w") as f:
        f.write('{"a": 1}')
        assert f.name == str(path) + ".tmp" and path.read_text() == "old"  # not in place yet
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["out.json"]
    # the file's content, then the folder (the rename itself), in that order
    assert fsyncs == [str(tmp_path / "out.json.tmp"), str(tmp_path)]


def test_bytes_and_text_helpers(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "é")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_bytes() == "é".encode("utf-8")
    assert sorted(os.listdir(tmp_path)) == ["b", "t"]


def test_an_exception_inside_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"intact")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"intact"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_an_exception_before_any_file_existed_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "new.txt", "w") as f:
            f.write("x")
            raise ValueError
    assert os.listdir(tmp_path) == []


def test_hidden_temp_name_permissions_and_not_durable(tmp_path, fsyncs):
    path = tmp_path / "shard.tar"
    tmp = temp_path(path, hidden=True)
    assert tmp == str(tmp_path / ".shard.tar.tmp")
    with atomic_write(path, tmp=tmp, chmod=0o640) as f:
        assert f.name == tmp
        f.write(b"tar")
    assert (path.stat().st_mode & 0o777) == 0o640
    assert len(fsyncs) == 2
    atomic_write_text(tmp_path / "seq", "3", durable=False)  # atomic only: no fsync
    assert len(fsyncs) == 2 and (tmp_path / "seq").read_text() == "3"


def test_replace_durably_fsyncs_the_file_and_the_folder(tmp_path, fsyncs):
    tmp, final = tmp_path / "x.h5.tmp", tmp_path / "x.h5"
    tmp.write_bytes(b"written by another library")
    replace_durably(tmp, final)
    assert final.read_bytes() == b"written by another library" and not tmp.exists()
    assert fsyncs == [str(tmp), str(tmp_path)]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode"):
        with atomic_write("unused", "ab"):
            pass


def test_every_writer_of_the_package_goes_through_here():
    root = os.path.dirname(os.path.dirname(files.__file__))
    users = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    if "os.replace(" in f.read():
                        users.append(os.path.relpath(os.path.join(folder, name), root))
    assert users == [os.path.join("runtime", "files.py")]


def test_a_full_disk_is_recognised_through_the_chain_of_errors():
    import errno

    from mhd_hpc.runtime.files import storage_full

    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/run/x.h5.tmp")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("checkpoint of client 3 failed") from exc
    except RuntimeError as outer:
        assert storage_full(outer) is full
    assert storage_full(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    worded = RuntimeError("Can't write data (file write failed: ... No space left on device)")
    assert storage_full(worded) is worded  # h5py says it in words only
    assert storage_full(OSError(errno.EACCES, "Permission denied")) is None
    assert storage_full(ValueError("bad")) is None
