"""Per-client folders (mhd_hpc/data/build/client_folders.py, mhd-make-shards clientfolders): the
split of the folders is kept; a public folder becomes the public set, or a fraction is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mhd_hpc.cli.make_shards import main as make_shards
from mhd_hpc.data.read.synthetic import synthetic_jpeg


def _tree(root: Path, per_class: dict[str, int], seed: int) -> int:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{name}_{i}.jpg").write_bytes(synthetic_jpeg(rng, 40, 36, "RGB"))
    return sum(per_class.values())


ARGS = ["--image-size", "16", "--samples-per-shard", "8", "--workers", "1"]


def test_client_folders_keep_their_split(tmp_path):
    src = tmp_path / "src"
    sizes = [_tree(src / "client_000", {"cat": 6, "dog": 2}, 0),
             _tree(src / "client_001", {"dog": 5, "eel": 4}, 1)]
    _tree(src / "public", {"cat": 3, "eel": 3}, 2)
    _tree(src / "test", {"cat": 2, "dog": 2, "eel": 2}, 3)
    assert make_shards(["clientfolders", str(src), str(tmp_path / "out"), *ARGS]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    part = manifest["partition"]
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert part["num_clients"] == 2 and part["client_counts"] == sizes
    assert part["counts"] == [[6, 2, 0], [0, 5, 4]]  # per client and class, as the folders
    assert manifest["counts"]["public"] == 6 and manifest["counts"]["test"] == 6
    assert part["settings"]["partition"] == "client_folders"


def test_without_a_public_folder_a_fraction_is_drawn_and_errors_name_the_flag(tmp_path, capsys):
    src = tmp_path / "src"
    _tree(src / "client_000", {"a": 10}, 0)
    _tree(src / "client_001", {"b": 10}, 1)
    _tree(src / "test", {"a": 2, "b": 2}, 3)
    out = tmp_path / "out"
    assert make_shards(["clientfolders", str(src), str(out), "--public-fraction", "0.2",
                        *ARGS]) == 0
    part = json.loads((out / "manifest.json").read_text())["partition"]
    assert part["public_count"] == 4 and sum(part["client_counts"]) == 16
    assert make_shards(["clientfolders", str(src), str(tmp_path / "o2"), "--min-samples", "9",
                        "--public-fraction", "0.2", *ARGS]) == 2
    assert "--min-samples:" in capsys.readouterr().err
    assert make_shards(["clientfolders", str(src), str(tmp_path / "o3"), "--clients", "3",
                        *ARGS]) == 1
    assert "has 2 client folders, but 3 clients" in capsys.readouterr().err
    (src / "client_005").mkdir()
    with pytest.raises(SystemExit):
        make_shards(["clientfolders"])
    assert make_shards(["clientfolders", str(src), str(tmp_path / "o4"), *ARGS]) == 1
    assert "numbered 0..2" in capsys.readouterr().err
