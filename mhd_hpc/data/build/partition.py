"""Split a labeled dataset into a public set and K skewed private client sets (paper §3.3).

A fraction ``public_fraction`` of all samples becomes the unlabeled public set. Every client gets a
set of *primary* labels (``random``: an independent random subset per client; ``even``: every
label is primary for exactly the same number of clients). The remaining samples are dealt out
without repetition: a sample of label ``l`` lands on client ``i`` with probability proportional to
``1 + skew`` when ``l`` is primary for ``i`` and to ``1`` otherwise, so ``skew = 0`` is iid and a
large skew concentrates every label on its primary clients.

Two other schemes deal the samples left after the public set (``data.partition``):

* ``dirichlet``: the label skew most federated-learning papers use (NIID-Bench, Li et al. 2022;
  Flower's ``niid_bench``): for every label a draw p ~ Dir(alpha) over the clients splits that
  label's samples in proportions p, except that a client already holding N/K samples takes no
  more (NIID-Bench's balance rule). Small alpha: each client sees few labels; large alpha: iid.
  NIID-Bench redraws until every client has ``min_samples``; here a short client is an error
  naming ``data.min_samples`` (change the seed or alpha), never a silent redraw.
* a plug-in ``package.module:function`` (docs/plugins.md): ``function(labels, num_clients,
  num_classes, seed)`` returns one array of indices into ``labels`` (the samples left after the
  public set) per client; they must be disjoint, in range, and hold ``min_samples`` each.

Everything is a pure function of the arguments and the seed (numpy only, no I/O), so that every
rank of a job can recompute the same split and a manifest can audit it afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Sequence

import numpy as np
from mhd_hpc.config.choices import LABEL_ASSIGNMENTS, PUBLIC_SOURCES  # noqa: F401 (re-exported)
from mhd_hpc.runtime.plugins import PluginError, is_import_path, load_callable, source_digest
from mhd_hpc.runtime.seeds import PARTITION

#: Where the public set comes from: the held-out public fraction, or the whole training pool
#: (the paper's MHD+; the clients' private samples then appear unlabeled in the public set too).


class PartitionError(ValueError):
    """A partition that cannot be made as asked; ``key`` is the config key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Partition:
    """The result of :func:`make_partition`; all index arrays point into the input ``labels``."""

    num_classes: int
    public: np.ndarray
    clients: list[np.ndarray]
    primary: list[np.ndarray]
    counts: np.ndarray
    settings: dict

    @property
    def num_clients(self) -> int:
        """Number of clients K."""
        return len(self.clients)

    def label_distribution(self) -> np.ndarray:
        """(K, C) per-client private label distribution p_i(c) (rows sum to 1)."""
        totals = self.counts.sum(axis=1)
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            # A zero row has no distribution; silently returning NaN would poison β_priv later.
            raise ValueError(f"client {int(empty[0])} received no private samples")
        return self.counts.astype(np.float64) / totals[:, None]

    def primary_client_histogram(self) -> np.ndarray:
        """Entry n = number of labels that are primary for exactly n clients (length K + 1)."""
        per_label = np.zeros(self.num_classes, dtype=np.int64)
        for prim in self.primary:
            per_label[prim] += 1
        return np.bincount(per_label, minlength=self.num_clients + 1).astype(np.int64)

    def manifest(self) -> dict:
        """JSON-serialisable summary: enough to audit the split and to check a rerun matches."""
        return {
            "num_classes": int(self.num_classes),
            "num_clients": int(self.num_clients),
            "public_count": int(self.public.size),
            "client_counts": [int(c.size) for c in self.clients],
            "primary": [[int(x) for x in p] for p in self.primary],
            "counts": [[int(x) for x in row] for row in self.counts],
            "settings": {k: _plain(v) for k, v in self.settings.items()},
        }


