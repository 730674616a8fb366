"""The config tree's own rules: every rule that makes a job impossible and can be judged from
the config alone, checked identically on every rank before any communication, each failure a
``ConfigError`` naming the dotted key. The choices are declared in :mod:`mhd_hpc.config.choices`;
the rules that need the domain (known architectures, graphs, the codec's bound, installed
backends) are :mod:`mhd_hpc.job`'s, which runs these first."""

from __future__ import annotations

from mhd_hpc.config.tree import JobConfig
from mhd_hpc.errors import ConfigError

from mhd_hpc.config.choices import (AUX_WEIGHTINGS, BUILTIN_DATASETS, DATASETS, DEVICES,
                                    EXCHANGE_MODES, INTRA_BACKENDS, LABEL_ASSIGNMENTS, LATE_PEERS,
                                    LOADERS, METHODS, NORMS, PARTITIONS, PRECISIONS,
                                    PRIVACY_RANDOMNESS, PRIVATE_METHODS, PUBLIC_SOURCES,
                                    SCHEDULES, SELECTION_MODES, TOPOLOGY_KINDS)

__all__ = ["validate", "check_world_size", "num_classes"]


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: JobConfig) -> None:
    """Reject impossible jobs before anything runs. Pure: needs no MPI, imports nothing of the
    domain and touches no files; errors name the key."""
    for check in (_check_run, _check_clients, _check_data, _check_model_and_distill,
                  _check_topology, _check_exchange, _check_optim_and_backend, _check_privacy):
        check(cfg)


