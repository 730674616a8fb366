"""A job as the framework accepts it: the config tree's own rules (:func:`config.validate`),
then the rules that need the domain, all checked identically on every rank before any
communication, each failure a ``ConfigError`` naming the dotted key.

The domain rules live here, not in ``config/``, so that the config stays the ground floor: the
architectures a client may name (``models``), the embedding widths that can be distilled into
each other, the graphs a topology can build (``method.topology``), the codec's top-k bound, and
what the installation provides (Horovod, TensorBoard, CUDA).
"""

from __future__ import annotations

from mhd_hpc.config import ConfigError, JobConfig, load_config, num_classes

__all__ = ["load_job", "check_job", "check_environment"]


def load_job(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated by the config's rules and
    the domain's. Pure: no MPI, no files but the job file."""
    cfg = load_config(path, overrides)
    check_job(cfg)
    return cfg


def check_job(cfg: JobConfig) -> None:
    """The rules of a valid config that only the domain modules know."""
    for check in (_check_archs, _check_embedding, _check_topology, _check_top_k):
        check(cfg)


def _check_archs(cfg: JobConfig) -> None:
    from mhd_hpc.models import ARCHS  # lazy: domain modules import torch (slow)

    for i, arch in enumerate(cfg.client_archs()):
        if arch not in ARCHS:
            key = ("clients.arch" if isinstance(cfg.clients.arch, str) else f"clients.arch[{i}]")
            if cfg.clients.per_client and cfg.clients.per_client[i].arch:
                key = f"clients.per_client[{i}].arch"
            raise ConfigError(key, f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def _check_embedding(cfg: JobConfig) -> None:
    from mhd_hpc.models import native_embedding_dim

    if cfg.method == "mhd" and cfg.distill.nu_emb > 0 and cfg.model.embedding_dim == 0:
        dims = {a: native_embedding_dim(a) for a in cfg.client_archs()}
        if len(set(dims.values())) > 1:
            raise ConfigError("model.embedding_dim", f"embedding distillation (distill.nu_emb > 0)"
                              f" between backbones of different widths {dims} needs a shared "
                              "model.embedding_dim > 0 (or set distill.nu_emb=0)")


def _check_topology(cfg: JobConfig) -> None:
    from mhd_hpc.method import topology

    t, k = cfg.topology, cfg.clients.count
    try:  # the graph builders are the one definition of a valid graph
        topology.graph_schedule(t.kind, k, islands=t.islands, edges=t.edges, degree=t.degree,
                                resample_every=t.resample_every)
    except topology.TopologyError as exc:
        raise ConfigError(f"topology.{exc.where}", f"{exc} (clients.count={k})") from None


def _check_top_k(cfg: JobConfig) -> None:
    from mhd_hpc.distributed.codec import top_k_problem

    problem = top_k_problem(cfg.exchange.top_k, num_classes(cfg))  # shards: checked at start
    if problem:
        raise ConfigError("exchange.top_k", problem)


def check_environment(cfg: JobConfig) -> None:
    """What validation cannot know from the file alone: installed backends and devices.
    Every rank sees the same installation, so every rank reaches the same verdict."""
    import torch

    if max(cfg.client_ranks()) > 1 and cfg.backend.intra == "horovod":
        from mhd_hpc.distributed.intra import horovod_import_error

        problem = horovod_import_error()  # a broken build fails here, not mid-training
        if problem:
            raise ConfigError("backend.intra", f"horovod was asked for but cannot be imported "
                              f"({problem}): run tools/install_horovod.sh, load the site "
                              "Horovod, or set backend.intra=torch")
    if cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ConfigError("run.tensorboard", f"TensorBoard output was asked for but cannot "
                              f"be written ({exc}): pip install -e '.[tensorboard]' or set "
                              "run.tensorboard=false") from None
    if cfg.backend.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend.device", "cuda was asked for but torch sees no CUDA device "
                          "(use backend.device=auto or cpu)")


def main(argv: list[str] | None = None) -> int:
    """``python -m mhd_hpc.job JOB.yaml [key=value ...]``: the resolved config of a job, checked
    as a job start checks it (the config's rules, the domain's and the installation's), or the
    error naming the key (exit code 2)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__.replace("``", ""))
        return 0 if args else 2
    try:
        cfg = load_job(args[0], args[1:])
        check_environment(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
