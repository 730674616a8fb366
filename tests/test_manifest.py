"""Dataset manifests (mhd_hpc/data/manifest.py): a missing, corrupt or future manifest is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mhd_hpc.data.manifest import load_manifest


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_manifest(str(tmp_path))
