"""Hosted clients' communicator (``distributed.hosted``) in one process: the clients of a
``HostedProcess`` over this process's one-rank MPI world talk through their mailboxes, as the
threads ``run_clients`` starts. Multi-process behaviour: tests/test_hosted_mpi.py."""

import numpy as np
import pytest


@pytest.fixture
def process(one_rank_world):
    from mhd_hpc.distributed.hosted import HostedProcess

    made = []

    def make(per_rank: int):
        made.append(HostedProcess(one_rank_world.comm, per_rank))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_receives_match_in_the_order_they_were_posted(process):
    """A receive left behind (a late peer) takes the older message even when the newer
    receive is tested first, as MPI matches them."""
    from mpi4py import MPI

    proc = process(2)
    c0, c1 = proc.world_comm(0), proc.world_comm(1)
    old, new = np.zeros(3, np.uint8), np.zeros(3, np.uint8)
    late = c0.Irecv([old, MPI.BYTE], source=1, tag=5)
    assert not late.Test()
    fresh = c0.Irecv([new, MPI.BYTE], source=1, tag=5)
    c1.Isend([np.full(3, 7, np.uint8), MPI.BYTE], dest=0, tag=5)
    c1.Isend([np.full(3, 8, np.uint8), MPI.BYTE], dest=0, tag=5)
    assert fresh.Test() and late.done
    assert old.tolist() == [7, 7, 7] and new.tolist() == [8, 8, 8]


def test_a_sent_buffer_may_change_at_once(process):
    """Sends copy: the sender reuses its buffer as soon as the request completes."""
    from mpi4py import MPI

    proc = process(2)
    buf, got = np.full(4, 1, np.uint8), np.zeros(4, np.uint8)
    proc.world_comm(1).Isend([buf, MPI.BYTE], dest=0, tag=1)
    buf[:] = 9
    assert proc.world_comm(0).Irecv([got, MPI.BYTE], source=1, tag=1).Test()
    assert got.tolist() == [1, 1, 1, 1]


def test_collectives_among_clients_that_take_turns(process):
    """Three clients in threads, one running at a time: blocking and non-blocking collectives,
    Split and Dup give every client what MPI would."""
    from mpi4py import MPI

    proc = process(3)
    seen = {}

    def client(v: int) -> int:
        comm = proc.world_comm(v)
        got = {"allgather": comm.allgather(v * 10), "bcast": comm.bcast(f"from {v}", root=2),
               "max": comm.allreduce(v, op=MPI.MAX)}
        flat = np.full(2, float(v + 1), np.float32)
        comm.Allreduce(MPI.IN_PLACE, [flat, MPI.FLOAT], op=MPI.SUM)
        got["sum"] = flat.tolist()
        mine, anyone = np.array([v == 1], np.int32), np.zeros(1, np.int32)
        request = comm.Dup().Iallreduce(mine, anyone, op=MPI.MAX)
        request.Wait()
        got["vote"] = int(anyone[0])
        half = comm.Split(color=v % 2, key=-v)  # key: reversed order inside a colour
        got["split"] = (half.Get_rank(), half.Get_size(), half.allgather(v))
        comm.Barrier()
        seen[v] = got
        return v

    assert proc.run_clients(client) == [0, 1, 2]
    for v in range(3):
        assert seen[v]["allgather"] == [0, 10, 20] and seen[v]["bcast"] == "from 2"
        assert seen[v]["max"] == 2 and seen[v]["sum"] == [6.0, 6.0] and seen[v]["vote"] == 1
    assert seen[0]["split"] == (1, 2, [2, 0]) and seen[2]["split"] == (0, 2, [2, 0])
    assert seen[1]["split"] == (0, 1, [1])


def test_a_waiting_client_lets_the_others_run(process):
    """Client 0 waits (through p2p's poller, as the exchange does) for a message client 1 sends
    only after its own work: with one client running at a time, the wait must give way."""
    from mhd_hpc.distributed.p2p import wait_until

    proc = process(2)
    order = []

    def client(v: int) -> int:
        comm = proc.world_comm(v)
        if v == 0:
            request = comm.Irecv(np.zeros(1, np.uint8), source=1, tag=3)
            order.append("0 waits")
            wait_until(request.Test, 30, lambda: "client 1 never sent")
            order.append("0 received")
        else:
            order.append("1 works")
            comm.Isend(np.ones(1, np.uint8), dest=0, tag=3)
        return 0

    assert proc.run_clients(client) == [0, 0]
    assert order == ["0 waits", "1 works", "0 received"]
