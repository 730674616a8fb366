"""Benchmark the data path end to end: batches ready for the training step, as the trainer gets
them, with every rank of a node loading at once.

Usage (from the repository root)::

    python tools/bench_loader.py                        # 2 ranks, PIL and DALI (CPU), 224 px
    python tools/bench_loader.py --ranks 8 --threads 2 --images 4000 --json bench.json
    python tools/bench_loader.py --device cuda          # on a GPU node: to the device
    python tools/bench_loader.py --max-side 256         # training JPEGs stored near 224 px

Generates ImageNet-like JPEGs (500 x 375 px and similar, gradients, shapes and noise, quality
90) in one folder, builds them with tools/make_shards.py's logic into one client's shards (and,
with this version, the public split decoded at the training size), then starts ``--ranks``
processes that each read, for every step, one private (train transform) and one public batch
through the trainer's own path (``devices.BatchFeed``: the loader's workers decode, the next
step's batch is prepared in the background, normalised where it is used) for ``--seconds``.

Per loader and stream (train, public, both together) it reports the node's images/s, images/s
per CPU core busy (CPU seconds of every process and thread of the ranks, workers included, over the wall
time), and the training thread's time per batch (what the step waits for). With ``--step-ms
MS`` every rank sleeps MS after each batch, as a GPU step leaves the CPU to the loader: when the
loader keeps up, the training thread's time per batch is then the hand-over alone. Run it with
PYTHONPATH pointing at an older checkout to compare versions: it falls back to the older API.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import mhd_hpc  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (500, 500)]


def make_dataset(work: Path, n: int, crop: int, seed: int = 0, max_side: int | None = None
                 ) -> str:
    """``n`` JPEGs in 10 classes, 20% of them the public split, built into one client
    (``max_side``: re-encoded no larger, as ``make_shards --max-side`` stores them)."""
    from mhd_hpc.data.build.make_shards import ShardSettings, build_imagefolder_shards
    from mhd_hpc.data.read.synthetic import synthetic_jpeg

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 20)):
        for i in range(count):
            d = work / "src" / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = SIZES[i % len(SIZES)]
            (d / f"{split}{i:05d}.jpg").write_bytes(synthetic_jpeg(rng, w, h))
    s = ShardSettings(train_dir=str(work / "src" / "train"), val_dir=str(work / "src" / "val"),
                      clients=1, public_fraction=0.2, labels_per_client=1, skew=0.0,
                      image_size=crop, samples_per_shard=250, max_side=max_side)
    out = str(work / "shards")
    build_imagefolder_shards(s, out, workers=max(1, (os.cpu_count() or 2) - 1),
                             log=lambda m: None)
    return out


STREAMS = {"train": ("client_000", "train"), "public": ("public", "public")}


def _batches(dataset: str, loader: str, batch: int, threads: int, rank: int, ranks: int,
             device, kinds: list[str]):
    """(get(step) -> device batches, close) through the trainer's path (or the older one)."""
    import inspect

    import torch

    from mhd_hpc.data.read.stream_factory import open_stream

    name = "loader" if "loader" in inspect.signature(open_stream).parameters else "backend"
    streams = [open_stream(dataset, STREAMS[k][0], batch * ranks, 1, STREAMS[k][1],
                           part=rank, num_parts=ranks, threads=threads, **{name: loader})[0]
               for k in kinds]
    try:
        from mhd_hpc.data.read.feed import BatchFeed
    except ImportError:  # an older checkout: stream.batch + to_device on the training thread
        from mhd_hpc.data.read.feed import to_device

        def get(step):
            return [to_device(s.batch(step), device) for s in streams]
        return get, lambda: [s.close() for s in streams]
    feeds = [BatchFeed(s, device) for s in streams]

    def get(step):
        out = [f.batch(step) for f in feeds]
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the batch is usable: copy included
        return out
    return get, lambda: [f.close() or s.close() for f, s in zip(feeds, streams)]


