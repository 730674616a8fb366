"""Training from JPEG shards built by tools/make_shards.py, with each loader backend."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from _jpeg_tree import make_image_folder
from conftest import ROOT, run_mpi
from mhd_hpc.data.read.stream_factory import dali_available
from mhd_hpc.report import main as report_main

JOB = ["data.dataset=shards", "clients.count=2", "run.steps=6", "run.eval_every=6",
       "run.log_every=3", "run.checkpoint_every=6", "data.batch_size=8",
       "data.public_batch_size=8", "data.loader_threads=1", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(src, classes=4, per_class=12)
    out = src / "shards"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "imagefolder",
                    str(src / "train"), str(out), "--clients", "2", "--labels-per-client", "2",
                    "--skew", "10", "--image-size", "32", "--samples-per-shard", "8",
                    "--workers", "1"], check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", [
    "wds", pytest.param("dali", marks=pytest.mark.skipif(
        not dali_available(), reason="nvidia.dali not importable (pip install -e '.[dali]')"))])
def test_mhd_trains_from_jpeg_shards(tmp_path, jpeg_shards, loader, capsys):
    run = tmp_path / loader
    res = run_mpi(2, ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"),
                      f"run.out_dir={run}", f"data.root={jpeg_shards}", f"data.loader={loader}",
                      *JOB], timeout=240)
    assert res.returncode == 0, res.stderr
    assert f"loader {loader}" in res.stdout and "4 classes" in res.stdout
    assert report_main([str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 6 and set(summary["clients"]) == {"client0", "client1"}


def test_shards_built_for_other_client_count_are_refused(tmp_path, jpeg_shards):
    res = run_mpi(3, ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"),
                      f"run.out_dir={tmp_path / 'run'}", f"data.root={jpeg_shards}", *JOB,
                      "clients.count=3"], timeout=120)
    assert res.returncode == 2
    assert "config error at 'clients.count'" in res.stderr
    assert "partitioned for 2 clients" in res.stderr


@pytest.fixture
def damaged_copy(tmp_path, jpeg_shards):
    """A copy of the JPEG shards, and its client 1's first shard (to be damaged)."""
    copy = tmp_path / "shards"
    shutil.copytree(jpeg_shards, copy)
    return copy, sorted(copy.glob("client_001/shard-*.tar"))[0]


def test_truncated_jpeg_shard_is_named_before_the_run_folder(tmp_path, damaged_copy):
    copy, shard = damaged_copy
    os.truncate(shard, shard.stat().st_size // 2)
    run = tmp_path / "run"
    res = run_mpi(2, ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"),
                      f"run.out_dir={run}", f"data.root={copy}", *JOB], timeout=120)
    assert res.returncode == 2
    ours = [ln for ln in res.stderr.split("-" * 20)[0].splitlines() if ln.strip()]
    assert len(ours) == 1 and "Traceback" not in res.stderr, res.stderr
    assert ours[0].startswith(f"mhd_hpc: config error at 'data.root': {shard} has ")
    assert "truncated or replaced" in ours[0]
    assert not run.exists()  # found before the run folder was claimed


@pytest.mark.parametrize("loader", ["auto", "wds"])  # auto (the default): DALI if importable
def test_zeroed_jpeg_member_is_named_with_default_settings(tmp_path, damaged_copy, loader):
    copy, shard = damaged_copy
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.name.endswith(".jpg")]
    data = bytearray(shard.read_bytes())
    for m in members:  # every JPEG of the shard: the first batch reads one of them
        data[m.offset_data:m.offset_data + m.size] = bytes(m.size)
    shard.write_bytes(bytes(data))
    res = run_mpi(2, ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"),
                      f"run.out_dir={tmp_path / 'run'}", f"data.root={copy}", *JOB,
                      f"data.loader={loader}"], timeout=180)
    assert res.returncode != 0
    keys = [m.name.split(".")[0] for m in members]
    assert f"DamagedSample: {shard}: sample '" in res.stderr, res.stderr
    named = res.stderr.split(f"DamagedSample: {shard}: sample '")[1].split("'")[0]
    assert named in keys and "CRC32 mismatch" in res.stderr
