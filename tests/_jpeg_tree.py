"""Test helper: small ImageFolder trees of real JPEGs (odd sizes, gray, CMYK, one corrupt file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhd_hpc.data.read.synthetic import synthetic_jpeg


def make_image_folder(root: Path, classes: int = 4, per_class: int = 10, val_per_class: int = 3,
                      seed: int = 0, val_label_file: bool = False) -> dict:
    """``root/train/<class>/*.JPEG`` + validation; returns paths of the special files.

    Train holds one grayscale, one CMYK JPEG and one corrupt (truncated) file; the validation set
    is a class tree, or (``val_label_file``) flat images plus ``val_labels.txt``.
    """
    rng = np.random.default_rng(seed)
    names = [f"n{c:08d}" for c in range(classes)]
    special: dict = {}
    for c, name in enumerate(names):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if (c, i) == (0, 1) else "CMYK" if (c, i) == (1, 2) else "RGB"
            w, h = int(rng.integers(41, 97)), int(rng.integers(41, 97))
            path = folder / f"{name}_{i}.JPEG"
            data = synthetic_jpeg(rng, w, h, mode)
            if (c, i) == (2, 3):
                data = data[: len(data) // 2]  # truncated mid-scan
                special["corrupt"] = str(path)
            path.write_bytes(data)
            if mode != "RGB":
                special[mode] = str(path)
    val = root / "val"
    lines = []
    for c, name in enumerate(names):
        for i in range(val_per_class):
            fname = f"val_{c:02d}_{i}.JPEG"
            folder = val if val_label_file else val / name
            folder.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(41, 97)), int(rng.integers(41, 97))
            (folder / fname).write_bytes(synthetic_jpeg(rng, w, h))
            lines.append(f"{fname} {name}\n")
    if val_label_file:
        (val / "val_labels.txt").write_text("".join(lines))
    special["classes"] = names
    return special


def build_dataset(root: Path, out: Path, **overrides) -> dict:
    """Build shards of ``root``'s tree in-process (tiny settings); return the manifest."""
    from mhd_hpc.data.build.make_shards import ShardSettings, build_imagefolder_shards

    opts = dict(train_dir=str(root / "train"), val_dir=str(root / "val"), clients=3,
                labels_per_client=2, skew=10.0, seed=0, image_size=32, samples_per_shard=4)
    opts.update(overrides)
    return build_imagefolder_shards(ShardSettings(**opts), str(out), log=lambda m: None)
