"""Communication graphs between clients and per-step peer schedules (pure, no MPI).

A graph is stored as ``in_neighbours``: ``in_neighbours[i]`` is the sorted list of clients ``j``
with a directed edge ``j -> i``, meaning client ``i`` distills from client ``j``. Self-loops never
appear: a client is always its own candidate in the loss, so it does not need an edge for that.

Like BlueFog's ``topology_util``, builders are plain functions returning neighbour lists. The
graph may change with the step (paper §3.1: G_t): ``graph_schedule`` returns ``step -> graph``,
fixed for most kinds, redrawn from the shared seed every ``resample_every`` steps for ``random``.
The per-step subgraph e_t (``peers_at_step``) is a pure function of (seed, step, client), so
every rank of every client computes the same schedule with no communication and resumes it
exactly after a restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np

from mhd_hpc.runtime.seeds import RANDOM_GRAPH
from mhd_hpc.config.choices import TOPOLOGY_KINDS  # noqa: F401 (re-exported)



class TopologyError(ValueError):
    """A graph description that does not fit the clients; ``where`` names the offending part
    (``islands``, ``islands[1]``, ``edges``, ``edges[0]``) so that config errors can name it."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(message)


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of clients must be an int >= 1, got {n!r}")


def _check_graph(in_neighbours: Sequence[Sequence[int]]) -> int:
    """Validate a neighbour-list graph and return its number of clients."""
    n = len(in_neighbours)
    for i, nbs in enumerate(in_neighbours):
        for j in nbs:
            if not 0 <= j < n:
                raise ValueError(f"client {i} has out-of-range in-neighbour {j} (n={n})")
            if j == i:
                raise ValueError(f"client {i} lists itself as an in-neighbour")
    return n


def complete(n: int) -> list[list[int]]:
    """Every client distills from every other client."""
    _check_n(n)
    return [[j for j in range(n) if j != i] for i in range(n)]


def cycle(n: int) -> list[list[int]]:
    """Directed ring: client i distills from client (i - 1) mod n; a single client has no edges."""
    _check_n(n)
    if n == 1:
        return [[]]
    return [[(i - 1) % n] for i in range(n)]


def no_edges(n: int) -> list[list[int]]:
    """Clients train separately (the ``none`` topology)."""
    _check_n(n)
    return [[] for _ in range(n)]


def islands(n: int, groups: int | list[list[int]]) -> list[list[int]]:
    """Fully connected groups with no links between them.

    ``groups`` is either a count (that many contiguous groups whose sizes differ by at most one)
    or an explicit list of groups that must partition ``range(n)``.
    """
    _check_n(n)
    if isinstance(groups, (int, np.integer)) and not isinstance(groups, bool):
        if not 1 <= groups <= n:
            raise TopologyError("islands", f"islands: group count must be in [1, {n}] "
                                f"(the number of clients), got {groups}")
        members = [list(map(int, g)) for g in np.array_split(np.arange(n), int(groups))]
    else:
        members = [list(g) for g in groups]
        seen: dict[int, int] = {}
        for gi, group in enumerate(members):
            for c in group:
                if not isinstance(c, (int, np.integer)) or not 0 <= c < n:
                    raise TopologyError(f"islands[{gi}]", f"islands: client {c!r} in group {gi} "
                                        f"is not in range({n}) (clients are 0..{n - 1})")
                if c in seen:
                    raise TopologyError(f"islands[{gi}]", f"islands: client {c} appears in "
                                        f"group {seen[c]} and group {gi}")
                seen[int(c)] = gi
        missing = [c for c in range(n) if c not in seen]
        if missing:
            raise TopologyError("islands", f"islands: client {missing[0]} belongs to no group "
                                f"(clients {missing} are in none)")
    result: list[list[int]] = [[] for _ in range(n)]
    for group in members:
        for i in group:
            result[int(i)] = sorted(int(j) for j in group if j != i)
    return result


def from_edges(n: int, edges: list[list[int]]) -> list[list[int]]:
    """Graph from explicit ``[src, dst]`` pairs (src -> dst: dst distills from src)."""
    _check_n(n)
    sets: list[set[int]] = [set() for _ in range(n)]
    for e, edge in enumerate(edges):
        where = f"edges[{e}]"
        if len(edge) != 2:
            raise TopologyError(where, f"edge {list(edge)!r} must be a [src, dst] pair")
        src, dst = edge
        for c in (src, dst):
            if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 0 <= c < n:
                raise TopologyError(where, f"edge {list(edge)!r}: names client {c!r}, but "
                                    f"clients are 0..{n - 1} (range({n}))")
        if src == dst:
            raise TopologyError(where, f"edge {list(edge)!r} is a self-loop")
        sets[int(dst)].add(int(src))  # a set makes duplicate edges harmless
    return [sorted(s) for s in sets]


def exponential(n: int) -> list[list[int]]:
    """BlueFog's exponential graph: client i hears from clients i-1, i-2, i-4, ... (mod n), the
    distances the powers of two below n; log2(n) in-neighbours, diameter log2(n)."""
    _check_n(n)
    out = []
    for i in range(n):
        dist, nbrs = 1, set()
        while dist < n:
            nbrs.add((i - dist) % n)
            dist *= 2
        out.append(sorted(nbrs))
    return out


