"""Split a labeled dataset into a public set and K skewed private client sets (paper §3.3).

A fraction ``public_fraction`` of all samples becomes the unlabeled public set. Every client gets a
set of *primary* labels (``random``: an independent random subset per client; ``even``: every
label is primary for exactly the same number of clients). The remaining samples are dealt out
without repetition: a sample of label ``l`` lands on client ``i`` with probability proportional to
``1 + skew`` when ``l`` is primary for ``i`` and to ``1`` otherwise, so ``skew = 0`` is iid and a
large skew concentrates every label on its primary clients.

Everything is a pure function of the arguments and the seed (numpy only, no I/O), so that every
rank of a job can recompute the same split and a manifest can audit it afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from mhd_hpc.config.choices import LABEL_ASSIGNMENTS, PUBLIC_SOURCES  # noqa: F401 (re-exported)

#: Where the public set comes from: the held-out public fraction, or the whole training pool
#: (the paper's MHD+; the clients' private samples then appear unlabeled in the public set too).


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
) -> Partition:
    """Split sample indices into public + per-client private sets, deterministic from ``seed``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if not 0.0 <= public_fraction < 1.0:
        raise ValueError(f"public_fraction must be in [0, 1), got {public_fraction}")
    if not math.isfinite(skew) or skew < 0:
        raise ValueError(f"skew must be finite and >= 0, got {skew}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )

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
    return Partition(num_classes=int(num_classes), public=public, clients=clients,
                     primary=primary, counts=counts, settings=settings)
