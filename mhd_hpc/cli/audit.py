"""``mhd-audit RUN_DIR`` (``python -m mhd_hpc.cli.audit``): how well a peer can tell a
client's private training samples from samples it never trained on, using what the peer
received: a membership-inference attack (Yeom et al. 2018's loss threshold).

The victim's weights as a peer holds them: in pool mode (``exchange.mode=pool``), the newest
entry of the victim in a peer's saved pool (``RUN_DIR/pools/client_PEER/``), the very weights
that were sent; ``--weights checkpoint`` takes the victim's own saved model instead (the same
kind of information, and the only one for a run that exchanged predictions: an upper bound on
what its peers saw). Members: the victim's private samples. Non-members: test samples of the
same labels, as many per label as the victim has (or as the test set has, then the members
are subsampled to match), so that the attack cannot win by the label alone. The score is the
negative cross-entropy of the main head; a sample scoring higher is called a member. Reported:
the AUC of the scores (0.5 = no better than a coin) and the true-positive rate at 1% false
positives (what an attacker who must rarely be wrong achieves; 0.01 = chance).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mhd_hpc.errors import command

__all__ = ["AuditError", "AttackResult", "roc_auc", "tpr_at_fpr", "balanced_split", "attack",
           "main"]


class AuditError(ValueError):
    """The run cannot be attacked as asked (no such client, no saved weights, no dataset)."""


def roc_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting half (the
    Mann-Whitney statistic)."""
    scores = np.concatenate([members, others])
    ranks = np.empty(len(scores))
    ranks[scores.argsort(kind="mergesort")] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # ties: their mean rank
    m, n = len(members), len(others)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: np.ndarray, others: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of members scoring above the threshold that at most ``fpr`` of the
    non-members exceed."""
    threshold = np.quantile(others, 1.0 - fpr, method="higher")
    return float((members > threshold).mean())


def balanced_split(member_labels: np.ndarray, other_labels: np.ndarray,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(member indices, non-member indices): per label, as many of each as both sides have."""
    rng = np.random.default_rng(seed)
    mine, theirs = [], []
    for label in np.unique(member_labels):
        a = np.flatnonzero(member_labels == label)
        b = np.flatnonzero(other_labels == label)
        k = min(len(a), len(b))
        mine.append(rng.choice(a, k, replace=False))
        theirs.append(rng.choice(b, k, replace=False))
    return np.concatenate(mine), np.concatenate(theirs)


@dataclass
class AttackResult:
    client: int
    weights: str  # where the attacked weights came from
    step: int  # the victim's step those weights are of
    members: int
    auc: float
    tpr_at_1pct_fpr: float
    member_loss: float
    nonmember_loss: float


