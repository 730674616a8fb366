"""tools/make_shards.py under real mpirun: two ranks write the same dataset as one process."""

from __future__ import annotations

import json
from pathlib import Path

import test_make_shards
from conftest import run_mpi
from test_make_shards import ARGS, TOOL, _shards

built = test_make_shards.built  # its module-scoped fixture (the reference build), reused here


def test_mpi_ranks_write_the_same_dataset(built, tmp_path: Path) -> None:
    src, ref_out, _, ref = built
    out = tmp_path / "out"
    res = run_mpi(2, [str(TOOL), "imagefolder", str(src / "train"), str(out), *ARGS],
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert "rank 1/2" in res.stderr and res.stdout.count("total ") == 1  # rank 0 summarises
    assert json.loads((out / "manifest.json").read_text()) == ref
    assert [p.read_bytes() for p in _shards(out)] == [p.read_bytes() for p in _shards(ref_out)]
