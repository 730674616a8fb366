"""The training loop of one client, the same for MHD and the baselines (design §1, §3).

Reads top to bottom: set up the run folder and data, build the model, resume, then per step
one forward pass over [private batch; public batch], the exchange of public outputs with this
step's peers, the MHD losses, one SGD step; logging, evaluation and checkpoints on their
schedules. Everything random is derived from (run.seed, step, client), so a resumed run takes
exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mhd_hpc import losses, topology
from mhd_hpc.checkpoint import ClientCheckpoints, newest_common_step
from mhd_hpc.config import ConfigError, JobConfig, config_from_dict
from mhd_hpc.data.embedded import build_digits_shards, client_split, load_manifest
from mhd_hpc.data.streams import open_stream
from mhd_hpc.exchange import ClientExchange
from mhd_hpc.intra import make_intra
from mhd_hpc.pool import pool_files
from mhd_hpc.targets import LiveTargets, NoTargets, PoolTargets
from mhd_hpc.metrics import MetricsWriter, per_class_accuracy, summarize
from mhd_hpc.models import build_model
from mhd_hpc.world import ClientLayout, World

#: Config sections that may change when a run is resumed (they do not change what is learned).
RESUMABLE_CHANGES = ("run.steps", "run.eval_every", "run.log_every", "run.checkpoint_every",
                     "run.keep_checkpoints", "run.threads", "exchange.timeout_s", "run.out_dir")


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, purpose, client, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(cfg: JobConfig) -> dict:
    """The settings that define what a run learns; a resumed run must match them."""
    return {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in RESUMABLE_CHANGES}


def fingerprint(cfg: JobConfig) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


class Log:
    """Progress lines from the root rank only: one terminal, not K copies."""

    def __init__(self, world: World):
        self.world, self.t0 = world, time.time()

    def __call__(self, msg: str) -> None:
        if self.world.is_root:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def prepare_run_dir(cfg: JobConfig) -> str | None:
    """Root only: create the run folder, refuse to mix two different jobs in it, save the
    resolved config. Returns an error message instead of raising so all ranks can stop together."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.exists():
        try:
            old = config_from_dict(yaml.safe_load(saved.read_text()) or {})
        except (ConfigError, yaml.YAMLError) as exc:
            return f"{saved} is not a config of this version ({exc}); use another run.out_dir"
        new_id, old_id = identity(cfg), identity(old)
        for key in new_id:
            if new_id[key] != old_id.get(key):
                return (f"{run_dir} holds a run with {key}={old_id.get(key)!r}, this job has "
                        f"{new_id[key]!r}: resume with the same settings or use another "
                        f"run.out_dir")
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, saved)
    return None


FAULT_MODES = ("raise", "kill", "kill_in_checkpoint", "signal")


def injected_fault(rank: int) -> tuple[int, str] | None:
    """Fault-injection hook for tests: ``MHD_INJECT_FAULT=RANK:STEP[:MODE]`` makes that rank, at
    that step, raise an exception (``raise``, default), die by SIGKILL like ``kill -9``
    (``kill``), or die by SIGKILL in the middle of writing its checkpoint
    (``kill_in_checkpoint``, the step must be a checkpoint step), or send itself SIGUSR1 like
    SLURM before a time limit (``signal``)."""
    spec = os.environ.get("MHD_INJECT_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    mode = parts[2] if len(parts) > 2 else "raise"
    if len(parts) not in (2, 3) or mode not in FAULT_MODES:
        raise ValueError(f"MHD_INJECT_FAULT={spec!r}: expected RANK:STEP[:{'|'.join(FAULT_MODES)}]")
    return (int(parts[1]), mode) if int(parts[0]) == rank else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def lr_at(cfg: JobConfig, step: int) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, cfg.run.steps - o.warmup_steps)
    return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - o.warmup_steps) / span)))


