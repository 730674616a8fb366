"""Run under mpirun with 4 ranks = 2 clients x 2 ranks: FedMD's consensus averages each rank's
slice of the public batch over the clients (rank r of client 0 with rank r of client 1), never
over the ranks of one client (they hold different slices)."""

import torch

from mhd_hpc.distributed.world import ClientLayout, init_world


def main() -> None:
    world = init_world()
    world.assign_clients(ClientLayout.contiguous([2, 2]))
    # Client c, local rank r holds the value 10 * c + r everywhere.
    probs = torch.full((3, 4), float(10 * world.client + world.local_rank))
    sent = world.across_clients_mean_([probs])
    want = (10 * 0 + world.local_rank + 10 * 1 + world.local_rank) / 2
    assert torch.all(probs == want), (world.rank, probs, want)
    assert sent == 3 * 4 * 4
    world.barrier()
    print(f"rank {world.rank}: consensus ok", flush=True)


if __name__ == "__main__":
    main()
