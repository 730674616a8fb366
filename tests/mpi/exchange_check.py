"""Run under mpirun (2-4 ranks): the point-to-point exchange delivers exactly what peers sent.

Modes (argv[1]):
  roundtrip  every client sends known outputs along a cycle and a complete graph; receivers check
             values (full distribution and top-k), embeddings, byte counters.
  mismatch   client 1 announces a different public batch; its receiver must raise ExchangeError.
  silent     client 1 never sends; its receiver must time out naming client 1.
"""

import sys

import torch

from mhd_hpc import topology
from mhd_hpc.distributed.exchange import PredictionExchange
from mhd_hpc.distributed.world import ClientLayout, init_world

B, C, D, H = 6, 10, 4, 3


def outputs_of(client: int, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * client + step)
    probs = [torch.softmax(3 * torch.randn(B, C, generator=g), 1) for _ in range(H)]
    emb = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    return probs, emb


def main() -> None:
    mode = sys.argv[1]
    world = init_world()
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