def prepare_dataset(cfg: JobConfig, log: Log) -> tuple[str, tuple[str, str] | None]:
    """Root only: (dataset folder, None), or (path, (key, message)) when the dataset does not
    fit the job, so that every rank can stop with the same config error."""
    d, k = cfg.data, cfg.clients.count
    if d.dataset == "digits":
        log(f"dataset digits: preparing shards under {d.root} (built once, then reused)")
        return build_digits_shards(d.root, k, d.public_fraction, d.label_assignment,
                                   d.labels_per_client, d.skew, cfg.run.seed), None
    try:
        manifest = load_manifest(d.root)
    except (OSError, ValueError) as exc:
        return d.root, ("data.root", f"not a dataset folder from tools/make_shards.py: {exc}")
    n, c = manifest["partition"]["num_clients"], manifest["num_classes"]
    if n != k:
        return d.root, ("clients.count", f"{d.root} was partitioned for {n} clients, the job "
                        f"has {k}: rebuild the shards with --clients {k} or set "
                        f"clients.count={n}")
    if cfg.exchange.top_k > c:
        return d.root, ("exchange.top_k", f"{cfg.exchange.top_k} > the {c} classes of {d.root}")
    log(f"dataset {d.root}: {manifest.get('dataset', '?')} shards, {c} classes, partition "
        f"fixed at build time ({manifest['partition'].get('settings', {})})")
    return d.root, None


@torch.no_grad()
def evaluate(model: torch.nn.Module, test, num_classes: int, device: torch.device) -> np.ndarray:
    """(H, C) per-class test accuracy of every head."""
    model.eval()
    preds, labels = [], []
    for batch in test.eval_batches():
        _, logits = model(batch.images.to(device))
        preds.append(torch.stack([l.argmax(1) for l in logits]).cpu().numpy())
        labels.append(batch.labels.numpy())
    model.train()
    p, y = np.concatenate(preds, axis=1), np.concatenate(labels)
    return np.stack([per_class_accuracy(p[h], y, num_classes) for h in range(p.shape[0])])


def pick_device(cfg: JobConfig, world: World) -> torch.device:
    """The node-local rank's GPU when CUDA is there (and wanted), else the CPU."""
    if cfg.backend.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", world.node_local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def to_device(batch, device: torch.device):
    """Images and labels onto the device; pinned memory makes the copy asynchronous."""
    if device.type == "cpu" or batch.images.is_cuda:  # DALI's GPU pipeline is already there
        return batch.images.to(device), batch.labels.to(device)
    return (batch.images.pin_memory().to(device, non_blocking=True),
            batch.labels.pin_memory().to(device, non_blocking=True))


