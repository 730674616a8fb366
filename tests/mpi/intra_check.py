"""Run under mpirun with 4 ranks = 2 clients x 2 ranks: ``intra_check.py BACKEND``.

Checks the data-parallel backend on its own: replicas that start different are made equal by
``broadcast_``; different gradients become their mean with ``average_``; ``check_in_sync``
passes for equal replicas and catches a replica that drifted.
"""

import sys

import torch

from mhd_hpc.distributed.intra import make_intra
from mhd_hpc.models import build_model
from mhd_hpc.distributed.world import ClientLayout, init_world


def main() -> None:
    backend = sys.argv[1]
    world = init_world()
    world.assign_clients(ClientLayout.contiguous([2, 2]))
    intra, why = make_intra(backend, world, torch.device("cpu"))
    assert intra.name == backend, (intra.name, why)
    torch.manual_seed(world.rank)  # every replica starts different on purpose
    model = build_model("cnn_small", 10, 1, 1, 8)
    intra.broadcast_(list(model.state_dict().values()))
    reference = world.client_allgather([t.clone() for t in model.state_dict().values()])
    for mine, leader in zip(model.state_dict().values(), reference[0]):
        assert torch.equal(mine, leader), "broadcast_ did not copy the leader's state"

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + world.rank))
    model(x)[1][0].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    before = world.client_allgather([g.clone() for g in grads])
    intra.average_(grads)
    for n, g in enumerate(grads):
        expected = (before[0][n] + before[1][n]) / 2
        assert torch.allclose(g, expected, atol=1e-6), "average_ is not the mean over the client"
    intra.check_in_sync(model, step=1)

    if world.local_rank == 1:  # one replica drifts
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    try:
        intra.check_in_sync(model, step=2)
        raise AssertionError("check_in_sync missed a diverged replica")
    except RuntimeError as exc:
        assert "diverged by step 2" in str(exc)
    world.barrier()
    intra.shutdown()
    print(f"rank {world.rank}: {backend} ok", flush=True)


if __name__ == "__main__":
    main()