@torch.no_grad()
def sample_losses(model: torch.nn.Module, stream) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample cross-entropy of the main head, labels) over a whole eval stream."""
    from mhd_hpc.data.read.feed import to_device

    model.eval()
    losses, labels = [], []
    for batch in stream.eval_batches():
        batch = to_device(batch, torch.device("cpu"))
        _, logits = model(batch.images)
        losses.append(F.cross_entropy(logits[0].float(), batch.labels, reduction="none").numpy())
        labels.append(batch.labels.numpy())
    return np.concatenate(losses), np.concatenate(labels)


def _victim_weights(run_dir: Path, client: int, source: str, peer: int | None,
                    num_clients: int) -> tuple[np.ndarray | dict, str, int]:
    """(flat weights or a state dict, a description, the victim's step)."""
    from mhd_hpc.run.checkpoint_files import ClientCheckpoints, pool_files

    if source == "checkpoint":
        files = ClientCheckpoints(run_dir, client, keep=1)
        steps = files.steps()
        if not steps:
            raise AuditError(f"{files.folder} has no checkpoint")
        state, _ = files.load(steps[-1])
        return state["model"], f"client {client}'s own checkpoint", steps[-1]
    best = None  # (source_step, peer, weights)
    for j in ([peer] if peer is not None else range(num_clients)):
        if j == client:
            continue
        files = pool_files(run_dir, j, keep=1)
        steps = files.steps()
        if not steps:
            continue
        for entry in files.load(steps[-1])[0]["entries"]:
            if entry["source_client"] == client and (best is None
                                                     or entry["source_step"] > best[0]):
                best = (int(entry["source_step"]), j, entry["weights"].numpy())
    if best is None:
        raise AuditError(f"no saved pool of {run_dir} holds client {client}'s "
                         "weights (pool mode only: exchange.mode=pool; for a run that "
                         "exchanged predictions use --weights checkpoint)")
    step, j, flat = best
    return flat, f"client {client}'s weights of step {step} in client {j}'s pool", step


def attack(run_dir: str | Path, clients: list[int] | None = None, *, weights: str = "pool",
           peer: int | None = None, seed: int = 0,
           data_root: str | None = None) -> list[AttackResult]:
    """The loss-threshold attack on each of ``clients`` (None: all) of the run in ``run_dir``.
    The run's config and dataset are read once, and the test split opened once for all."""
    import yaml

    from mhd_hpc.config.parse import config_from_saved
    from mhd_hpc.data.dataset import find_dataset
    from mhd_hpc.data.manifest import client_split
    from mhd_hpc.data.read.stream_factory import open_stream
    from mhd_hpc.method.pool import load_flat_state
    from mhd_hpc.models import build_model

    run_dir = Path(run_dir)
    cfg = config_from_saved(yaml.safe_load((run_dir / "config.yaml").read_text()))
    clients = list(range(cfg.clients.count)) if clients is None else clients
    if any(not 0 <= c < cfg.clients.count for c in clients):
        raise AuditError(f"--client {','.join(map(str, clients))}: the run has "
                         f"clients 0 to {cfg.clients.count - 1}")
    if data_root:
        cfg.data.root = data_root
    folder, manifest, error = find_dataset(cfg.data, cfg.clients.count, cfg.run.seed,
                                           lambda _: None)
    if error:
        raise AuditError(f"{error[0]}: {error[1]} (--data-root: where the run's "
                         "dataset is)")
    shape = manifest.image_shape
    opts = {"loader": "wds", "threads": 0, "manifest": manifest}
    test = open_stream(folder, "test", 256, 0, "eval", **opts)[0]
    results = []
    try:
        for client in clients:
            model = build_model(cfg.client_archs()[client], manifest.num_classes,
                                cfg.model.aux_heads, shape[0], shape[-1],
                                cfg.model.embedding_dim, cfg.model.norm)
            state, where, step = _victim_weights(run_dir, client, weights, peer,
                                                 cfg.clients.count)
            if isinstance(state, dict):
                model.load_state_dict(state)
            else:
                load_flat_state(model, state)
            with open_stream(folder, client_split(client), 256, 0, "eval", **opts)[0] as mine:
                loss_in, y_in = sample_losses(model, mine)
            loss_out, y_out = sample_losses(model, test)
            a, b = balanced_split(y_in, y_out, seed)
            s_in, s_out = -loss_in[a], -loss_out[b]
            results.append(AttackResult(client, where, step, len(a), roc_auc(s_in, s_out),
                                        tpr_at_fpr(s_in, s_out), float(loss_in[a].mean()),
                                        float(loss_out[b].mean())))
    finally:
        test.close()
    return results


HELP = __doc__.split("\n\n")[0].replace("``", "")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mhd-audit", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  mhd-audit runs/fmnist_pool            every client, through its "
               "peers' pools\n  mhd-audit runs/fmnist --weights checkpoint --client 3 --json")
    parser.add_argument("run_dir", help="a run folder (with config.yaml)")
    parser.add_argument("--client", default="all",
                        help="the victims: a client number, a comma-separated list, or 'all' "
                             "(default)")
    parser.add_argument("--weights", choices=("pool", "checkpoint"), default="pool",
                        help="pool: the victim's weights as a peer's saved pool holds them "
                             "(pool mode); checkpoint: the victim's own saved model")
    parser.add_argument("--peer", type=int, default=None,
                        help="with --weights pool: the attacking peer (default: the one "
                             "holding the victim's newest weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the balanced member/non-member draw")
    parser.add_argument("--data-root", default=None,
                        help="where the run's dataset is, when not at its data.root")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    saved = Path(args.run_dir) / "config.yaml"
    if not saved.exists():
        print(f"mhd-audit: {saved}: no such file (not a run folder)", file=sys.stderr)
        return 2
    clients = None if args.client == "all" else [int(c) for c in args.client.split(",")]
    try:
        results = attack(args.run_dir, clients, weights=args.weights, peer=args.peer,
                         seed=args.seed, data_root=args.data_root)
    except AuditError as exc:  # the run cannot be attacked as asked: say why, exit 2
        print(f"mhd-audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1))
        return 0
    for r in results:
        print(f"client {r.client}: AUC {r.auc:.3f}, TPR at 1% FPR {r.tpr_at_1pct_fpr:.3f} "
              f"({r.members} members vs as many test samples of the same labels; mean loss "
              f"{r.member_loss:.3f} vs {r.nonmember_loss:.3f}; {r.weights})")
    if len(results) > 1:
        print(f"mean over {len(results)} clients: AUC "
              f"{np.mean([r.auc for r in results]):.3f}, TPR at 1% FPR "
              f"{np.mean([r.tpr_at_1pct_fpr for r in results]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
