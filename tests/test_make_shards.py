"""tools/make_shards.py (mhd_hpc/data/build/make_shards.py): JPEG shards, DALI indexes, resume."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from _jpeg_tree import make_image_folder
from conftest import ROOT
from mhd_hpc.data.build.make_shards import FAULT_ENV
from mhd_hpc.data.manifest import format_summary
from mhd_hpc.data.build.partition import make_partition
from mhd_hpc.data.read.stream_factory import dali_available
from mhd_hpc.data.tarindex import index_path, index_tar, read_index

TOOL = ROOT / "tools" / "make_shards.py"
ARGS = ["--clients", "3", "--labels-per-client", "2", "--skew", "10", "--seed", "0",
        "--image-size", "32", "--samples-per-shard", "4", "--workers", "1"]
needs_dali = pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali not importable (pip install nvidia-dali-cuda120)")


def _tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(src: Path, out: Path, *extra: str) -> dict:
    assert _tool().main(["imagefolder", str(src / "train"), str(out), *ARGS, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _members(tar_path: Path) -> dict[str, bytes]:
    """A shard's members; a decoded record shard (public, test) as ``{key}.cls`` entries."""
    if tar_path.suffix == ".npy":
        meta = json.loads(tar_path.with_suffix(".json").read_text())
        return {f"{k}.cls": str(label).encode() for k, label in zip(meta["keys"], meta["labels"])}
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def _shards(out: Path, kind: str = "*") -> list[Path]:
    """Every shard (``tar``: the JPEG ones; ``npy``: the decoded record shards)."""
    return sorted(p for p in out.glob("*/shard-*.*") if p.suffix in (
        (".tar", ".npy") if kind == "*" else (f".{kind}",)))


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.glob("*/shard-*.*")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    src = tmp_path_factory.mktemp("src")
    special = make_image_folder(src)
    out = tmp_path_factory.mktemp("shards")
    return src, out, special, _run(src, out)


def test_counts_partition_and_manifest(built) -> None:
    src, out, special, m = built
    assert m["dataset"] == "imagefolder" and m["format"] == "jpg" and m["format_version"] == 1
    assert m["classes"] == special["classes"] and m["num_classes"] == 4
    assert m["image_shape"] == [3, 32, 32]
    assert m["normalize"]["mean"] == [0.485, 0.456, 0.406] and m["normalize"]["scale"] == 1 / 255
    assert m["corrupt"] == [special["corrupt"]]  # reported by path, not dropped silently
    assert sorted(m["splits"]) == ["client_000", "client_001", "client_002", "public", "test"]
    assert m["counts"]["test"] == 12 and sum(m["counts"].values()) == 40 - 1 + 12
    # The split is exactly make_partition of the sorted train listing, minus the corrupt file
    # (train/n00000002/n00000002_3.JPEG = sample 2 * 10 + 3).
    labels = np.repeat(np.arange(4), 10)
    part = make_partition(labels, 3, 0.1, "random", 2, 10.0, 0, num_classes=4)
    assert m["partition"]["counts"] == part.counts.tolist()
    planned = {"public": part.public, **{f"client_{i:03d}": c for i, c in enumerate(part.clients)}}
    for split, idx in planned.items():
        expected = np.bincount(labels[idx], minlength=4)
        expected[2] -= int(23 in idx)
        assert m["class_counts"][split] == expected.tolist(), split
    # Splits are disjoint, keys unique, labels in .cls agree with the source folder.
    seen: set[str] = set()
    for split, files in m["splits"].items():
        keys = []
        for f in files:
            members = _members(out / f)
            for name, data in members.items():
                if name.endswith(".cls"):
                    key = name[:-4]
                    assert int(data) == m["classes"].index(key.split("_")[0 if split != "test"
                                                                           else 1])
                    keys.append(key)
        assert len(keys) == m["counts"][split] and not seen & set(keys)
        seen |= set(keys)
    assert "corrupt: " + special["corrupt"] in format_summary(m)


def test_index_files_match_wds2idx(built) -> None:
    _, out, _, _ = built
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for shard in _shards(out, "tar"):
        entries = read_index(index_path(str(shard)))
        assert entries == index_tar(str(shard))
        keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in _members(shard)))
        assert [e.key for e in entries] == keys
    if not wds2idx.exists() or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx (or GNU tar) not available for a byte comparison")
    shard = _shards(out, "tar")[0]
    ref = out / "ref.idx"
    subprocess.run([str(wds2idx), str(shard), str(ref)], check=True, capture_output=True)
    assert ref.read_text() == Path(index_path(str(shard))).read_text()
    ref.unlink()


