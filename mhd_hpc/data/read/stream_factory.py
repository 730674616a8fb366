"""Open a split of a built dataset as a :class:`~mhd_hpc.data.read.streams.BatchStream`, choosing
the loader by name (like timm's ``reader_factory``). Loaders are imported lazily, so a job that
does not use DALI never imports it.
"""

from __future__ import annotations

import logging

from mhd_hpc.data.read.batches import load_split
from mhd_hpc.data.manifest import Manifest
from mhd_hpc.data.read.pil_stream import PilStream
from mhd_hpc.data.records import RECORDS_FORMAT
from mhd_hpc.data.read.streams import KINDS, BatchStream, NpyStream, SplitTable
from mhd_hpc.config.choices import LOADERS  # noqa: F401 (re-exported)

__all__ = ["LOADERS", "dali_available", "open_stream"]

_log = logging.getLogger(__name__)


def dali_available() -> bool:
    """True if ``nvidia.dali`` imports (checked without importing the rest of this package)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def open_stream(dataset_dir: str, split: str, batch_size: int, seed: int, kind: str, *,
                loader: str = "auto", part: int = 0, num_parts: int = 1, threads: int = 2,
                manifest: Manifest | dict | None = None, pin: bool = False,
                prefetch: int = 2, poisson_rate: float = 0.0) -> tuple[BatchStream, str]:
    """Open ``split`` of a built dataset as a :class:`BatchStream`; returns (stream, the loader
    used).

    ``loader``: ``dali`` (JPEG datasets; ``mixed`` GPU decoding when CUDA is available),
    ``wds`` (webdataset tar shards decoded by PIL in ``threads`` DataLoader workers; also serves
    ``.npy`` datasets, from memory), or ``auto``
    (``dali`` when importable and the dataset is JPEG, else ``wds``). The second return value
    names the loader actually used, for the caller's log (``memory`` and ``raw``: samples
    stored at training size, served from memory without a decoding loader). ``manifest``: the
    dataset's manifest when the caller has read it already (a run reads it once). ``pin``:
    batches in page-locked memory (a GPU job); ``prefetch``: batches a loader prepares ahead;
    ``poisson_rate`` > 0: Poisson sampling of a train stream (``privacy.enabled``; not DALI).
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; expected one of {LOADERS}")
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; expected one of {KINDS}")
    manifest = Manifest.read(dataset_dir) if manifest is None else Manifest.of(manifest)
    if split not in manifest.splits:
        raise ValueError(f"split {split!r} not in {dataset_dir}; splits: "
                         f"{', '.join(manifest.splits)}")
    fmt, stored = manifest.format, manifest.split_format(split)
    common = dict(batch_size=batch_size, seed=seed, kind=kind, part=part, num_parts=num_parts,
                  poisson_rate=poisson_rate)
    if loader == "auto":
        loader = "dali" if fmt == "jpg" and dali_available() and not poisson_rate else "wds"
        _log.info("data.loader auto -> %s (%s samples, DALI %s%s)", loader, fmt,
                  "importable" if dali_available() else "not importable",
                  ", Poisson sampling" if poisson_rate else "")
    if fmt in ("npy", RECORDS_FORMAT) and loader == "dali":
        raise ValueError(f"{dataset_dir} holds raw uint8 samples ({fmt}); the DALI loader "
                         f"reads JPEG shards only: use loader='wds' (or 'auto')")
    if stored in ("npy", RECORDS_FORMAT):  # raw uint8 at training resolution: no decode
        stream = NpyStream(load_split(dataset_dir, split, manifest), manifest.normalize,
                           **common)
        return stream, "memory" if stored == "npy" else "raw"  # no decoding loader runs
    if fmt != "jpg":
        raise ValueError(f"{dataset_dir}: unknown sample format {fmt!r}")
    table = SplitTable.load(dataset_dir, split, manifest)
    size = manifest.image_shape[-1]
    if loader == "dali":
        if poisson_rate:
            raise ValueError("Poisson sampling (privacy.enabled) varies the batch size, which "
                             "the DALI pipeline does not take: use loader='wds'")
        if not dali_available():
            raise ValueError("data.loader 'dali' requested but nvidia.dali is not importable "
                             "(pip install nvidia-dali-cuda120); use 'wds' or 'auto'")
        from mhd_hpc.data.read.dali_streams import DaliStream  # lazy: DALI is optional

        return DaliStream(table, manifest.normalize, size, threads, prefetch=prefetch,
                          **common), "dali"
    return PilStream(table, manifest.normalize, size, threads, pin=pin, prefetch=prefetch,
                     **common), "wds"