def random_graph(n: int, degree: int, seed: int, draw: int = 0) -> list[list[int]]:
    """Every client gets ``degree`` distinct in-neighbours drawn uniformly from the others, from
    its own generator seeded by (seed, draw, client): draw ``d`` is the graph of the d-th
    resampling period, the same on every rank."""
    _check_n(n)
    if n < 2:
        raise TopologyError("kind", "random: a random graph needs at least 2 clients")
    if not 1 <= degree <= n - 1:
        raise TopologyError("degree", f"random: degree must be in [1, {n - 1}] (the other "
                            f"clients), got {degree}")
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rng = np.random.default_rng([int(seed), RANDOM_GRAPH, int(draw), i])
        out.append(sorted(int(others[k]) for k in rng.choice(len(others), degree,
                                                              replace=False)))
    return out


def graph_schedule(kind: str, n: int, *, islands: int | list[list[int]] = 1,
                   edges: list[list[int]] | None = None, degree: int = 2,
                   resample_every: int = 0, seed: int = 0) -> Callable[[int], list[list[int]]]:
    """``step -> in_neighbours`` for the config's topology: the fixed graph of a static kind,
    or for ``random`` a graph redrawn every ``resample_every`` steps (0: drawn once)."""
    if kind == "random":
        def at(step: int) -> list[list[int]]:  # steps 1..N: draw 0, N+1..2N: draw 1, ...
            draw = max(step - 1, 0) // resample_every if resample_every else 0
            return _random_cached(n, degree, seed, draw)
        at(0)  # validate now, not at the first step
        return at
    graph = build_topology(kind, n, islands, edges)
    return lambda step: graph


@lru_cache(maxsize=4)
def _random_cached(n: int, degree: int, seed: int, draw: int) -> list[list[int]]:
    return random_graph(n, degree, seed, draw)


def is_dynamic(kind: str, resample_every: int) -> bool:
    """Whether the graph changes during the run."""
    return kind == "random" and resample_every > 0


def build_topology(
    kind: str,
    n: int,
    islands: int | list[list[int]] = 1,
    edges: list[list[int]] | None = None,
) -> list[list[int]]:
    """Dispatch on the config's static topology kinds: complete | cycle | islands | none |
    edges | exponential (``random`` changes with the step: see ``graph_schedule``)."""
    if kind == "exponential":
        return exponential(n)
    if kind == "complete":
        return complete(n)
    if kind == "cycle":
        return cycle(n)
    if kind == "islands":
        return _islands(n, islands)  # the parameter shadows the module-level function
    if kind == "none":
        return no_edges(n)
    if kind == "edges":
        if not edges:
            raise TopologyError("edges", "kind=edges needs at least one [src, dst] pair")
        return from_edges(n, edges)
    raise ValueError(f"unknown topology kind {kind!r}; expected one of {TOPOLOGY_KINDS}")


_islands = islands


def peers_at_step(
    in_neighbours: list[list[int]], step: int, delta: int, seed: int
) -> list[list[int]]:
    """e_t(i) for every client: min(delta, in-degree) distinct in-neighbours, sorted.

    The draw for client i uses its own generator seeded by (seed, step, i), so it depends on
    nothing else (not on other clients or on earlier steps) and any rank can recompute it.
    """
    _check_graph(in_neighbours)
    if delta < 0:
        raise ValueError(f"delta (targets_per_step) must be >= 0, got {delta}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    out: list[list[int]] = []
    for i, nbs in enumerate(in_neighbours):
        nbs = sorted(nbs)
        if delta >= len(nbs):
            out.append(list(nbs))
            continue
        rng = np.random.default_rng([int(seed), int(step), i])
        pick = rng.choice(len(nbs), size=delta, replace=False)
        out.append(sorted(nbs[k] for k in pick))
    return out


def out_peers(peers: list[list[int]]) -> list[list[int]]:
    """Transpose: out[j] = sorted clients that distill from j this step (who needs j's outputs)."""
    _check_graph(peers)
    out: list[list[int]] = [[] for _ in peers]
    for i, nbs in enumerate(peers):  # ascending i keeps each out[j] sorted
        for j in nbs:
            out[j].append(i)
    return out


def schedule(
    in_neighbours: list[list[int]], delta: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (step, peers_at_step(...)) forever from ``start_step`` (resume = pass the step)."""
    step = start_step
    while True:
        yield step, peers_at_step(in_neighbours, step, delta, seed)
        step += 1


def hop_distances(in_neighbours: list[list[int]]) -> np.ndarray:
    """(K, K) int64: d[i, j] = hops for information to flow from j to i; 0 diagonal, -1 unreachable.

    Used to group cross-client accuracy by graph distance (transitive distillation, paper §4.4).
    """
    n = _check_graph(in_neighbours)
    outs = out_peers(in_neighbours)
    dist = np.full((n, n), -1, dtype=np.int64)
    for src in range(n):  # BFS along edge direction from every source
        dist[src, src] = 0
        queue = deque([src])
        while queue:
            u = queue.popleft()
            for v in outs[u]:
                if dist[v, src] < 0:
                    dist[v, src] = dist[u, src] + 1
                    queue.append(v)
    return dist
