"""Benchmark the image loader backends against the machine's JPEG decode-only limit.

Usage (from the repository root)::

    python tools/bench_loader.py                       # ~1000 generated JPEGs, crop 224, batch 64
    python tools/bench_loader.py --images 2000 --threads 16 --json bench.json

Generates JPEGs of 256-500 px (gradients, shapes, noise; quality 90) into shards with
``tools/make_shards.py``'s logic, then measures images/s of

* ``dali-external``: :func:`open_stream` backend ``dali`` (order-exact external source);
* ``dali-reader``: DALI's ``fn.readers.webdataset`` over the same shards and index files;
* ``wds-pil``: :func:`open_stream` backend ``wds`` (PIL in ``threads`` DataLoader workers);

each for the random-resized-crop ``train`` transform and (order-exact backends) the
deterministic ``public`` one. The reference is the decode-only limit: single-core PIL
full-decode rate x usable cores, measured in the same run. Prints a markdown table and a
per-image cost breakdown, and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import mhd_hpc  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhd_hpc.data.make_shards import ShardSettings, build_imagefolder_shards
from mhd_hpc.data.pil_stream import decode_pil
from mhd_hpc.data.stream_factory import dali_available, open_stream
from mhd_hpc.data.streams import SplitTable
from mhd_hpc.data.synthetic import synthetic_jpeg


def make_dataset(work: Path, n: int, crop: int, seed: int = 0) -> tuple[str, dict]:
    """``n`` train JPEGs in 10 classes (+ a token val set) -> shards of one client."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 10)):
        for i in range(count):
            d = work / "src" / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(256, 501, 2))
            (d / f"{split}{i:05d}.jpg").write_bytes(synthetic_jpeg(rng, w, h))
    s = ShardSettings(train_dir=str(work / "src" / "train"), val_dir=str(work / "src" / "val"),
                      clients=1, public_fraction=0.0, labels_per_client=1, skew=0.0,
                      image_size=crop, samples_per_shard=250)
    out = str(work / "shards")
    return out, build_imagefolder_shards(s, out, workers=1, log=lambda m: None)


def decode_only_rate(blobs: list[bytes], seconds: float = 3.0) -> float:
    """Single-core full PIL decode to RGB, images/s (the work no loader can avoid)."""
    from PIL import Image

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        Image.open(io.BytesIO(blobs[n % len(blobs)])).convert("RGB").load()
        n += 1
    return n / (time.perf_counter() - t0)


def time_batches(next_batch, batch: int, seconds: float, warmup: int = 2) -> dict:
    """img/s of ``next_batch()`` after ``warmup`` calls (pipeline/worker start-up excluded)."""
    for _ in range(warmup):
        next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 4:
        next_batch()
        n += 1
    dt = time.perf_counter() - t0
    return {"batches": n, "seconds": round(dt, 3), "img_s": round(n * batch / dt, 1)}