def _plain(value: object) -> object:
    """Turn numpy scalars into Python scalars so json.dumps accepts them."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def assign_primary_labels(
    num_classes: int,
    num_clients: int,
    labels_per_client: int,
    mode: str,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Primary label ids (sorted int64) for each client, ``random`` or ``even`` (paper §3.3)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if labels_per_client < 0:
        raise ValueError(f"labels_per_client must be >= 0, got {labels_per_client}")
    if labels_per_client > num_classes:
        raise ValueError(
            f"labels_per_client ({labels_per_client}) > num_classes ({num_classes})"
        )
    if mode not in LABEL_ASSIGNMENTS:
        raise ValueError(f"unknown label_assignment {mode!r}; expected one of {LABEL_ASSIGNMENTS}")

    if mode == "random":
        return [
            np.sort(rng.choice(num_classes, size=labels_per_client, replace=False)).astype(np.int64)
            for _ in range(num_clients)
        ]

    total = num_clients * labels_per_client
    if total % num_classes != 0:
        raise ValueError(
            f"even label assignment needs num_clients*labels_per_client ({total}) to be a "
            f"multiple of num_classes ({num_classes})"
        )
    return _even_sets(num_classes, num_clients, labels_per_client, total // num_classes, rng)


def _even_sets(num_classes: int, num_clients: int, size: int, copies: int,
               rng: np.random.Generator, attempts: int = 1000) -> list[np.ndarray]:
    """``num_clients`` distinct label sets of ``size`` labels in which every label appears
    exactly ``copies`` times: ``copies`` independent permutations of the labels laid end to end,
    cut into consecutive sets. Each permutation alone gives each label once; a set that
    straddles two permutations may repeat a label, and two sets may coincide (one permutation
    tiled ``copies`` times made pairs of clients with identical tasks whenever ``size`` divides
    the classes): such a draw is rejected and drawn again."""
    if size == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
    for _ in range(attempts):
        seq = np.concatenate([rng.permutation(num_classes) for _ in range(copies)])
        sets = [seq[i * size:(i + 1) * size] for i in range(num_clients)]
        if all(len(np.unique(s)) == size for s in sets) and \
                len({tuple(sorted(s)) for s in sets}) == num_clients:
            return [np.sort(s).astype(np.int64) for s in sets]
    raise ValueError(f"even label assignment: found no {num_clients} distinct sets of {size} "
                     f"of {num_classes} labels with every label in exactly {copies} of them in "
                     f"{attempts} draws (too few distinct sets exist: use fewer clients, other "
                     "labels_per_client, or label_assignment=random)")


def make_partition(
    labels: np.ndarray,
    num_clients: int,
    public_fraction: float,
    label_assignment: str,
    labels_per_client: int,
    skew: float,
    seed: int,
    num_classes: int | None = None,
    *,
    scheme: str = "primary",
    alpha: float = 0.5,
    min_samples: int = 1,
) -> Partition:
    """Split sample indices into public + per-client private sets, deterministic from ``seed``.
    ``scheme``: ``primary`` (paper §3.3: ``label_assignment``, ``labels_per_client``, ``skew``),
    ``dirichlet`` (``alpha``) or a plug-in's import path; every client must receive at least
    ``min_samples`` samples (``PartitionError`` naming the key otherwise)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if not 0.0 <= public_fraction < 1.0:
        raise ValueError(f"public_fraction must be in [0, 1), got {public_fraction}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise PartitionError("data.min_samples", f"must be an integer >= 1, got {min_samples!r}")
    if not math.isfinite(skew) or skew < 0:
        raise ValueError(f"skew must be finite and >= 0, got {skew}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )

    if scheme != "primary":
        return _dealt_partition(labels, num_clients, public_fraction, seed, int(num_classes),
                                scheme, alpha, min_samples)
    rng = np.random.default_rng(seed)
    # Fixed draw order (primary labels, public set, dealing) keeps a seed's split stable.
    primary = assign_primary_labels(num_classes, num_clients, labels_per_client,
                                    label_assignment, rng)

    n = labels.size
    n_public = int(round(public_fraction * n))
    public = np.sort(rng.choice(n, size=n_public, replace=False)).astype(np.int64)
    is_private = np.ones(n, dtype=bool)
    is_private[public] = False
    private = np.flatnonzero(is_private)

    # weights[i, l]: relative chance that a sample of label l goes to client i.
    weights = np.ones((num_clients, num_classes), dtype=np.float64)
    for i, prim in enumerate(primary):
        weights[i, prim] = 1.0 + skew
    cdf = np.cumsum(weights / weights.sum(axis=0, keepdims=True), axis=0)

    # One uniform draw per private sample, then an inverse-CDF lookup in its label's column;
    # each sample is drawn exactly once, which is what "without repetition" means.
    u = rng.random(private.size)
    owner = np.empty(private.size, dtype=np.int64)
    private_labels = labels[private]
    for lab in np.unique(private_labels):
        sel = private_labels == lab
        owner[sel] = np.searchsorted(cdf[:, lab], u[sel], side="right")
    # Guard against cdf[-1] rounding to slightly below 1.
    np.minimum(owner, num_clients - 1, out=owner)

    clients = [private[owner == i].astype(np.int64) for i in range(num_clients)]
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    np.add.at(counts, (owner, private_labels), 1)

    settings = {
        "public_fraction": float(public_fraction),
        "label_assignment": label_assignment,
        "labels_per_client": int(labels_per_client),
        "skew": float(skew),
        "seed": int(seed),
    }
    if min_samples != 1:  # (recorded only when set: the settings of older builds stay as they were)
        settings["min_samples"] = int(min_samples)
    check_min_samples(clients, min_samples, "primary labels")
    return Partition(num_classes=int(num_classes), public=public, clients=clients,
                     primary=primary, counts=counts, settings=settings)


def check_min_samples(clients: list[np.ndarray], min_samples: int, how: str) -> None:
    sizes = [c.size for c in clients]
    short = [i for i, n in enumerate(sizes) if n < min_samples]
    if short:
        raise PartitionError("data.min_samples", f"the {how} partition gave client "
                             f"{short[0]} only {sizes[short[0]]} private samples, fewer than "
                             f"data.min_samples={min_samples} (sizes {sizes}): change the seed, "
                             "the partition's parameters or the number of clients")


def dirichlet_owners(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's Dirichlet label split of ``labels``: per label (in order 0..C-1) its samples
    are shuffled and cut in proportions p ~ Dir(alpha, ..., alpha), a client holding N/K
    samples or more taking none. Returns each client's sorted indices into ``labels``."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise PartitionError("data.alpha", f"must be a finite number > 0, got {alpha}")
    n = labels.size
    owned: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for label in range(num_classes):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        p = p * (sizes < n / num_clients)
        if p.sum() <= 0:  # every client full (only at the very end): split as drawn
            p = np.full(num_clients, 1.0 / num_clients)
        cuts = (np.cumsum(p / p.sum()) * idx.size).astype(np.int64)[:-1]
        for i, part in enumerate(np.split(idx, cuts)):
            owned[i].append(part)
            sizes[i] += part.size
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in owned]


def plugin_owners(path: str, labels: np.ndarray, num_clients: int, num_classes: int,
                  seed: int) -> list[np.ndarray]:
    """The plug-in partition at ``path`` applied to ``labels``, checked: one integer array per
    client, indices within range, no index twice (``PartitionError`` naming data.partition)."""
    try:
        function = load_callable(path)
    except PluginError as exc:
        raise PartitionError("data.partition", str(exc)) from None
    given = labels.copy()
    given.setflags(write=False)
    try:
        result = function(given, num_clients, num_classes, seed)
    except Exception as exc:
        raise PartitionError("data.partition", f"{path} raised {type(exc).__name__}: "
                             f"{exc}") from exc
    contract = (f"{path}(labels, num_clients, num_classes, seed) must return a list of "
                f"{num_clients} integer index arrays into labels (one per client)")
    if isinstance(result, np.ndarray) or not isinstance(result, Sequence) \
            or len(result) != num_clients:
        got = (f"{len(result)} items" if isinstance(result, Sequence) and
               not isinstance(result, np.ndarray) else type(result).__name__)
        raise PartitionError("data.partition", f"{contract}; got {got}")
    owners = []
    for i, item in enumerate(result):
        arr = np.asarray(item)
        if arr.size == 0:
            arr = arr.astype(np.int64).reshape(0)
        if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise PartitionError("data.partition", f"{contract}; client {i}'s entry has shape "
                                 f"{arr.shape} and dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= labels.size):
            raise PartitionError("data.partition", f"{contract}; client {i} has indices in "
                                 f"[{arr.min()}, {arr.max()}], outside [0, {labels.size})")
        owners.append(np.sort(arr.astype(np.int64)))
    flat = np.concatenate(owners)
    if np.unique(flat).size != flat.size:
        values, counts = np.unique(flat, return_counts=True)
        twice = int(values[counts > 1][0])
        holders = [i for i, o in enumerate(owners) if np.any(o == twice)]
        raise PartitionError("data.partition", f"{contract}; they must be disjoint, but index "
                             f"{twice} is given {int(counts.max())} times (clients {holders})")
    return owners


def _dealt_partition(labels: np.ndarray, num_clients: int, public_fraction: float, seed: int,
                     num_classes: int, scheme: str, alpha: float,
                     min_samples: int) -> Partition:
    """The public set, then the rest dealt by ``dirichlet`` or a plug-in (module docstring)."""
    if scheme != "dirichlet" and not is_import_path(scheme):
        raise PartitionError("data.partition", f"unknown partition {scheme!r}: primary, "
                             "dirichlet, or a plug-in's package.module:function")
    rng = np.random.default_rng([seed, PARTITION])
    n = labels.size
    public = np.sort(rng.choice(n, size=int(round(public_fraction * n)),
                                replace=False)).astype(np.int64)
    is_private = np.ones(n, dtype=bool)
    is_private[public] = False
    private = np.flatnonzero(is_private)
    settings: dict = {"public_fraction": float(public_fraction), "partition": scheme,
                      "seed": int(seed), "min_samples": int(min_samples)}
    if scheme == "dirichlet":
        owners = dirichlet_owners(labels[private], num_clients, num_classes, alpha, rng)
        settings["alpha"] = float(alpha)
    else:
        owners = plugin_owners(scheme, labels[private], num_clients, num_classes, seed)
        settings["partition_sha256"] = source_digest(scheme)
    clients = [private[o] for o in owners]
    check_min_samples(clients, min_samples, scheme)
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for i, c in enumerate(clients):
        counts[i] = np.bincount(labels[c], minlength=num_classes)
    return Partition(num_classes=int(num_classes), public=public, clients=clients,
                     primary=[np.zeros(0, dtype=np.int64) for _ in range(num_clients)],
                     counts=counts, settings=settings)
