"""LiveTargets (mhd_hpc/method/targets.py, exchange.mode=predictions): which peers a client asks
at each step and what it hands the exchange, on a world of one rank. The exchange is replaced by
a recorder of its calls (ClientExchange itself is tested under mpirun in test_exchange_mpi.py)."""

import torch

from mhd_hpc.data.read.batches import Batch, key_hash
from mhd_hpc.method import topology
from mhd_hpc.distributed.codec import PeerOutputs
from mhd_hpc.method.targets import LiveTargets

B, C = 6, 5


class RecordingExchange:
    """Records the calls LiveTargets makes; ``complete`` returns one fixed peer output."""

    def __init__(self):
        self.calls = []
        self.reply = [PeerOutputs(2, [torch.full((B, C), 1.0 / C)], None)]

    def post_receives(self, step, send_to, receive_from):
        self.calls.append(("post_receives", step, list(send_to), list(receive_from)))

    def send(self, slice_hash, head_probs, embedding, defer=False):
        self.calls.append(("send", slice_hash, head_probs, embedding, defer))

    def complete(self, slice_hash, batch_hash, head_probs, embedding):
        self.calls.append(("complete", slice_hash, batch_hash, head_probs, embedding))
        return self.reply

    def take_dropped(self):
        return 3

    def drain(self):
        self.calls.append(("drain",))

    def take_counters(self):
        return 7, 8, 0.5


class Public:
    """The public stream's whole-batch key hash, as BatchStream gives it."""

    def global_key_hash(self, step):
        return 1000 + step


def public_batch(step):
    return Batch([f"p{step}-{i}" for i in range(B)], torch.zeros(B, 1, 2, 2),
                 torch.zeros(B, dtype=torch.int64))


def outputs(seed, heads=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, generator=g) for _ in range(heads)], torch.randn(B, 4, generator=g)


def live(world, graph_at, exchange, **kw):
    kw = {"delta": 2, "seed": 7, "send_embedding": True} | kw
    return LiveTargets(world, graph_at, exchange, Public(), **kw)


def test_a_client_without_peers_asks_nobody_and_gets_nothing(one_rank_world):
    exchange = RecordingExchange()
    src = live(one_rank_world, lambda step: topology.complete(1), exchange)
    for step in range(1, 4):
        logits, emb = outputs(step)
        src.prepare(step)
        src.offer(step, public_batch(step), logits, emb)
        assert src.targets(step, public_batch(step), logits, emb) == []
    assert exchange.calls == [] and src.stats() == {}
    src.finish()
    assert exchange.calls == [("drain",)] and src.take_counters() == (7, 8, 0.5)


def test_the_peers_asked_at_a_step_follow_topology_peers_at_step(one_rank_world):
    """Client 0 of a complete graph of 4 with delta=2: every step it receives from the two
    in-neighbours peers_at_step draws and sends to those that drew it."""
    exchange = RecordingExchange()
    graph = topology.complete(4)
    src = live(one_rank_world, lambda step: graph, exchange)
    asked = set()
    for step in range(1, 9):
        src.prepare(step)
        chosen = topology.peers_at_step(graph, step, 2, 7)
        assert exchange.calls[-1] == ("post_receives", step, topology.out_peers(chosen)[0],
                                      chosen[0])
        assert len(chosen[0]) == 2 and 0 not in chosen[0]
        asked.add(tuple(chosen[0]))
    assert len(asked) > 1  # the draw changes with the step


def test_the_graph_of_the_step_is_used(one_rank_world):
    """A graph that changes with the step (topology.resample_every): no edges at even steps."""
    exchange = RecordingExchange()
    seen = []

    def graph_at(step):
        seen.append(step)
        return topology.cycle(3) if step % 2 else topology.no_edges(3)
    src = live(one_rank_world, graph_at, exchange, delta=1)
    for step in range(1, 5):
        src.prepare(step)
    assert seen == [1, 2, 3, 4]
    assert [c[1] for c in exchange.calls] == [1, 3]


def test_offer_and_targets_send_the_heads_peers_learn_from(one_rank_world):
    """The main .. aux_{m-1} heads as fp32 probabilities (the last aux head is nobody's
    target) and the normalised embedding, keyed by the public batch's hashes; targets returns
    what the exchange completed."""
    exchange = RecordingExchange()
    src = live(one_rank_world, lambda step: topology.complete(3), exchange, drops_late=True)
    logits, emb = outputs(5)
    logits = [l.requires_grad_() for l in logits]
    pub = public_batch(5)
    src.prepare(5)
    src.offer(5, pub, logits, emb)
    got = src.targets(5, pub, logits, emb)
    (_, h1, probs, sent_emb, defer), (_, h2, batch_hash, probs2, emb2) = exchange.calls[1:]
    assert defer and h1 == h2 == key_hash(pub.keys) and batch_hash == 1005
    assert len(probs) == 2  # 3 heads: main and aux1 are targets, aux2 is not
    for p, l in zip(probs, logits):
        assert torch.allclose(p, torch.softmax(l.detach(), dim=1)) and not p.requires_grad
    assert torch.allclose(sent_emb.norm(dim=1), torch.ones(B))
    assert torch.allclose(sent_emb, emb / emb.norm(dim=1, keepdim=True))
    assert got is exchange.reply
    assert src.stats() == {"dropped_peers": 3.0}
    without = live(one_rank_world, lambda step: topology.complete(3), RecordingExchange(),
                   send_embedding=False)
    without.prepare(5)
    without.offer(5, pub, logits, emb)
    assert without.exchange.calls[1][3] is None