@needs_dali
def test_dali_reader_accepts_index_files(built) -> None:
    from mhd_hpc.data.read.dali_streams import reader_batches

    _, out, _, m = built
    paths = [str(out / f) for f in m["splits"]["client_000"]]
    n = m["counts"]["client_000"]
    images, labels = next(reader_batches(paths, n, 32, m["normalize"], train=False, threads=1))
    expected = [int(d) for p in paths for k, d in _members(Path(p)).items() if k.endswith(".cls")]
    assert images.shape == (n, 3, 32, 32) and labels.tolist() == expected


def test_gray_and_cmyk_keep_original_bytes(built, tmp_path: Path) -> None:
    src, _, special, _ = built
    out = tmp_path / "jpeg"
    m = _run(src, out, "--no-decode-public")  # every split JPEG, as datasets built before
    assert "split_formats" not in m or not m["split_formats"]
    stored = {k: v for s in _shards(out) for k, v in _members(s).items() if k.endswith(".jpg")}
    for mode in ("L", "CMYK"):
        src = Path(special[mode])
        assert src.read_bytes() in stored.values(), f"{mode} image was not stored verbatim"


def test_max_side_reencodes_to_rgb(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", classes=3, per_class=4, val_per_class=1)
    m = _run(tmp_path / "src", tmp_path / "out", "--max-side", "40", "--labels-per-client", "1",
             "--no-decode-public")
    assert len(m["corrupt"]) == 1
    assert m["converted"] == sum(m["counts"].values())  # every source is wider than 40 px
    for shard in _shards(tmp_path / "out"):
        for name, data in _members(shard).items():
            if name.endswith(".jpg"):
                im = Image.open(io.BytesIO(data))
                assert max(im.size) <= 40 and im.mode == "RGB", name  # gray/CMYK became RGB


def test_interrupted_build_resumes_without_redoing(built, tmp_path: Path, monkeypatch) -> None:
    src, ref_out, _, ref = built
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "3")
    with pytest.raises(RuntimeError, match="injected"):
        _run(src, out)
    assert not (out / "manifest.json").exists()
    finished = _mtimes(out)
    assert len(list(out.glob("*/*.done"))) == 3
    monkeypatch.delenv(FAULT_ENV)
    m = _run(src, out)
    after = _mtimes(out)
    assert all(after[p] == t for p, t in finished.items())  # finished shards untouched
    assert m == ref  # same settings, same result as the uninterrupted build
    for a, b in zip(_shards(out), _shards(ref_out)):  # and byte-identical shards
        assert a.read_bytes() == b.read_bytes()


def test_rerun_is_idempotent(built, capsys) -> None:
    src, out, _, ref = built
    before = _mtimes(out)
    assert _run(src, out) == ref
    assert _mtimes(out) == before
    assert f"{len(_shards(out))} already complete" in capsys.readouterr().err


def test_cli_subprocess_pool_and_label_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", val_label_file=True, seed=1)
    cmd = [sys.executable, str(TOOL), "imagefolder", str(tmp_path / "src" / "train"),
           str(tmp_path / "out"), *ARGS[:-1], "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "client_002" in res.stdout and "1 corrupt" in res.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["counts"]["test"] == 12 and m["settings"]["val_labels"] is None
    assert all(os.path.exists(index_path(str(p))) for p in _shards(tmp_path / "out", "tar"))


def test_public_and_test_splits_are_stored_decoded(built) -> None:
    """Every client reads the public split with the deterministic transform: decoded once, at
    build time, into raw uint8 records of the training size (no JPEG decode at training time),
    pixel for pixel what the PIL loader computes from the source."""
    from mhd_hpc.data.read.pil_stream import decode_pil
    from mhd_hpc.data.read.stream_factory import open_stream

    src, out, special, m = built
    assert m["split_formats"] == {"public": "u8", "test": "u8"}
    assert all(f.endswith(".npy") for split in ("public", "test") for f in m["splits"][split])
    assert all(f.endswith(".tar") for f in m["splits"]["client_000"])
    for rel in m["splits"]["test"] + m["splits"]["public"]:
        assert rel in m["shard_sha256"] and rel.replace(".npy", ".json") in m["shard_sha256"]
    stream, name = open_stream(str(out), "test", 5, 0, "eval", loader="auto", threads=0)
    assert name == "raw"
    first = next(stream.eval_batches())
    assert first.images.dtype == torch.uint8 and first.images.shape == (5, 3, 32, 32)
    for i, key in enumerate(first.keys):  # val_<class>_<file>: the source of each sample
        cls, rest = key.removeprefix("val_").split("_", 1)
        path = src / "val" / cls / f"{rest}.JPEG"
        want = decode_pil(path.read_bytes(), 32, False, None)[0]
        assert np.array_equal(first.images[i].numpy(), want), key