class StopSignal:
    """SIGUSR1/SIGTERM (SLURM's warning before the time limit, ``scancel``) ask for a clean stop:
    the job checkpoints at the next log step that all ranks agree on, and exits with
    ``EXIT_RESUMABLE`` so that a batch script can requeue it."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum


EXIT_RESUMABLE = 3


def merge_client_rows(rows: list[tuple[int, dict]], num_clients: int) -> list[dict]:
    """Per-rank log rows -> one row per client: means over its ranks, byte counts summed."""
    merged = []
    for client in range(num_clients):
        mine = [r for c, r in rows if c == client]
        names = set().union(*mine)
        merged.append({n: (float(np.nansum([r.get(n, np.nan) for r in mine]))
                           if n.startswith("bytes_") else
                           float(np.nanmean([r.get(n, np.nan) for r in mine]))) for n in names})
    return merged


def run(cfg: JobConfig, world: World) -> int:
    """Train this rank's client; returns the process exit code."""
    log = Log(world)
    K = cfg.clients.count
    world.assign_clients(ClientLayout.contiguous(cfg.client_ranks()))
    me = world.client
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    stop = StopSignal()

    # -- run folder and data (root prepares, everyone waits in the bcast) ------------------
    error = prepare_run_dir(cfg) if world.is_root else None
    error = world.bcast(error)
    if error:
        raise ConfigError("run.out_dir", error)
    run_dir = Path(cfg.run.out_dir)
    d = cfg.data
    found = prepare_dataset(cfg, log) if world.is_root else None
    dataset_dir, error = world.bcast(found)
    if error:
        raise ConfigError(*error)
    manifest = load_manifest(dataset_dir)
    if world.is_root:
        (run_dir / "partition.json").write_text(json.dumps(manifest["partition"], indent=1))
    num_classes, image_shape = manifest["num_classes"], manifest["image_shape"]
    counts = np.asarray(manifest["partition"]["counts"], dtype=np.float64)
    distribution = counts / counts.sum(axis=1, keepdims=True)
    device = pick_device(cfg, world)  # before the streams: DALI decodes on the current GPU
    # Each rank reads its own slice (client-local rank) of the client's batches.
    opts = {"backend": d.loader, "part": world.local_rank, "num_parts": world.local_size,
            "threads": d.loader_threads}
    private, loader = open_stream(dataset_dir, client_split(me), d.batch_size,
                                  seed_of(cfg.run.seed, 1, me), "train", **opts)
    public, _ = open_stream(dataset_dir, "public", d.public_batch_size,
                            seed_of(cfg.run.seed, 2), "public", **opts)  # one seed: aligned
    test = (open_stream(dataset_dir, "test", 256, 0, "eval", backend=d.loader,
                        threads=d.loader_threads)[0] if world.is_leader else None)

    # -- devices, model, optimiser, communication plan ----------------------------------------
    intra, why = make_intra(cfg.backend.intra, world, device)
    log(f"{K} clients on {world.size} ranks (ranks per client {cfg.client_ranks()}), "
        f"method={cfg.method}, device {device.type}, loader {loader}; {why}")
    log(f"{private.num_samples} private samples on client 0, {public.num_samples} public, "
        f"{manifest['counts']['test']} test, {num_classes} classes; run folder {run_dir}")
    shared_init = cfg.method in ("fedavg", "supervised")  # weights must start identical
    torch.manual_seed(seed_of(cfg.run.seed, 3, 0 if shared_init else me))
    archs = cfg.client_archs()

    def build(arch: str) -> torch.nn.Module:
        return build_model(arch, num_classes, cfg.model.aux_heads, image_shape[0],
                           image_shape[-1], cfg.model.embedding_dim).to(device)

    model = build(archs[me])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    graph = topology.build_topology(cfg.topology.kind, K, cfg.topology.islands,
                                    cfg.topology.edges)
    nu_emb = cfg.distill.nu_emb if cfg.method == "mhd" else 0.0
    if cfg.method != "mhd" or cfg.topology.kind == "none":
        source: NoTargets = NoTargets()
    elif cfg.exchange.mode == "pool":
        source = PoolTargets(cfg, world, graph, build, send_embedding=nu_emb > 0)
    else:
        exchange = ClientExchange(world, model.num_heads, num_classes, d.public_batch_size,
                                  cfg.exchange.top_k, model.embedding_dim if nu_emb > 0 else 0,
                                  cfg.exchange.timeout_s)
        source = LiveTargets(cfg, world, graph, exchange, public, send_embedding=nu_emb > 0)
    floats = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics

    # -- resume (run.out_dir is shared by all ranks: each reads its client's leader's files) ---
    ckpts = ClientCheckpoints(run_dir, me, cfg.run.keep_checkpoints)
    pools = pool_files(run_dir, me, cfg.run.keep_checkpoints)
    usable = set(ckpts.steps())
    if isinstance(source, PoolTargets):  # a pool-mode step needs its pool file as well
        usable &= set(pools.steps())
    start = newest_common_step([s for s in world.allgather(
        sorted(usable) if world.is_leader else None) if s is not None])
    if start:
        state, meta = ckpts.load(start)
        if meta.get("fingerprint") != fingerprint(cfg) or meta.get("arch") != archs[me]:
            raise ConfigError("run.out_dir", f"{ckpts.path(start)} was written by a different job")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if isinstance(source, PoolTargets):
            source.load_state(pools.load(start)[0])
        log(f"resuming every client from step {start} ({run_dir / 'checkpoints'})")
    else:  # replicas of a client start from its leader's weights
        intra.broadcast_(list(model.state_dict().values()))
    metrics = None
    if world.is_root:
        metrics = MetricsWriter(run_dir / "metrics.h5", [f"client{i}" for i in range(K)],
                                model.head_names, distribution, fingerprint(cfg), start,
                                topology.hop_distances(graph))
    if start >= cfg.run.steps:
        log(f"run already complete at step {start}; see python -m mhd_hpc.report {run_dir}")
        intra.shutdown()
        return 0
    extra_bytes = 0  # FedAvg / supervised collectives
    if cfg.method == "fedavg" and start == 0:
        world.allreduce_mean_(list(model.state_dict().values()))

    # -- the loop -----------------------------------------------------------------------------
    sums: dict[str, float] = {}
    interval_start, steps_in_interval = time.perf_counter(), 0
    select_gen = torch.Generator(device=device)
    fault = injected_fault(world.rank)
    for step in range(start + 1, cfg.run.steps + 1):
        if fault and fault[0] == step and fault[1] == "raise":
            raise RuntimeError(f"injected fault at step {step} (MHD_INJECT_FAULT)")
        if fault and fault[0] == step and fault[1] in ("kill", "signal"):
            _die() if fault[1] == "kill" else os.kill(os.getpid(), signal.SIGUSR1)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step - 1)
        batch, pub = private.batch(step), public.batch(step)
        images, labels = to_device(batch, device)
        pub_images, _ = to_device(pub, device)
        pub.images = pub_images  # the pool's peer models run on the device copy
        b = images.shape[0]
        # One forward over both batches: half the kernel launches, and BatchNorm sees the
        # public distribution the distillation losses are computed on.
        emb, logits = model(torch.cat([images, pub_images]))
        loss_ce = losses.main_ce_loss(logits[0][:b], labels)
        loss, terms = loss_ce, {"loss_ce": loss_ce.item()}
        pub_emb, pub_logits = emb[b:], [l[b:] for l in logits]

        if not torch.isfinite(loss_ce):
            raise FloatingPointError(f"client {me}: non-finite loss at step {step} (training "
                                     "diverged: lower optim.lr or check the data)")
        source.begin_step(step, model)
        peers = source.targets(step, pub, pub_logits, pub_emb)
        terms.update(source.stats())
        if nu_emb > 0 and peers:
            loss_emb = losses.embedding_loss(pub_emb, [p.embedding for p in peers])
            loss = loss + nu_emb * loss_emb
            terms["loss_emb"] = loss_emb.item()
        if cfg.model.aux_heads:
            peer_probs = [torch.stack([p.head_probs[h] for p in peers]) if peers
                          else pub_logits[h].new_zeros((0,) + pub_logits[h].shape)
                          for h in range(model.num_heads)]
            select_gen.manual_seed(seed_of(cfg.run.seed, 4, me, step))
            stats = losses.aux_chain_losses(pub_logits, peer_probs, cfg.distill.selection,
                                            cfg.distill.skip_less_confident, select_gen)
            for k, s in enumerate(stats, start=1):
                loss = loss + cfg.distill.nu_aux * s.loss
                terms[f"loss_aux{k}"] = s.loss.item()
                terms[f"self_target_aux{k}"] = s.chosen_self_fraction
                terms[f"skipped_aux{k}"] = s.skipped_fraction
        terms["loss_total"] = loss.item()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if cfg.method == "supervised":  # one model on the union of all private batches
            extra_bytes += world.allreduce_mean_(grads)
        else:  # data parallelism among the client's replicas
            intra.average_(grads)
        opt.step()
        if cfg.method == "fedavg" and step % cfg.fedavg.every == 0:
            extra_bytes += world.allreduce_mean_(list(model.state_dict().values()))

        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        steps_in_interval += 1
        last = step == cfg.run.steps

        stopping = False
        if step % cfg.run.log_every == 0 or last:
            elapsed = time.perf_counter() - interval_start
            sent, received, waited = source.take_counters()
            row = {name: total / steps_in_interval for name, total in sums.items()}
            row.update(step_time_s=elapsed / steps_in_interval, exchange_wait_s=waited
                       / steps_in_interval, bytes_sent=sent + extra_bytes,
                       bytes_received=received, lr=lr_at(cfg, step - 1))
            extra_bytes = 0
            rows = world.gather((me, row))
            if world.is_root:
                per_client = merge_client_rows(rows, K)
                names = sorted(set().union(*per_client))
                metrics.write_train(step, {n: [r.get(n, np.nan) for r in per_client]
                                           for n in names})
                mean = {n: float(np.nanmean([r.get(n, np.nan) for r in per_client]))
                        for n in names}
                loss_txt = " ".join(f"{n.removeprefix('loss_')} {mean[n]:.3f}" for n in names
                                    if n.startswith("loss_"))
                log(f"step {step:>6}/{cfg.run.steps} | {loss_txt} | "
                    f"{1000 * mean['step_time_s']:.0f} ms/step "
                    f"(exchange wait {1000 * mean['exchange_wait_s']:.0f} ms) | "
                    f"sent {sum(r['bytes_sent'] for r in per_client) / 1e6:.2f} MB")
            sums, steps_in_interval, interval_start = {}, 0, time.perf_counter()
            # A signal reaches ranks at different steps: agree on one step to stop at.
            stopping = world.max_over_ranks(1.0 if stop.received else 0.0) > 0 and not last

        evaluating = step % cfg.run.eval_every == 0 or last
        saving = step % cfg.run.checkpoint_every == 0 or last or stopping
        if evaluating or saving:
            intra.average_(floats)  # replicas' BatchNorm statistics -> their mean
        if evaluating:
            acc = evaluate(model, test, num_classes, device) if world.is_leader else None
            accs = [a for a in world.gather(acc) or [] if a is not None]
            if world.is_root:
                summary = summarize(np.stack(accs), distribution)
                metrics.write_eval(step, summary)
                heads = model.head_names
                log(f"eval @ {step}: mean over clients  beta_sh " + " ".join(
                    f"{h} {summary['beta_sh'][:, i].mean():.3f}" for i, h in enumerate(heads))
                    + " | beta_priv " + " ".join(
                    f"{h} {summary['beta_priv'][:, i].mean():.3f}" for i, h in enumerate(heads)))
                log(f"  per client beta_sh {heads[0]}/{heads[-1]}: " + "  ".join(
                    f"c{i} {summary['beta_sh'][i, 0]:.2f}/{summary['beta_sh'][i, -1]:.2f}"
                    for i in range(K)))

        if saving:
            source.flush(step)  # nothing in flight: the saved pool is the pool of this step
            intra.check_in_sync(model, step)
            if world.is_leader:
                meta = {"fingerprint": fingerprint(cfg), "arch": archs[me], "client": me,
                        "step": step}
                if isinstance(source, PoolTargets):
                    pools.save(step, source.state(), meta)
                ckpts.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "torch_rng": torch.get_rng_state(), "step": step}, meta,
                           before_commit=_die if fault == (step, "kill_in_checkpoint") else None)
        if stopping:
            world.barrier()
            log(f"stopping at step {step} on signal {stop.received}: checkpoint saved; rerun the "
                f"same command to continue (exit code {EXIT_RESUMABLE})")
            intra.shutdown()
            return EXIT_RESUMABLE
    world.barrier()
    for stream in (private, public, test):
        if stream is not None:
            stream.close()
    intra.shutdown()
    log(f"done: {cfg.run.steps} steps. Report: python -m mhd_hpc.report {run_dir}")
    return 0
