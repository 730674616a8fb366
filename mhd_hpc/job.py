"""A job as the framework accepts it: the config tree's own rules (:func:`config.validate`),
then the rules that need the domain, all checked identically on every rank before any
communication, each failure a ``ConfigError`` naming the dotted key. Plug-ins (a backbone or a
partition named by an import path) are imported here, and a plug-in backbone is built and tried.

The domain rules live here, not in ``config/``, so that the config stays the ground floor: the
architectures a client may name (``models``), the embedding widths that can be distilled into
each other, the graphs a topology can build (``method.topology``), the codec's top-k bound, and
what the installation provides (Horovod, TensorBoard, CUDA).
"""

from __future__ import annotations

from mhd_hpc.config import ConfigError, JobConfig, load_config, num_classes
from mhd_hpc.errors import command

__all__ = ["load_job", "check_job", "check_models", "check_environment"]


def load_job(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated by the config's rules and
    the domain's. Pure: no MPI, no files but the job file."""
    cfg = load_config(path, overrides)
    check_job(cfg)
    return cfg


def check_job(cfg: JobConfig) -> None:
    """The rules of a valid config that only the domain modules know. Plug-in backbones are
    built and tried here when the dataset's image shape is known before start (built-in
    datasets); for a shards dataset, once its manifest is read (:func:`check_models`)."""
    for check in (_check_archs, _check_partition, _check_topology, _check_top_k):
        check(cfg)
    from mhd_hpc.data.build.builtin import BUILTIN_SHAPES

    shape = BUILTIN_SHAPES.get(cfg.data.dataset)
    if shape is not None:
        check_models(cfg, shape)
    else:  # the widths of built-in backbones are known without the data
        _check_embedding(cfg, {a: None for a in cfg.client_archs()})


def _arch_key(cfg: JobConfig, i: int) -> str:
    """The key that names client ``i``'s architecture."""
    if cfg.clients.per_client and cfg.clients.per_client[i].arch:
        return f"clients.per_client[{i}].arch"
    return "clients.arch" if isinstance(cfg.clients.arch, str) else f"clients.arch[{i}]"


def _check_archs(cfg: JobConfig) -> None:
    from mhd_hpc.models import ARCHS  # lazy: domain modules import torch (slow)
    from mhd_hpc.runtime.plugins import PluginError, is_import_path, load_callable

    for i, arch in enumerate(cfg.client_archs()):
        if is_import_path(arch):
            try:
                load_callable(arch)
            except PluginError as exc:
                raise ConfigError(_arch_key(cfg, i), f"plug-in backbone: {exc}") from None
        elif arch not in ARCHS:
            raise ConfigError(_arch_key(cfg, i), f"unknown architecture {arch!r}; choose from "
                              f"{', '.join(ARCHS)}, or give a plug-in's import path "
                              "package.module:builder (docs/plugins.md)")


def _check_partition(cfg: JobConfig) -> None:
    from mhd_hpc.runtime.plugins import PluginError, is_import_path, load_callable

    if is_import_path(cfg.data.partition):
        try:
            load_callable(cfg.data.partition)
        except PluginError as exc:
            raise ConfigError("data.partition", f"plug-in partition: {exc}") from None


def check_models(cfg: JobConfig, image_shape: tuple[int, ...] | list[int]) -> None:
    """Build every plug-in backbone of the job once for images of ``image_shape`` (C, H, W) and
    run a batch through it (``models.plugin.check_plugin_backbone``), then check that the
    embeddings can be distilled into each other. Errors name the client's arch key."""
    from mhd_hpc.models.plugin import check_plugin_backbone
    from mhd_hpc.runtime.plugins import is_import_path

    dims: dict[str, int | None] = {}
    for i, arch in enumerate(cfg.client_archs()):
        if arch in dims or not is_import_path(arch):
            dims.setdefault(arch, None)
            continue
        try:
            dims[arch] = check_plugin_backbone(arch, int(image_shape[0]), int(image_shape[-1]))
        except ValueError as exc:
            raise ConfigError(_arch_key(cfg, i), f"plug-in backbone: {exc}") from None
        if cfg.privacy.enabled:
            _check_private_plugin(cfg, i, arch, image_shape)
    _check_embedding(cfg, dims)


def _check_private_plugin(cfg: JobConfig, i: int, arch: str,
                          image_shape: tuple[int, ...] | list[int]) -> None:
    """privacy.enabled: a plug-in backbone may not normalise over the batch (model.norm
    applies to the built-in backbones only)."""
    from mhd_hpc.models.norms import batch_norm_modules
    from mhd_hpc.models.plugin import plugin_backbone

    found = batch_norm_modules(plugin_backbone(arch, int(image_shape[0]), int(image_shape[-1])))
    if found:
        raise ConfigError(_arch_key(cfg, i), f"plug-in backbone {arch} has BatchNorm layers "
                          f"({', '.join(found[:3])}): with privacy.enabled a private sample "
                          "would shape the outputs on other samples; use GroupNorm or "
                          "LayerNorm in the plug-in")


def _check_embedding(cfg: JobConfig, plugin_dims: dict[str, int | None]) -> None:
    """``plugin_dims``: arch -> embedding size of plug-ins (None: a built-in, or not known)."""
    from mhd_hpc.models import native_embedding_dim
    from mhd_hpc.runtime.plugins import is_import_path

    if cfg.method == "mhd" and cfg.distill.nu_emb > 0 and cfg.model.embedding_dim == 0:
        dims = {}  # plug-ins whose size is not known yet are checked once it is
        for arch in cfg.client_archs():
            size = plugin_dims.get(arch) or (None if is_import_path(arch)
                                             else native_embedding_dim(arch))
            if size:
                dims[arch] = size
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
    if cfg.privacy.enabled:
        from mhd_hpc.privacy.accounting import accountant_import_error

        problem = accountant_import_error()
        if problem:
            raise ConfigError("privacy.enabled", f"the privacy accounting needs Opacus, which "
                              f"cannot be imported ({problem}): pip install -e '.[privacy]'")
    if cfg.backend.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend.device", "cuda was asked for but torch sees no CUDA device "
                          "(use backend.device=auto or cpu)")


JOB_HELP = """\
Load a job as a job start does: defaults, then the YAML file, then the key=value overrides; run
the config's checks, the domain's (architectures and plug-ins, graphs, top-k) and the
installation's (Horovod, TensorBoard, CUDA); print the resolved config, or the error naming the
key (exit code 2). Nothing is trained and no MPI is started."""

JOB_EPILOG = """\
Examples:
  mhd-job jobs/digits.yaml
  mhd-job jobs/digits.yaml clients.arch=mypkg.models:vit_tiny model.embedding_dim=64
  mhd-job jobs/fmnist.yaml data.partition=dirichlet data.alpha=0.5"""


@command
def main(argv: list[str] | None = None) -> int:
    """``mhd-job JOB.yaml [key=value ...]`` (``python -m mhd_hpc.job``): the resolved config of
    a job, checked as a job start checks it, or the error naming the key (exit code 2)."""
    import sys

    from mhd_hpc.config.parse import OVERRIDES_HELP, JobArgumentParser

    parser = JobArgumentParser(prog="mhd-job", description=JOB_HELP, epilog=JOB_EPILOG)
    parser.add_argument("job", help="YAML job file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_job(args.job, args.overrides)
        check_environment(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