def _rank(rank: int, args: dict, start, results) -> None:
    import psutil
    import torch

    torch.set_num_threads(1)
    device = torch.device(args["device"])
    get, close = _batches(args["dataset"], args["loader"], args["batch"], args["threads"],
                          rank, args["ranks"], device, args["kinds"])
    for step in range(3):  # workers and pipelines start
        get(step)
    start.wait()
    me = psutil.Process()
    cpu0 = _cpu(me)
    t0, step, waits = time.perf_counter(), 3, []
    while time.perf_counter() - t0 < args["seconds"]:
        w0 = time.perf_counter()
        get(step)
        waits.append(time.perf_counter() - w0)
        step += 1
        if args.get("step_ms"):  # the step's compute, on a device, while the loader works
            time.sleep(args["step_ms"] / 1000)
    wall = time.perf_counter() - t0
    cpu = _cpu(me) - cpu0
    close()
    results.put({"rank": rank, "steps": step - 3, "wall": wall, "cpu": cpu,
                 "wait_ms": 1000 * statistics.median(waits)})


def _cpu(proc) -> float:
    """CPU seconds of a process, its threads and its live children (loader workers)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except Exception:  # noqa: BLE001 - a worker that just exited
            pass
    return total


def measure(dataset: str, loader: str, kinds: list[str], args: argparse.Namespace) -> dict:
    """Every rank reads the streams ``kinds`` (train, public) step after step."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(args.ranks), ctx.Queue()
    spec = {"dataset": dataset, "loader": loader, "batch": args.batch, "threads": args.threads,
            "ranks": args.ranks, "device": args.device, "seconds": args.seconds,
            "kinds": kinds, "step_ms": args.step_ms}
    procs = [ctx.Process(target=_rank, args=(r, spec, start, results))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    images = sum(r["steps"] for r in rows) * args.batch * len(kinds)
    wall = max(r["wall"] for r in rows)
    cpu = sum(r["cpu"] for r in rows)
    return {"loader": loader, "streams": "+".join(kinds), "ranks": args.ranks,
            "threads": args.threads, "img_s": images / wall, "cores_busy": cpu / wall,
            "img_s_per_core": images / cpu,
            "train_thread_ms_per_batch": statistics.median(r["wait_ms"] for r in rows)
            / len(kinds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="per rank and stream")
    p.add_argument("--ranks", type=int, default=2, help="processes loading at once (a node)")
    p.add_argument("--threads", type=int, default=1, help="data.loader_threads per rank")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--loaders", default="wds,dali")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default=None, help="reuse a dataset folder (else generated)")
    p.add_argument("--max-side", type=int, default=None,
                   help="store the training JPEGs at most this large (make_shards --max-side)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="sleep this long after each batch (a device step); 0: loader-bound")
    p.add_argument("--streams", default="train,public,train+public",
                   help="which stream sets to measure, comma-separated")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from mhd_hpc.data.read.stream_factory import dali_available

    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or make_dataset(Path(tmp), args.images, args.crop,
                                                max_side=args.max_side)
        rows = []
        for loader in args.loaders.split(","):
            if loader == "dali" and not dali_available():
                print("dali: not importable, skipped", file=sys.stderr)
                continue
            for kinds in (k.split("+") for k in args.streams.split(",")):
                rows.append(measure(dataset, loader, kinds, args))
                r = rows[-1]
                print(f"{loader} {r['streams']}: {r['img_s']:.0f} img/s, {r['cores_busy']:.2f} "
                      f"cores busy, {r['img_s_per_core']:.0f} img/s per core, training thread "
                      f"{r['train_thread_ms_per_batch']:.2f} ms per batch", flush=True)
    print("\n| loader | streams | ranks x threads | img/s | img/s per core busy | "
          "training thread per batch |\n|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['loader']} | {r['streams']} | {r['ranks']} x {r['threads']} | "
              f"{r['img_s']:.0f} | {r['img_s_per_core']:.0f} | "
              f"{r['train_thread_ms_per_batch']:.2f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
