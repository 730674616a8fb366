"""Everything that talks between processes: MPI start-up and the rank -> client map (``world``),
data parallelism inside a client (``intra``: Horovod or torch.distributed), the per-step
prediction exchange (``exchange``) and pool-mode weight transfers (``transfer``) between clients.
Only modules in this package import mpi4py, Horovod or torch.distributed."""