def breakdown(table: SplitTable, crop: int, n: int = 150) -> dict:
    """Single-core ms per image of each stage of the PIL path (where the time goes)."""
    from PIL import Image

    from mhd_hpc.data.batches import normalize_images
    from mhd_hpc.data.streams import ByteReader

    reader, idx = ByteReader(table), range(min(n, len(table)))
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    blobs = [reader.read(i) for i in idx]
    out["read_bytes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB").load()
    out["decode_full"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    imgs = [decode_pil(b, crop, True, rng) for b in blobs]
    out["train_decode_crop_resize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in blobs:
        decode_pil(b, crop, False, None)
    out["public_decode_resize_crop"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    normalize_images(np.stack(imgs), {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3})
    out["normalise"] = time.perf_counter() - t0
    reader.close()
    return {k: round(1000 * v / len(blobs), 3) for k, v in out.items()}


def dali_stages(blobs: list[bytes], batch: int, crop: int, threads: int,
                seconds: float) -> dict:
    """DALI img/s when the graph stops after each stage (bytes from memory, no Python reads)."""
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, np.uint8) for b in blobs]

    def source(info) -> list[np.ndarray]:
        start = info.iteration * batch
        return [arrays[(start + j) % len(arrays)] for j in range(batch)]

    stages = {
        "decode": lambda j: fn.decoders.image(j, output_type=types.RGB),
        "decode+resize": lambda j: fn.resize(fn.decoders.image(j, output_type=types.RGB),
                                             resize_shorter=round(crop / 0.875),
                                             antialias=True, subpixel_scale=False),
        "decode+resize+crop_normalise": lambda j: fn.crop_mirror_normalize(
            fn.resize(fn.decoders.image(j, output_type=types.RGB),
                      resize_shorter=round(crop / 0.875), antialias=True,
                      subpixel_scale=False),
            crop=(crop, crop), mean=[124.0] * 3, std=[58.0] * 3, dtype=types.FLOAT,
            output_layout="CHW"),
    }
    out = {}
    for name, graph in stages.items():
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None)
        def pipe(graph=graph):
            return graph(fn.external_source(source=source, batch=True, batch_info=True,
                                            dtype=types.UINT8, ndim=1))
        p = pipe()
        p.build()
        out[name] = time_batches(p.run, batch, seconds)["img_s"]
        del p
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads / DataLoader workers (default: usable cores)")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    p.add_argument("--workdir", default=None, help="keep generated data here (default: temp)")
    p.add_argument("--json", default="bench_loader.json", help="where to write the results")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        ds, manifest = make_dataset(work, args.images, args.crop)
        print(f"generated + sharded {manifest['counts']['client_000']} JPEGs in "
              f"{time.perf_counter() - t0:.1f} s ({manifest['bytes']['client_000'] / 1e6:.1f} MB)")
        table = SplitTable.load(ds, "client_000", manifest)
        from mhd_hpc.data.streams import ByteReader

        reader = ByteReader(table)
        blobs = [reader.read(i) for i in range(len(table))]
        single = decode_only_rate(blobs)
        limit = single * cores
        rows = []

        def run(name: str, kind: str, next_batch, extra: dict | None = None) -> None:
            res = time_batches(next_batch, args.batch, args.seconds)
            res.update(backend=name, kind=kind, ratio=round(res["img_s"] / limit, 3),
                       **(extra or {}))
            rows.append(res)
            print(f"  {name:<14}{kind:<7}{res['img_s']:>8.0f} img/s", flush=True)

        for backend in (["dali"] if dali_available() else []) + ["wds"]:
            for kind in ("train", "public"):
                stream, _ = open_stream(ds, "client_000", args.batch, seed=0, kind=kind,
                                        loader=backend, threads=args.threads)
                steps, spent = iter(range(10 ** 9)), [0.0]
                if backend == "dali":  # time the Python side of the external source
                    read = stream._read

                    def timed(idx, read=read, spent=spent):
                        t = time.perf_counter()
                        out = read(idx)
                        spent[0] += time.perf_counter() - t
                        return out
                    stream._read = timed
                t0 = time.perf_counter()
                run("dali-external" if backend == "dali" else "wds-pil", kind,
                    lambda: stream.batch(next(steps)))
                if backend == "dali":
                    rows[-1]["python_read_share"] = round(spent[0] / (time.perf_counter() - t0), 4)
                stream.close()
        if dali_available():
            from mhd_hpc.data.dali_streams import reader_batches

            paths = [str(Path(ds) / f) for f in manifest["splits"]["client_000"]]
            for kind in ("train", "public"):
                gen = reader_batches(paths, args.batch, args.crop, manifest["normalize"],
                                     train=kind == "train", threads=args.threads)
                run("dali-reader", kind, lambda: next(gen))
        costs = breakdown(table, args.crop)
        stages = (dali_stages(blobs, args.batch, args.crop, args.threads, args.seconds / 2)
                  if dali_available() else {})

    result = {"images": len(table), "crop": args.crop, "batch": args.batch,
              "threads": args.threads, "cores": cores, "load_avg": os.getloadavg(),
              "decode_only_single_core_img_s": round(single, 1),
              "decode_only_limit_img_s": round(limit, 1), "rows": rows,
              "pil_ms_per_image_single_core": costs, "dali_public_stages_img_s": stages}
    lines = [f"| backend | kind | img/s | x decode-only limit ({limit:.0f} img/s = "
             f"{single:.0f} x {cores} cores) |", "|---|---|---:|---:|"]
    lines += [f"| {r['backend']} | {r['kind']} | {r['img_s']:.0f} | {r['ratio']:.2f} |"
              for r in rows]
    print("\n".join(lines))
    print("PIL path, ms per image on one core: "
          + ", ".join(f"{k} {v}" for k, v in costs.items()))
    if stages:
        print(f"DALI public graph cut after each stage ({args.threads} threads), img/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    read_share = [r["python_read_share"] for r in rows if "python_read_share" in r]
    if read_share:
        print(f"DALI external source: Python shard reads take {100 * max(read_share):.1f} % "
              f"of wall time")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {cores} cores")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
