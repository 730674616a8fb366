"""Graphs (mhd_hpc/method/topology.py): builders incl. exponential and random, per-step peers, hops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mhd_hpc.method import topology
from mhd_hpc.method.topology import (build_topology, complete, cycle, from_edges, hop_distances,
                              islands, no_edges, out_peers, peers_at_step, schedule)


def test_basic_shapes():
    assert complete(3) == [[1, 2], [0, 2], [0, 1]]
    assert cycle(4) == [[3], [0], [1], [2]]
    assert cycle(1) == [[]]
    assert cycle(2) == [[1], [0]]
    assert no_edges(3) == [[], [], []]
    assert complete(1) == [[]]


def test_islands_contiguous_near_equal_groups():
    assert islands(5, 2) == [[1, 2], [0, 2], [0, 1], [4], [3]]
    assert islands(4, 1) == complete(4)
    assert islands(3, 3) == no_edges(3)


def test_islands_explicit_groups_and_validation():
    assert islands(4, [[0, 3], [2, 1]]) == [[3], [2], [1], [0]]
    with pytest.raises(ValueError, match="client 2 belongs to no group"):
        islands(4, [[0, 1], [3]])
    with pytest.raises(ValueError, match="client 1 appears"):
        islands(3, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="client 5"):
        islands(3, [[0, 1, 2, 5]])
    with pytest.raises(ValueError):
        islands(3, 4)


def test_from_edges_and_validation():
    assert from_edges(3, [[0, 1], [2, 1], [0, 1], [1, 0]]) == [[1], [0, 2], []]
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        from_edges(3, [[0, 3]])
    with pytest.raises(ValueError, match=r"\[1, 1\].*self-loop"):
        from_edges(3, [[1, 1]])
    with pytest.raises(ValueError, match=r"\[0, 1, 2\]"):
        from_edges(3, [[0, 1, 2]])
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        from_edges(3, [[-1, 0]])


def test_build_topology_dispatch():
    assert build_topology("complete", 3) == complete(3)
    assert build_topology("cycle", 3) == cycle(3)
    assert build_topology("islands", 4, islands=2) == islands(4, 2)
    assert build_topology("none", 2) == [[], []]
    assert build_topology("edges", 2, edges=[[0, 1]]) == [[], [0]]
    with pytest.raises(ValueError):
        build_topology("edges", 2)
    with pytest.raises(ValueError, match="unknown"):
        build_topology("star", 2)


def test_peers_at_step_deterministic_and_valid():
    g = complete(6)
    a = peers_at_step(g, step=5, delta=2, seed=1)
    assert a == peers_at_step(g, step=5, delta=2, seed=1)
    for i, p in enumerate(a):
        assert len(p) == 2 and len(set(p)) == 2 and p == sorted(p) and i not in p
        assert set(p) <= set(g[i])
    # Depends on (seed, step): across 20 steps the schedule must vary.
    steps = [peers_at_step(g, t, 2, seed=1) for t in range(20)]
    assert len({str(s) for s in steps}) > 1
    assert [peers_at_step(g, t, 2, seed=2) for t in range(20)] != steps  # and on the seed


def test_peers_at_step_per_client_independent_of_graph_elsewhere():
    # Client 0's draw depends only on (seed, step, 0), not on the other clients' neighbours.
    g1 = [[1, 2, 3], [0], [0], [0]]
    g2 = [[1, 2, 3], [0, 2, 3], [], [2]]
    for t in range(10):
        assert peers_at_step(g1, t, 1, 7)[0] == peers_at_step(g2, t, 1, 7)[0]


def test_peers_at_step_uniform_over_neighbours():
    g = complete(4)
    hits = np.zeros(4)
    for t in range(400):
        hits[peers_at_step(g, t, 1, seed=0)[0]] += 1
    assert hits[0] == 0 and np.all(np.abs(hits[1:] - 400 / 3) < 40)


def test_delta_larger_than_degree_and_zero():
    g = [[1, 2], [], [0]]
    assert peers_at_step(g, 0, 5, 0) == [[1, 2], [], [0]]
    assert peers_at_step(g, 0, 0, 0) == [[], [], []]
    with pytest.raises(ValueError):
        peers_at_step(g, 0, -1, 0)


def test_out_peers_consistent():
    peers = [[1, 2], [2], [], [0, 1, 2]]
    out = out_peers(peers)
    assert out == [[3], [0, 3], [0, 1, 3], []]
    for i, j in itertools.product(range(4), range(4)):
        assert (j in peers[i]) == (i in out[j])


def test_schedule_is_resumable():
    g = complete(5)
    gen = schedule(g, delta=2, seed=3)
    first = [next(gen) for _ in range(8)]
    assert [t for t, _ in first] == list(range(8))
    resumed = schedule(g, delta=2, seed=3, start_step=5)
    assert [next(resumed) for _ in range(3)] == first[5:8]
    assert first[6][1] == peers_at_step(g, 6, 2, 3)


def test_hop_distances_cycle():
    d = hop_distances(cycle(4))
    # i distills from i-1, so information from j reaches i after (i - j) mod 4 hops.
    expected = np.array([[(i - j) % 4 for j in range(4)] for i in range(4)])
    assert d.dtype == np.int64 and np.array_equal(d, expected)


def test_hop_distances_unreachable_and_islands():
    d = hop_distances(islands(4, 2))
    assert d.tolist() == [[0, 1, -1, -1], [1, 0, -1, -1], [-1, -1, 0, 1], [-1, -1, 1, 0]]
    chain = from_edges(3, [[0, 1], [1, 2]])  # 0 -> 1 -> 2
    assert hop_distances(chain).tolist() == [[0, -1, -1], [1, 0, -1], [2, 1, 0]]


def test_exponential_graph_hears_from_powers_of_two():
    g = topology.exponential(8)
    assert g[0] == [4, 6, 7]  # 0-1, 0-2, 0-4 mod 8
    assert all(len(n) == 3 for n in g)
    assert topology.hop_distances(g).max() == 3  # log2(8)
    assert topology.exponential(1) == [[]] and topology.exponential(2) == [[1], [0]]


def test_random_graph_is_seeded_redrawn_and_validated():
    a = topology.random_graph(6, 2, seed=3, draw=0)
    assert a == topology.random_graph(6, 2, seed=3, draw=0)
    assert all(len(n) == 2 and i not in n for i, n in enumerate(a))
    at = topology.graph_schedule("random", 6, degree=2, resample_every=5, seed=3)
    # Steps 1-5 use draw 0, steps 6-10 draw 1: "every 5 steps" exactly.
    assert at(1) == at(5) == a and at(6) == at(10) == topology.random_graph(6, 2, 3, 1)
    assert {str(at(s)) for s in range(0, 200, 5)} != {str(a)}  # it does change
    once = topology.graph_schedule("random", 6, degree=2, resample_every=0, seed=3)
    assert once(0) == once(10_000)
    with pytest.raises(topology.TopologyError) as err:
        topology.graph_schedule("random", 4, degree=4)
    assert err.value.where == "degree"
    assert topology.is_dynamic("random", 5) and not topology.is_dynamic("random", 0)
