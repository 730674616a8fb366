"""Benchmark the per-step prediction exchange at ImageNet scale.

    mpirun --oversubscribe -np 4 python tools/bench_exchange.py [--batch 512 --classes 1000
        --heads 5 --emb 512 --steps 30]

Every rank plays one client on a complete graph with one peer per step (the paper's setting,
Delta = 1) and exchanges real buffers through ``PredictionExchange``; rank 0 prints a markdown
table: message size, time per exchange (median over steps, including pack/unpack), and the
part spent encoding and decoding, for the full distribution and for top-k.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhd_hpc.method import topology  # noqa: E402
from mhd_hpc.distributed.exchange import PredictionExchange  # noqa: E402
from mhd_hpc.distributed.world import ClientLayout, init_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=5, help="main + aux heads")
    parser.add_argument("--emb", type=int, default=512, help="embedding width (0 = not sent)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write results to this file")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the outputs live (cuda: every rank on its node-local GPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_world()
    world.assign_clients(ClientLayout.one_rank_per_client(world.size))
    graph = topology.complete(world.size)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", world.node_local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(world.rank)
    probs = [torch.softmax(torch.randn(args.batch, args.classes, generator=g), 1).to(device)
             for _ in range(args.heads)]
    emb = torch.nn.functional.normalize(torch.randn(args.batch, max(args.emb, 1),
                                                    generator=g)).to(device)
    results = []
    for top_k in (0, 10, 1):
        ex = PredictionExchange(world, num_heads=args.heads, num_classes=args.classes,
                                batch_size=args.batch, top_k=top_k, embedding_dim=args.emb,
                                timeout_s=600, device=device)
        t_pack = statistics.median(_time(lambda: ex.pack(0, 1, 0, probs, emb)) for _ in range(5))
        buf = ex.pack(0, 1, world.client, probs, emb)
        t_unpack = statistics.median(_time(lambda: ex.unpack(buf, 0, 1, world.client))
                                     for _ in range(5))
        times = []
        for step in range(1, args.steps + 1):
            peers = topology.peers_at_step(graph, step, 1, seed=0)
            world.barrier()  # time the exchange itself, not rank skew from the previous step
            t0 = time.perf_counter()
            ex.exchange(step, 1, probs, emb, topology.out_peers(peers)[world.client],
                        peers[world.client])
            times.append(time.perf_counter() - t0)
        worst = world.max_over_ranks(statistics.median(times))
        results.append({"top_k": top_k or args.classes, "message_kb": ex.message_bytes / 1024,
                        "exchange_ms": 1000 * worst, "pack_ms": 1000 * t_pack,
                        "unpack_ms": 1000 * t_unpack})
    if world.is_root:
        print(f"{world.size} ranks, batch {args.batch}, {args.classes} classes, {args.heads} "
              f"heads, embedding {args.emb}, Delta = 1, outputs on {args.device}\n")
        print("| sent per head | message | exchange (median, slowest rank) | pack | unpack |")
        print("|---|---|---|---|---|")
        for r in results:
            print(f"| top {r['top_k']} | {r['message_kb']:.0f} KiB | {r['exchange_ms']:.1f} ms | "
                  f"{r['pack_ms']:.1f} ms | {r['unpack_ms']:.1f} ms |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # decoding on a GPU returns before the device is done
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
