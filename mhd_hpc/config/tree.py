"""The typed config tree of a job: every section and key with its default, its documentation
and its facts for run folders, declared once, beside each other.

``doc(text, default, on_resume=..., location=..., added=...)`` is the one place where a key says
what it is: its meaning (printed by ``python -m mhd_hpc.config`` and in docs/options.md's option
table), whether it may change when a run is resumed (``on_resume``), whether it says where
something is rather than what (``location``), and, for keys added after run folders were first
written, the value that reproduces what runs from before them did (``added``). The lists the
rest of the code needs are derived from these facts in :mod:`mhd_hpc.config.keys`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

__all__ = ["FIXED", "MAY_CHANGE", "BOOKKEEPING", "NOT_ADDED", "doc", "JobConfig"]

#: ``on_resume`` values. FIXED: defines what the run learns (part of its identity, a resume must
#: match it). MAY_CHANGE: may differ between the first start and a resume, and is worth a column
#: when runs are compared. BOOKKEEPING: may differ on resume and is never worth a column (how
#: often to log, how many threads, where the run folder is).
FIXED, MAY_CHANGE, BOOKKEEPING = "fixed", "may_change", "bookkeeping"
NOT_ADDED = dataclasses.MISSING  # ``added``: the key existed when run folders were first written


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, *,
        on_resume: str = FIXED, location: bool = False, added: Any = NOT_ADDED,
        became_resumable: bool = False, method: str | None = None) -> Any:
    """A dataclass field carrying its documentation and its run-folder facts in metadata.
    ``became_resumable``: the key was part of run identities before it was made resumable (older
    run folders' fingerprints include it). ``method``: the key means something only for that
    ``method`` and is part of the identity of that method's runs only."""
    assert on_resume in (FIXED, MAY_CHANGE, BOOKKEEPING), on_resume
    meta = {"doc": text, "on_resume": on_resume, "location": location, "added": added,
            "became_resumable": became_resumable, "method": method}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    out_dir: str = doc("Run folder: resolved config, partition manifest, metrics.h5, checkpoints. "
                       "Rerunning a job on the same folder resumes it.", "runs/digits",
                       on_resume=BOOKKEEPING)
    seed: int = doc("Seed of everything: partition, init, public-batch order, peer schedule.", 0)
    steps: int = doc("Total training steps per client.", 600, on_resume=MAY_CHANGE)
    eval_every: int = doc("Evaluate every head of every client on the test set every N steps "
                          "(and at the last step).", 100, on_resume=MAY_CHANGE)
    log_every: int = doc("Print and record training metrics every N steps.", 20,
                         on_resume=BOOKKEEPING)
    checkpoint_every: int = doc("Save a resumable checkpoint of every client every N steps "
                                "(and at the last step).", 200, on_resume=BOOKKEEPING)
    keep_checkpoints: int = doc("How many checkpoints each client keeps (older ones are "
                                "deleted).", 2,
                                on_resume=BOOKKEEPING)
    threads: int = doc("torch intra-op threads per rank (0 = one per CPU the rank may use, its "
                       "affinity). One thread per rank avoids oversubscribing cores when several "
                       "ranks share a node; the log warns when a rank runs more threads (torch + "
                       "data.loader_threads) than it has CPUs.", 1,
                       on_resume=BOOKKEEPING)
    tensorboard: bool = doc("The root rank also writes TensorBoard event files under "
                            "RUN_DIR/tensorboard/ (every train row and evaluation, per client and "
                            "mean; a resumed run purges what came after its checkpoint). Needs "
                            "the tensorboard extra: pip install -e '.[tensorboard]'.", False,
                            on_resume=MAY_CHANGE, added=False)


@dataclass
class ClientSpec:
    arch: str = doc("Backbone of this client ('' = clients.arch): a name or a plug-in's "
                    "import path, as for clients.arch.", "")
    ranks: int = doc("MPI ranks of this client (0 = clients.ranks_per_client).", 0)


@dataclass
class ClientsConfig:
    count: int = doc("Number of clients K.", 4)
    arch: Union[str, list[str]] = doc("Backbone of every client (one name) or one name per "
                                      "client: cnn_small | cnn_mnist | resnet18 | resnet34 | "
                                      "resnet50, or a plug-in backbone "
                                      "'package.module:builder' (docs/plugins.md).", "cnn_small")
    ranks_per_client: int = doc("MPI ranks (data-parallel replicas, e.g. GPUs) per client. "
                                "Ranks are assigned to clients in contiguous blocks.", 1)
    per_client: list[ClientSpec] = doc("Optional list of clients.count entries {arch, ranks}, "
                                       "overriding clients.arch / clients.ranks_per_client per "
                                       "client (e.g. a 4-rank resnet34 beside 2-rank resnet18s).",
                                       factory=list)
    per_rank: int = doc("Whole clients each MPI rank hosts (model, optimizer, data, checkpoint "
                        "each), stepped in turn; mpirun -np = clients.count / this. A client's "
                        "trajectory does not depend on where it is hosted, so a run may resume "
                        "with another value (docs/hosted_clients.md). Needs one rank per "
                        "client.", 1, on_resume=BOOKKEEPING, added=1)


@dataclass
class BackendConfig:
    intra: str = doc("Data parallelism inside a multi-rank client: torch (torch.distributed "
                     "subgroups: NCCL on GPU, gloo on CPU) | horovod (process sets; built by "
                     "tools/install_horovod.sh) | auto (torch).", "auto")
    device: str = doc("auto (the node-local rank's GPU when CUDA is present, else CPU) | cpu | "
                      "cuda.", "auto")
    precision: str = doc("Number format of the forward pass: auto (bf16 autocast on CUDA "
                         "devices that support it, fp32 elsewhere) | fp32 | bf16 | fp16 "
                         "(autocast + a gradient scaler, saved in checkpoints). Losses, "
                         "softmax targets and the confidence selection stay in fp32.", "auto",
                         added="fp32")
    channels_last: Union[bool, str] = doc("NHWC memory layout for convolutions: auto (on for "
                                          "CUDA) | true | false.", "auto",
                                          on_resume=MAY_CHANGE, added=False)


@dataclass
class DataConfig:
    dataset: str = doc("Dataset: 'digits' = scikit-learn's embedded 8x8 digits, 'fashion_mnist' "
                       "= Fashion-MNIST from its IDX files (data.source), both built into "
                       "partitioned shards under data.root on first use; or 'shards' = a "
                       "dataset folder written by mhd-make-shards (its partition is fixed "
                       "there: the partition keys below, public_fraction to min_samples, must "
                       "then be left at their defaults or equal what the dataset was built "
                       "with).", "digits")
    root: str = doc("digits, fashion_mnist: folder for the built shard sets; shards: the dataset "
                    "folder (with manifest.json).", "data", location=True)
    source: str = doc("fashion_mnist: the folder with its four IDX files ('' = "
                      "/usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist "
                      "package puts them).", "", location=True, added="")
    public_fraction: float = doc("Fraction gamma_pub of the training pool that becomes the "
                                 "unlabeled public set.", 0.1)
    public_source: str = doc("The public set: 'split' = the public_fraction held out of the "
                             "training pool (default), or 'all' = the whole training pool, the "
                             "clients' private samples included (the paper's MHD+: plentiful "
                             "public data; the private split is unchanged).", "split",
                             added="split")
    label_assignment: str = doc("Primary labels per client: 'random' subsets of fixed size, or "
                                "'even' (every label has the same number of primary clients).",
                                "random")
    labels_per_client: int = doc("Primary labels per client (0 = none, i.e. iid).", 3)
    skew: float = doc("Skewness s: a sample goes to a client 1+s times more likely when its "
                      "label is primary there (0 = iid, 100 = strongly non-iid).", 100.0)
    partition: str = doc("How the training pool left after the public set is dealt to the "
                         "clients: 'primary' = the paper's primary labels and skew "
                         "(data.label_assignment, data.labels_per_client, data.skew); "
                         "'dirichlet' = per label, client shares drawn from Dir(data.alpha) "
                         "(NIID-Bench's label skew, used by most federated-learning papers); "
                         "or a plug-in partition function 'package.module:function' "
                         "(docs/plugins.md).", "primary", added="primary")
    alpha: float = doc("data.partition=dirichlet: the concentration alpha (smaller: each "
                       "client holds fewer labels; 0.5 is the common choice; large: near iid).",
                       0.5, added=0.5)
    min_samples: int = doc("Fewest private samples a client may receive: a partition that gives "
                           "a client fewer stops the job naming this key (change run.seed, the "
                           "partition's parameters or the number of clients).", 1, added=1)
    batch_size: int = doc("Private (labeled) batch size per client.", 32)
    public_batch_size: int = doc("Public (unlabeled) batch size; the same samples for every "
                                 "client at each step.", 64)
    loader: str = doc("Shard reader: dali (NVIDIA DALI: GPU 'mixed' decoding when CUDA is "
                      "present, CPU pipeline otherwise; JPEG shards) | wds (tar reader + PIL in "
                      "DataLoader workers) | auto (dali when importable and the shards are JPEG).",
                      "auto")
    prefetch: int = doc("Batches each loader prepares ahead of the step that uses them (per "
                        "DataLoader worker for wds, DALI's prefetch_queue_depth).", 2,
                        on_resume=BOOKKEEPING, added=2)
    loader_threads: int = doc("Decoding threads (DALI; with DALI's CPU pipeline also the "
                              "threads resizing its training crops) or worker processes (wds) "
                              "per rank.", 2,
                              on_resume=BOOKKEEPING, became_resumable=True)
    verify_shards: bool = doc("Check every shard against the sha256 in the dataset manifest "
                              "before training (the ranks share the work); a mismatch stops the "
                              "job naming the file. Also: python tools/verify_shards.py DIR.",
                              False, on_resume=MAY_CHANGE, added=False)


@dataclass
class ModelConfig:
    aux_heads: int = doc("Number m of auxiliary heads (aux1 distills from main heads, aux_k from "
                         "aux_{k-1} heads).", 2)
    embedding_dim: int = doc("Linear projection of the backbone feature to this size before the "
                             "heads (0 = the backbone's own size). Needed for embedding "
                             "distillation between architectures of different widths.", 0)
    norm: str = doc("Normalisation layers of the built-in backbones: 'batch' (BatchNorm: "
                    "statistics over the batch, private and public samples mixed) | 'group' "
                    "(GroupNorm: per sample, no sample sees another; what privacy.enabled "
                    "needs).", "batch", added="batch")


@dataclass
class DistillConfig:
    nu_aux: float = doc("Weight of the auxiliary-head distillation losses (see "
                        "distill.aux_weighting).", 3.0)
    aux_weighting: str = doc("How nu_aux applies to the aux chain: 'chain' = nu_aux is the "
                             "weight of the whole chain, nu_aux / m per aux head, so the "
                             "chain's pull on the backbone does not grow with the number of "
                             "heads m; 'per_head' = nu_aux on every aux head (the paper's "
                             "eq. 4-5). Identical for one aux head.", "chain", added="per_head")
    nu_emb: float = doc("Weight of the normalised-embedding distillation loss (0 = off; the "
                        "embedding is then not exchanged).", 1.0)
    targets_per_step: int = doc("Delta: peers each client distills from per step, drawn from its "
                                "in-neighbours with the shared seed.", 1)
    selection: str = doc("Per-sample target among peers and self: 'confidence' (most confident) "
                         "or 'random'.", "confidence")
    skip_less_confident: bool = doc("Skip a sample's distillation term when the student head is "
                                    "already more confident than its target.", False)
    warmup_steps: int = doc("Distillation warm-up: nu_aux and nu_emb ramp linearly from 0 to "
                            "their values over the first N steps, so that the main heads learn "
                            "something before the aux chain and the embedding term act on the "
                            "backbone (0 = off, as in the paper's formulation).", 100, added=0)


@dataclass
class EvalConfig:
    health_check: bool = doc("At evaluation steps, check that every client's main head learns: "
                             "private accuracy well above chance for its label distribution "
                             "and training CE below that of always predicting its label prior "
                             "(supervised, fedavg: one model for all, judged on the clients' "
                             "pooled labels); a failing client gets a WARNING in the log, "
                             "eval/health in metrics.h5 and the report.", True, on_resume=MAY_CHANGE, added=False)
    health_after: int = doc("First step the health check judges (0 = a quarter of run.steps, "
                            "at least the distillation and lr warm-ups).", 0,
                            on_resume=MAY_CHANGE, added=0)
    probe: bool = doc("Linear probe (the paper's Fig. 6 upper bound): at evaluation steps fit a "
                      "linear classifier on each client's frozen embedding with the labels of "
                      "the public set (all classes; an evaluation-only oracle, never used in "
                      "training) and record its test accuracy (eval/probe_acc, mean over "
                      "classes).", False, on_resume=MAY_CHANGE, added=False)
    grad_norms: bool = doc("Diagnostics: at log steps record the gradient norm that each loss "
                           "term (ce, emb, auxK) puts on the backbone (train/gradnorm_<term>); "
                           "costs one extra backward pass per term at those steps.", False,
                           on_resume=MAY_CHANGE, added=False)


@dataclass
class TopologyConfig:
    kind: str = doc("Communication graph: complete | cycle | islands | none | edges | "
                    "exponential (i hears from i-1, i-2, i-4, ...) | random (topology.degree "
                    "in-neighbours per client, redrawn every topology.resample_every steps). "
                    "Edge j->i means i distills from j.", "complete")
    islands: Union[int, list[list[int]]] = doc("For kind=islands: number of equal groups, or "
                                               "explicit groups of client ids.", 2)
    edges: list[list[int]] = doc("For kind=edges: list of [src, dst] pairs (dst distills from "
                                 "src).", factory=list)
    degree: int = doc("For kind=random: in-neighbours per client.", 2, added=2)
    resample_every: int = doc("For kind=random: draw a new graph every N steps from the shared "
                              "seed (0 = drawn once for the whole run).", 0, added=0)


@dataclass
class ExchangeConfig:
    mode: str = doc("How peers' targets arrive: 'predictions' (outputs on the public batch sent "
                    "every step) or 'pool' (paper Algorithm 2: peer checkpoints sent every "
                    "exchange.pool_every steps into a local pool that computes the targets).",
                    "predictions")
    top_k: int = doc("Send only the k largest probabilities (+ indices) per head and sample; "
                     "0 = the full distribution.", 0)
    overlap: bool = doc("Hide the exchange behind work that needs no peer: the public batch's "
                        "forward pass first and its outputs sent at once, then the private "
                        "batch's forward and backward while they travel, then the distillation "
                        "terms. BatchNorm then sees the two batches separately, so results "
                        "differ from the joint pass (off: one forward pass over both batches; "
                        "see docs/own_pace.md for what was measured).", False, added=False)
    late_peers: str = doc("mode=predictions: what a client does when a peer's message is late: "
                          "'wait' for it (lock-step; the default, reproducible) or 'drop' it "
                          "after exchange.late_deadline_s (the peer is left out of that step's "
                          "candidates, its message received and discarded when it comes; "
                          "train/dropped_peers counts them). 'drop' keeps fast clients from "
                          "waiting for a slow one, at the price of runs that depend on timing.",
                          "wait", added="wait")
    late_deadline_s: float = doc("late_peers=drop: seconds a client waits for its peers' "
                                 "messages once its own outputs are sent.", 0.05, added=0.05)
    pool_async: bool = doc("mode=pool: clients at their own pace: each sends its weights every "
                           "pool_every of its own steps and inserts a peer's checkpoint as soon "
                           "as it arrives, never waiting for one (log rows and evaluations go "
                           "to the root point to point); the teachers' age, in the sender's "
                           "steps and in seconds, is recorded (train/staleness, "
                           "train/staleness_s). Not reproducible: arrivals depend on timing.",
                           False, added=False)
    pool_max_lead: float = doc("pool_async: bounded staleness. A client at step s waits while s "
                               "> pool_max_lead x m + pool_every, m the lowest step it has "
                               "heard of from another client (leaders report their step every "
                               "pool_every steps), so a fast client's teachers are never far "
                               "less trained than it is; the wait is train/lead_wait_s. It also "
                               "caps the fast clients' speed-up at about this factor. 0: never "
                               "wait (fastest; a fast client may finish while a slow teacher has "
                               "barely started).", 0.0, on_resume=MAY_CHANGE, added=0.0)
    timeout_s: float = doc("Seconds to wait for a peer's message before failing with the peer "
                           "named.", 300.0, on_resume=BOOKKEEPING)
    pool_size: int = doc("mode=pool: N_P, peer checkpoints kept per client (0 = clients.count).",
                         0)
    pool_every: int = doc("mode=pool: S_P, steps between checkpoint refreshes (paper: 200).", 50)
    pool_transfer_steps: int = doc("mode=pool: steps a checkpoint transfer may run in the "
                                   "background before the receiver waits for it and inserts it "
                                   "(fixed, so that runs are reproducible).", 5)


@dataclass
class SeparateConfig:
    self_distill: bool = doc("For method=separate: false (the paper's Separate) trains each "
                             "client on its private labels alone, main head only, no public "
                             "data; true (an ablation) also trains the aux chain by "
                             "self-distillation on the public batch (aux1 from the client's own "
                             "main head, aux2 from aux1, ...), as MHD with no peers does.",
                             False, added=True, method="separate")


@dataclass
class FedAvgConfig:
    every: int = doc("For method=fedavg: average all weights across clients every N steps.", 10)


@dataclass
class FedMDConfig:
    revisit_steps: int = doc("For method=fedmd: private-data steps after each consensus (digest) "
                             "step; 1 alternates them.", 1, added=1)
    weight: float = doc("For method=fedmd: weight of the main head's distillation toward the "
                        "consensus on digest steps.", 1.0, added=1.0)


@dataclass
class OptimConfig:
    lr: float = doc("Initial SGD learning rate.", 0.05)
    momentum: float = doc("SGD momentum.", 0.9)
    weight_decay: float = doc("SGD weight decay.", 5e-4)
    schedule: str = doc("Learning-rate schedule over run.steps: cosine | constant.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps before the schedule.", 0)


@dataclass
class PrivacyConfig:
    enabled: bool = doc("Differentially private training of each client's private term "
                        "(DP-SGD: per-sample gradients of the private cross-entropy clipped to "
                        "privacy.clip_norm, Gaussian noise added, Poisson sampling of the "
                        "private batch). What a client sends is then post-processing of it "
                        "(docs/privacy.md). Needs model.norm=group and the privacy extra "
                        "(opacus, for the accounting).", False, added=False)
    clip_norm: float = doc("C: each private sample's gradient is scaled to an L2 norm of at "
                           "most C (over all parameters the private term trains). 4 trained "
                           "best of 1, 4 and 10 on Fashion-MNIST (docs/privacy.md); at 1 the "
                           "clipped private term is too weak beside MHD's distillation terms.",
                           4.0, added=4.0)
    noise_multiplier: float = doc("sigma: the noise added to the summed clipped gradients has "
                                  "standard deviation sigma x C (0 = calibrated from "
                                  "privacy.target_epsilon before training, per client).", 0.0,
                                  added=0.0)
    target_epsilon: float = doc("The budget epsilon at privacy.delta for each client (0 = "
                                "none: epsilon is only reported). With noise_multiplier 0 the "
                                "noise is calibrated so that run.steps spend it; either way a "
                                "client whose next step would exceed it stops training on its "
                                "private data (its distillation goes on) and says so.", 0.0,
                                added=0.0)
    delta: float = doc("delta of the (epsilon, delta) guarantee, per client (below 1 / the "
                       "client's private samples).", 1e-5, added=1e-5)
    randomness: str = doc("Source of the noise and of the Poisson sampling: 'secret' (a key "
                          "drawn from the OS for each client at its first start, kept in "
                          "RUN_DIR/privacy/, never sent: the guarantee holds against peers who "
                          "know the job file) | 'seeded' (from run.seed: runs repeat exactly, "
                          "for studies; no guarantee against anyone who knows run.seed).",
                          "secret", added="secret")


@dataclass
class JobConfig:
    method: str = doc("mhd (multi-headed distillation) | separate (clients alone) | fedavg "
                      "(weight averaging) | supervised (one model on all private data) | fedmd "
                      "(consensus distillation, Li & Wang 2019).", "mhd")
    run: RunConfig = doc("Run control.", factory=RunConfig)
    clients: ClientsConfig = doc("Clients and their models.", factory=ClientsConfig)
    data: DataConfig = doc("Dataset, partition and batches.", factory=DataConfig)
    model: ModelConfig = doc("Heads and embedding.", factory=ModelConfig)
    distill: DistillConfig = doc("MHD losses.", factory=DistillConfig)
    topology: TopologyConfig = doc("Who distills from whom.", factory=TopologyConfig)
    exchange: ExchangeConfig = doc("Prediction exchange between clients.", factory=ExchangeConfig)
    separate: SeparateConfig = doc("Separate baseline.", factory=SeparateConfig)
    fedavg: FedAvgConfig = doc("FedAvg baseline.", factory=FedAvgConfig)
    fedmd: FedMDConfig = doc("FedMD baseline.", factory=FedMDConfig)
    optim: OptimConfig = doc("Optimiser.", factory=OptimConfig)
    eval: EvalConfig = doc("Evaluation checks and diagnostics.", factory=EvalConfig)
    privacy: PrivacyConfig = doc("Differential privacy of each client's private data "
                                 "(docs/privacy.md).", factory=PrivacyConfig)
    backend: BackendConfig = doc("Parallelism and devices.", factory=BackendConfig)

    # Derived helpers (not config keys).
    def client_archs(self) -> list[str]:
        arch = self.clients.arch
        archs = [arch] * self.clients.count if isinstance(arch, str) else list(arch)
        for i, spec in enumerate(self.clients.per_client[:len(archs)]):
            archs[i] = spec.arch or archs[i]
        return archs

    def client_ranks(self) -> list[int]:
        ranks = [self.clients.ranks_per_client] * self.clients.count
        for i, spec in enumerate(self.clients.per_client[:len(ranks)]):
            ranks[i] = spec.ranks or ranks[i]
        return ranks

    def num_ranks(self) -> int:
        """The MPI ranks the job needs: one per clients.per_rank hosted clients, or the ranks
        every client asks for."""
        if self.clients.per_rank > 1:
            return self.clients.count // self.clients.per_rank
        return sum(self.client_ranks())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