def _check_run(cfg: JobConfig) -> None:
    _choice("method", cfg.method, METHODS)
    r = cfg.run
    for name in ("steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"run.{name}", getattr(r, name))
    _positive("run.threads", r.threads, allow_zero=True)
    if not r.out_dir:
        raise ConfigError("run.out_dir", "must not be empty")


def _check_clients(cfg: JobConfig) -> None:
    k = cfg.clients.count
    _positive("clients.count", k)
    if isinstance(cfg.clients.arch, list) and len(cfg.clients.arch) != k:
        raise ConfigError("clients.arch", f"has {len(cfg.clients.arch)} entries but "
                          f"clients.count is {k}: give one name or exactly one per client")
    if cfg.clients.per_client and len(cfg.clients.per_client) != k:
        raise ConfigError("clients.per_client", f"has {len(cfg.clients.per_client)} entries but "
                          f"clients.count is {k}")
    _positive("clients.ranks_per_client", cfg.clients.ranks_per_client)
    for i, spec in enumerate(cfg.clients.per_client):
        _positive(f"clients.per_client[{i}].ranks", spec.ranks, allow_zero=True)
    _positive("clients.per_rank", cfg.clients.per_rank)
    if cfg.clients.per_rank > 1:
        if k % cfg.clients.per_rank:
            raise ConfigError("clients.per_rank", f"{k} clients (clients.count) do not split "
                              f"evenly over ranks of {cfg.clients.per_rank} clients each")
        if max(cfg.client_ranks()) > 1:
            raise ConfigError("clients.per_rank", "a rank hosts several clients or a client "
                              "spans several ranks, not both: set clients.ranks_per_client=1 "
                              "(and no per_client ranks) or clients.per_rank=1")
        if cfg.data.loader == "dali":
            raise ConfigError("clients.per_rank", "hosted clients read with the wds loader or "
                              "from memory, not DALI (one pipeline per client in one process "
                              "is not supported): set data.loader=wds or clients.per_rank=1")
    archs = cfg.client_archs()
    if cfg.method in ("fedavg", "supervised") and len(set(archs)) > 1:
        raise ConfigError("clients.arch", f"method={cfg.method} averages weights or gradients "
                          f"and needs one architecture for all clients, got {sorted(set(archs))}")


def num_classes(cfg: JobConfig) -> int:
    """Classes of the job's dataset when known before start (built-in datasets), else a bound
    that lets every count pass (shard datasets are checked against their manifest at start)."""
    return BUILTIN_DATASETS.get(cfg.data.dataset, 1_000_000)


def _check_data(cfg: JobConfig) -> None:
    d, k = cfg.data, cfg.clients.count
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("data.loader", d.loader, LOADERS)
    _choice("data.label_assignment", d.label_assignment, LABEL_ASSIGNMENTS)
    _choice("data.public_source", d.public_source, PUBLIC_SOURCES)
    _positive("data.loader_threads", d.loader_threads)
    _positive("data.prefetch", d.prefetch)
    classes = num_classes(cfg)
    if d.dataset in BUILTIN_DATASETS:  # built here: the partition keys must make sense
        if not 0.0 <= d.public_fraction < 1.0:
            raise ConfigError("data.public_fraction", f"must be in [0, 1), got "
                              f"{d.public_fraction}")
        if cfg.method in ("mhd", "fedmd") and d.public_fraction == 0.0 \
                and d.public_source == "split":
            raise ConfigError("data.public_fraction", f"method={cfg.method} distills on public "
                              "data: must be > 0 (or data.public_source=all)")
        if not 0 <= d.labels_per_client <= classes:
            raise ConfigError("data.labels_per_client", f"must be in [0, {classes}] "
                              f"({d.dataset} has {classes} classes), got "
                              f"{d.labels_per_client}")
        if d.label_assignment == "even" and d.partition == "primary" \
                and (k * d.labels_per_client) % classes:
            raise ConfigError("data.label_assignment", f"'even' needs clients.count x "
                              f"data.labels_per_client ({k} x {d.labels_per_client}) to be a "
                              f"multiple of the {classes} classes")
    _positive("data.skew", d.skew, allow_zero=True)
    if ":" not in d.partition and d.partition not in PARTITIONS:  # paths: mhd_hpc.job's
        raise ConfigError("data.partition", f"{d.partition!r} is not one of "
                          f"{', '.join(PARTITIONS)}, or a plug-in's package.module:function")
    _positive("data.alpha", d.alpha)
    _positive("data.min_samples", d.min_samples)
    _positive("data.batch_size", d.batch_size)
    _positive("data.public_batch_size", d.public_batch_size)
    for i, ranks in enumerate(cfg.client_ranks()):
        # Every rank of a client takes an equal slice, so the client's batch is the same
        # whatever its rank count (and gradient averaging is an exact mean).
        for name in ("batch_size", "public_batch_size"):
            if getattr(d, name) % ranks:
                raise ConfigError(f"data.{name}", f"{getattr(d, name)} does not split evenly "
                                  f"over the {ranks} ranks of client {i}")


def _check_model_and_distill(cfg: JobConfig) -> None:
    m, dist = cfg.model, cfg.distill
    _positive("model.aux_heads", m.aux_heads, allow_zero=True)
    _positive("model.embedding_dim", m.embedding_dim, allow_zero=True)
    _choice("model.norm", m.norm, NORMS)
    _positive("distill.nu_aux", dist.nu_aux, allow_zero=True)
    _positive("distill.nu_emb", dist.nu_emb, allow_zero=True)
    _positive("distill.targets_per_step", dist.targets_per_step)
    _positive("distill.warmup_steps", dist.warmup_steps, allow_zero=True)
    _choice("distill.selection", dist.selection, SELECTION_MODES)
    _choice("distill.aux_weighting", dist.aux_weighting, AUX_WEIGHTINGS)


def _check_topology(cfg: JobConfig) -> None:
    t = cfg.topology
    _choice("topology.kind", t.kind, TOPOLOGY_KINDS)
    _positive("topology.resample_every", t.resample_every, allow_zero=True)


def _check_exchange(cfg: JobConfig) -> None:
    ex = cfg.exchange
    _positive("exchange.timeout_s", ex.timeout_s)
    _choice("exchange.mode", ex.mode, EXCHANGE_MODES)
    if ex.mode == "pool" and cfg.method != "mhd":
        raise ConfigError("exchange.mode", f"pool mode is a way to run method=mhd, not "
                          f"method={cfg.method}")
    _choice("exchange.late_peers", ex.late_peers, LATE_PEERS)
    _positive("exchange.late_deadline_s", ex.late_deadline_s)
    if ex.late_peers == "drop":
        if ex.mode != "predictions":
            raise ConfigError("exchange.late_peers", "drop applies to exchange.mode=predictions "
                              "(pool mode never waits with exchange.pool_async=true)")
        if len(set(cfg.client_ranks())) > 1:
            raise ConfigError("exchange.late_peers", "drop needs every client to have the same "
                              "number of ranks (the leaders' relay between clients of "
                              f"different rank counts waits), got {cfg.client_ranks()}")
    if ex.overlap and cfg.eval.grad_norms:
        raise ConfigError("eval.grad_norms", "the per-term gradient norms need one graph of "
                          "all terms: set exchange.overlap=false to record them")
    if ex.pool_async and ex.mode != "pool":
        raise ConfigError("exchange.pool_async", "applies to exchange.mode=pool")
    if ex.pool_max_lead != 0:
        if not ex.pool_async:
            raise ConfigError("exchange.pool_max_lead", "bounds clients at their own pace: "
                              "set exchange.pool_async=true (lock-step pool mode never leads)")
        if not ex.pool_max_lead >= 1:
            raise ConfigError("exchange.pool_max_lead", f"must be 0 (off) or at least 1, got "
                              f"{ex.pool_max_lead}")
    _positive("exchange.pool_size", ex.pool_size, allow_zero=True)
    _positive("exchange.pool_every", ex.pool_every)
    _positive("exchange.pool_transfer_steps", ex.pool_transfer_steps, allow_zero=True)
    _positive("fedavg.every", cfg.fedavg.every)
    _positive("fedmd.revisit_steps", cfg.fedmd.revisit_steps, allow_zero=True)
    _positive("fedmd.weight", cfg.fedmd.weight, allow_zero=True)
    if cfg.method == "fedmd" and len(set(cfg.client_ranks())) > 1:
        raise ConfigError("clients.per_client", "method=fedmd averages every client's slice of "
                          "the public batch rank by rank: give every client the same number of "
                          f"ranks (got {cfg.client_ranks()})")


def _check_optim_and_backend(cfg: JobConfig) -> None:
    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.momentum", o.momentum, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("eval.health_after", cfg.eval.health_after, allow_zero=True)
    _choice("backend.intra", cfg.backend.intra, INTRA_BACKENDS)
    _choice("backend.device", cfg.backend.device, DEVICES)
    _choice("backend.precision", cfg.backend.precision, PRECISIONS)
    if not isinstance(cfg.backend.channels_last, bool) and cfg.backend.channels_last != "auto":
        raise ConfigError("backend.channels_last", f"auto | true | false, got "
                          f"{cfg.backend.channels_last!r}")


def _check_privacy(cfg: JobConfig) -> None:
    p = cfg.privacy
    _positive("privacy.clip_norm", p.clip_norm)
    _positive("privacy.noise_multiplier", p.noise_multiplier, allow_zero=True)
    _positive("privacy.target_epsilon", p.target_epsilon, allow_zero=True)
    if not 0 < p.delta < 1:
        raise ConfigError("privacy.delta", f"must be in (0, 1), got {p.delta}")
    _choice("privacy.randomness", p.randomness, PRIVACY_RANDOMNESS)
    if not p.enabled:
        return
    if p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError("privacy.noise_multiplier", "privacy.enabled needs noise: set "
                          "privacy.noise_multiplier > 0 or privacy.target_epsilon > 0 (the "
                          "noise is then calibrated to it)")
    if cfg.model.norm != "group":
        raise ConfigError("model.norm", f"{cfg.model.norm!r}: BatchNorm computes statistics "
                          "over the batch, so a private sample would shape the outputs on "
                          "other samples (the public ones a client sends) outside the "
                          "clipped gradient: set model.norm=group with privacy.enabled")
    if cfg.method not in PRIVATE_METHODS:
        raise ConfigError("privacy.enabled", f"supports method {' and '.join(PRIVATE_METHODS)}"
                          f", not method={cfg.method}")
    if cfg.data.public_source == "all":
        raise ConfigError("data.public_source", "'all' makes every client's private samples "
                          "public data, used without noise: set data.public_source=split with "
                          "privacy.enabled")
    if max(cfg.client_ranks()) > 1:
        raise ConfigError("privacy.enabled", "needs one rank per client (the noise is added "
                          "once per client step): set clients.ranks_per_client=1 and no "
                          "per_client ranks")
    if cfg.data.loader == "dali":
        raise ConfigError("data.loader", "privacy.enabled draws the private batch by Poisson "
                          "sampling (a batch size that varies), which the DALI pipeline does "
                          "not take: set data.loader=wds or auto")
    if cfg.backend.precision == "fp16":
        raise ConfigError("backend.precision", "privacy.enabled adds its noisy gradient beside "
                          "the loss scaler's scaled ones: use fp32, bf16 or auto")
    if cfg.eval.grad_norms:
        raise ConfigError("eval.grad_norms", "the per-term gradient norms take the private "
                          "term's non-private gradient: set eval.grad_norms=false with "
                          "privacy.enabled")


def check_world_size(cfg: JobConfig, world_size: int, launcher: str = "mpirun",
                     tasks: int | None = None) -> None:
    """The launch must provide exactly the ranks the clients ask for. ``launcher`` and
    ``tasks``: who started this process and how many processes it started (from its
    environment, ``world.launcher_tasks``), to say what to change."""
    ranks = cfg.client_ranks()
    need = cfg.num_ranks()
    if world_size == need:
        return
    per_rank = cfg.clients.per_rank
    layout = (f"{cfg.clients.count} clients / {per_rank} per rank" if per_rank > 1 else
              f"{cfg.clients.count} clients x {ranks[0]} rank(s)" if len(set(ranks)) == 1
              else f"clients with {ranks} ranks")
    keys = ("clients.count / clients.per_rank" if per_rank > 1 else
            "clients.count / clients.ranks_per_client / clients.per_client")
    if world_size == 1 and tasks and tasks > 1:
        how = ("srun did not wire the tasks into one MPI job: srun without --mpi=pmix? (Open MPI "
               "5 speaks PMIx only: srun --mpi=pmix, MpiDefault=pmix in slurm.conf, or "
               "MHD_SRUN_MPI for jobs/slurm/run_with_requeue.sh)" if launcher == "srun" else
               f"{launcher} did not wire the processes into one MPI job (is mpi4py built "
               "against the MPI whose launcher started them?)")
        raise ConfigError("clients.count", f"the job has {layout} = {need} ranks; {tasks} "
                          f"processes were started but each sees an MPI world of 1: {how}")
    if launcher == "srun":
        use = f"srun --ntasks {need} (sbatch --ntasks={need})"
    elif launcher == "sbatch":
        use = f"srun --ntasks {need} inside the batch script (not python directly)"
    else:
        use = f"mpirun -np {need}"
    raise ConfigError("clients.count", f"the job has {layout} = {need} ranks but was launched "
                      f"on {world_size}: use {use} or change {keys}")
