"""Run under mpirun (2-4 ranks): the point-to-point exchange delivers exactly what peers sent.

Modes (argv[1]):
  roundtrip  every client sends known outputs along a cycle and a complete graph; receivers check
             values (full distribution and top-k), embeddings, byte counters.
  mismatch   client 1 announces a different public batch; its receiver must raise ExchangeError.
  silent     client 1 never sends; its receiver must time out naming client 1.
  relay      4 ranks as clients of [2, 1, 1] ranks: the 2-rank client's slices go through the
             leaders (gather, whole-batch exchange, scatter); every rank checks that the rows it
             received are the sender's rows for its own slice of the public batch (top-k).
  mean       4 ranks as clients of [2, 1, 1] ranks: World.clients_mean_ weighs clients, not
             ranks, and charges the ring allreduce's traffic.
"""

import sys

import torch

from mhd_hpc.method import topology
from mhd_hpc.distributed.exchange import ClientExchange, PredictionExchange
from mhd_hpc.distributed.world import ClientLayout, init_world

B, C, D, H = 6, 10, 4, 3


def outputs_of(client: int, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * client + step)
    probs = [torch.softmax(3 * torch.randn(B, C, generator=g), 1) for _ in range(H)]
    emb = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    return probs, emb


def rows_of(client: int, rows: range) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Client ``client``'s outputs on public samples ``rows``: a function of (client, sample),
    so any rank can compute what any other rank of any client holds."""
    probs, embs = [], []
    for r in rows:
        g = torch.Generator().manual_seed(7919 * client + r)
        probs.append(torch.softmax(3 * torch.randn(H, C, generator=g), 1))
        embs.append(torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0))
    return list(torch.stack(probs).unbind(1)), torch.stack(embs)


def relay(world, top_k: int) -> None:
    """Clients of [2, 1, 1] ranks; complete graph, every client hears from every other."""
    world.assign_clients(ClientLayout.contiguous([2, 1, 1]))
    me, batch = world.client, 6
    part = batch // world.local_size
    mine = range(world.local_rank * part, (world.local_rank + 1) * part)
    ex = ClientExchange(world, num_heads=H, num_classes=C, batch_size=batch, top_k=top_k,
                        embedding_dim=D, timeout_s=60)
    others = [c for c in range(3) if c != me]
    ex.post_receives(1, others, others)
    probs, emb = rows_of(me, mine)
    got = ex.complete(4321, 4321, probs, emb)  # one key hash: the test checks rows, not keys
    assert [p.client for p in got] == others
    for p in got:
        want_probs, want_emb = rows_of(p.client, mine)
        for h in range(H):
            v, i = want_probs[h].topk(top_k, dim=1)
            assert torch.allclose(p.head_probs[h].gather(1, i), v, atol=2e-3), (me, p.client)
        assert torch.allclose(p.embedding, want_emb, atol=2e-3)


def clients_mean(world) -> None:
    world.assign_clients(ClientLayout.contiguous([2, 1, 1]))
    value = torch.full((5,), float(world.client + 1))
    sent = world.clients_mean_([value])
    # Per client: (1 + 2 + 3) / 3 = 2, whatever the rank counts (by rank it would be 1.75).
    assert torch.allclose(value, torch.full((5,), 2.0)), value
    assert sent == 2 * 3 * 5 * 4 // 4, sent  # ring allreduce over 4 ranks: 2 (P-1)/P x 20 B


def main() -> None:
    mode = sys.argv[1]
    world = init_world()
    if mode in ("relay", "mean"):
        with world.guard():
            if mode == "relay":
                relay(world, top_k=3)
            else:
                clients_mean(world)
        world.barrier()
        print(f"rank {world.rank}: {mode} ok", flush=True)
        return
    world.assign_clients(ClientLayout.one_rank_per_client(world.size))
    me, k = world.client, world.size
    if mode == "roundtrip":
        for top_k in (0, 3):
            ex = PredictionExchange(world, num_heads=H, num_classes=C, batch_size=B, top_k=top_k,
                                    embedding_dim=D, timeout_s=60)
            for step, graph in ((1, topology.cycle(k)), (2, topology.complete(k))):
                peers = topology.peers_at_step(graph, step, delta=k, seed=0)
                probs, emb = outputs_of(me, step)
                got = ex.exchange(step, 1234, probs, emb, topology.out_peers(peers)[me], peers[me])
                assert [p.client for p in got] == peers[me], (got, peers[me])
                for p in got:
                    want_probs, want_emb = outputs_of(p.client, step)
                    for h in range(H):
                        if top_k == 0:
                            assert torch.allclose(p.head_probs[h], want_probs[h], atol=2e-3)
                        else:  # the k largest survive exactly (fp16), the rest is spread evenly
                            v, i = want_probs[h].topk(top_k, dim=1)
                            assert torch.allclose(p.head_probs[h].gather(1, i), v, atol=2e-3)
                            assert torch.allclose(p.head_probs[h].sum(1), torch.ones(B), atol=1e-2)
                    assert torch.allclose(p.embedding, want_emb, atol=2e-3)
            sent, received, _ = ex.take_counters()
            assert received > 0 and sent > 0
        world.barrier()
        print(f"client {me}: roundtrip ok", flush=True)
    elif mode == "mismatch":
        ex = PredictionExchange(world, num_heads=H, num_classes=C, batch_size=B, top_k=0,
                                embedding_dim=0, timeout_s=60)
        probs, _ = outputs_of(me, 1)
        key_hash = 99 if me == 1 else 1234
        peers = topology.peers_at_step(topology.cycle(k), 1, 1, 0)
        with world.guard():
            ex.exchange(1, key_hash, probs, None, topology.out_peers(peers)[me], peers[me])
        world.barrier()
    elif mode == "silent":
        ex = PredictionExchange(world, num_heads=H, num_classes=C, batch_size=B, top_k=0,
                                embedding_dim=0, timeout_s=3)
        probs, _ = outputs_of(me, 1)
        peers = topology.peers_at_step(topology.cycle(k), 1, 1, 0)
        send_to = [] if me == 1 else topology.out_peers(peers)[me]
        with world.guard():
            ex.exchange(1, 1234, probs, None, send_to, peers[me])
        world.barrier()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
