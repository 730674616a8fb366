"""The Multi-Headed Distillation loss terms as pure tensor functions (paper §3.2, eq. 2-5).

Heads are indexed 0 = main head (trained on labels only), 1..m = auxiliary heads. Aux head 1
distills from the *main* heads of the candidate set, aux head k from the aux_{k-1} heads; the
candidate set is the client itself (its own head, detached) plus the peers chosen this step.
Per public sample one candidate is selected as the target (:func:`select_targets`, the one
implementation of the rule), and the student head learns it by soft cross-entropy
(:func:`soft_cross_entropy`, also FedMD's consensus loss). Targets never carry gradient.

No MPI, no I/O: the caller gathers peer outputs (dense probabilities: the codec densifies
top-k messages); :func:`mhd_loss` assembles the whole objective of one step from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from mhd_hpc.config.choices import SELECTION_MODES, AUX_WEIGHTINGS  # noqa: F401 (re-exported)
from mhd_hpc.distributed.codec import PeerOutputs  # noqa: F401 (what a peer sends; re-exported)



def aux_head_weight(nu_aux: float, aux_heads: int, weighting: str) -> float:
    """Weight of each aux head's loss: ``nu_aux / m`` for ``chain`` (the chain as a whole
    weighs nu_aux, whatever its length), ``nu_aux`` for ``per_head`` (the paper's eq. 4-5)."""
    if weighting not in AUX_WEIGHTINGS:
        raise ValueError(f"unknown aux weighting {weighting!r}; expected one of {AUX_WEIGHTINGS}")
    return nu_aux / max(aux_heads, 1) if weighting == "chain" else nu_aux


def main_ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the main head on the private labeled batch."""
    return F.cross_entropy(logits, labels)


def normalize_embedding(emb: Tensor, eps: float = 1e-8) -> Tensor:
    """L2-normalise each row; the paper normalises because embedding norms drift apart (§3.2)."""
    return F.normalize(emb, p=2.0, dim=1, eps=eps)


def embedding_loss(student_emb: Tensor, peer_embs: Sequence[Tensor]) -> Tensor:
    """Eq. 2 with rho(d) = d^2: sum over peers of the batch mean of ||s/|s| - p_j||^2.

    ``student_emb`` is raw (B, D); peer embeddings arrive already normalised (B, D), possibly fp16.
    """
    if student_emb.dim() != 2:
        raise ValueError(f"student_emb must be (B, D), got {tuple(student_emb.shape)}")
    if len(peer_embs) == 0:
        # Keep a graph connection so data-parallel wrappers see the parameters as used.
        return student_emb.sum() * 0.0
    s = normalize_embedding(student_emb)
    total = s.new_zeros(())
    for j, p in enumerate(peer_embs):
        if p.shape != s.shape:
            raise ValueError(f"peer embedding {j} has shape {tuple(p.shape)}, "
                             f"student has {tuple(s.shape)}")
        p = p.detach().to(s.dtype)
        # Squared distance directly: no sqrt, so no infinite gradient when s == p.
        total = total + (s - p).pow(2).sum(dim=1).mean()
    return total


def select_targets(candidates: Tensor, mode: str, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The target selection rule (paper §3.2): one candidate distribution per sample.

    ``candidates`` is (..., P, B, C): P candidates (index 0 is the client itself) for B samples,
    for any leading dimensions (e.g. the heads of the aux chain). Returns (targets (..., B, C),
    chosen (..., B)), detached.

    ``confidence``: the candidate with the largest max probability Λ = max_c p_c, ties to the
    lowest index (a tie keeps the client's own prediction); NaN confidences lose every
    comparison, so a diverged model cannot select an out-of-range candidate (the non-finite
    check reports the divergence itself). ``random``: a uniformly random candidate per sample,
    drawn from ``generator`` (one draw of the shape of ``chosen``).
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}; expected one of {SELECTION_MODES}")
    if candidates.dim() < 3 or candidates.shape[-3] < 1:
        raise ValueError(f"candidates must be (..., P>=1, B, C), got {tuple(candidates.shape)}")
    cand = candidates.detach()
    p, b = cand.shape[-3], cand.shape[-2]
    if mode == "confidence":
        conf = torch.nan_to_num(cand.amax(dim=-1), nan=-1.0)  # (..., P, B)
        best = conf.amax(dim=-2, keepdim=True)
        order = torch.arange(p, device=cand.device)[:, None].expand_as(conf)
        # Explicit lowest-index tie break instead of relying on argmax's tie behaviour.
        chosen = torch.where(conf == best, order, torch.full_like(order, p)).amin(dim=-2)
    else:
        gen_device = generator.device if generator is not None else cand.device
        chosen = torch.randint(0, p, (*cand.shape[:-3], b), generator=generator,
                               device=gen_device).to(cand.device)
    index = chosen[..., None, :, None].expand(*chosen.shape[:-1], 1, b, cand.shape[-1])
    return cand.gather(-3, index).squeeze(-3), chosen


def soft_cross_entropy(student_logits: Tensor, targets: Tensor, skip_less_confident: bool = False
                       ) -> tuple[Tensor, Tensor]:
    """The distillation loss: -sum_c t_c log softmax(student)_c, averaged over the B samples,
    for (..., B, C) logits and targets with any leading dimensions. Returns (loss (...), kept
    (..., B)); targets never carry gradient.

    With ``skip_less_confident`` (paper §4.2.2) a sample whose student head is already more
    confident than its target contributes 0; the mean is still over all B samples, so the loss
    scale does not jump with the number of skipped samples.
    """
    if student_logits.shape != targets.shape or student_logits.dim() < 2:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and targets "
                         f"{tuple(targets.shape)} must both be (..., B, C)")
    b = student_logits.shape[-2]
    logp = F.log_softmax(student_logits, dim=-1)
    t = targets.detach().to(logp.dtype)
    per_sample = -(t * logp).sum(dim=-1)
    if skip_less_confident:
        kept = ~(logp.detach().exp().amax(dim=-1) > t.amax(dim=-1))
        per_sample = torch.where(kept, per_sample, torch.zeros_like(per_sample))
    else:
        kept = torch.ones_like(per_sample, dtype=torch.bool)
    if b == 0:
        return student_logits.sum(dim=(-2, -1)) * 0.0, kept
    return per_sample.sum(dim=-1) / b, kept


@dataclass
class HeadDistillStats:
    """Loss of one aux head plus diagnostics for the metrics log."""

    loss: Tensor
    chosen_self_fraction: Tensor  # 0-dim, on the device: reading it would wait for the device
    skipped_fraction: Tensor


def aux_chain_losses(
    student_logits: Sequence[Tensor],
    peer_probs: Sequence[Tensor] | Tensor,
    selection: str,
    skip_less_confident: bool,
    generator: torch.Generator | None = None,
) -> list[HeadDistillStats]:
    """Eq. 5: aux_1 distills from main heads, aux_k from aux_{k-1} heads (self + peers).

    ``student_logits``: (B, C) per head (main, aux_1..aux_m), with grad. ``peer_probs``: per head
    a dense (P, B, C) probability tensor from the P peers of this step (P may be 0), or one
    (>= m, P, B, C) tensor. The peers' last head (aux_m) is never a target, so ``peer_probs`` may
    hold m or m + 1 entries. Returns m unweighted entries (the caller multiplies by nu_aux).

    All m heads go through selection and loss together (a few kernels for the whole chain,
    not a few per head): what a GPU step spends on launches, not on math.
    """
    m = len(student_logits) - 1
    if m < 0:
        raise ValueError("student_logits must contain at least the main head")
    if len(peer_probs) < m:
        raise ValueError(f"need peer probabilities for {m} source heads, got {len(peer_probs)}")
    if m == 0:
        return []
    b, c = student_logits[0].shape
    peers = peer_probs[:m] if isinstance(peer_probs, Tensor) else torch.stack(list(peer_probs[:m]))
    if peers.dim() != 4 or peers.shape[2:] != (b, c):
        raise ValueError(f"peer probabilities must be (P, {b}, {c}) per head, got "
                         f"{tuple(peers.shape[1:])}")
    # Self candidates in float32: selection compares confidences across candidates, and fp16
    # rounding could flip near-ties between self and a peer.
    own = F.softmax(torch.stack([l.detach().float() for l in student_logits[:m]]), dim=2)
    cand = torch.cat([own[:, None], peers.detach().to(own.device, own.dtype)], dim=1)
    targets, chosen = select_targets(cand, selection, generator)  # (m, B, C), (m, B)
    loss, kept = soft_cross_entropy(torch.stack(list(student_logits[1:m + 1])), targets,
                                    skip_less_confident)
    self_fraction = (chosen == 0).float().mean(dim=1)
    skipped_fraction = (~kept).float().mean(dim=1)
    return [HeadDistillStats(loss[k], self_fraction[k], skipped_fraction[k]) for k in range(m)]


def mhd_loss(
    supervised: Tensor | None,
    pub_logits: Sequence[Tensor],
    pub_emb: Tensor,
    peers: Sequence[PeerOutputs],
    *,
    nu_aux: float,
    nu_emb: float,
    selection: str = "confidence",
    skip_less_confident: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor | float], dict[str, Tensor]]:
    """Eq. 1 for one client and step: ``supervised + nu_emb * embedding loss
    + nu_aux * sum_k aux_k loss``, where ``supervised`` is the main head's CE on the private
    batch (:func:`main_ce_loss`; None on a step that does not train on private data).

    ``pub_logits`` (B, C) per head and ``pub_emb`` (B, D) on the public batch; ``peers`` what this
    step's peers sent (dense probabilities per head, normalised embedding). With no peers the
    aux heads distill from the client itself (the
    baselines' self-distillation) and there is no embedding term. Returns (loss, terms, parts):
    the unweighted loss terms (``loss_ce``, ``loss_emb``, ``loss_auxK``, ``loss_total``) detached,
    per aux head the fraction of targets that were the client itself and of samples skipped; and
    the weighted parts of the loss with their graphs (``ce``, ``emb``, ``auxK``), for diagnostics.
    """
    loss = supervised if supervised is not None else pub_emb.new_zeros(())
    terms: dict[str, Tensor | float] = {}
    parts: dict[str, Tensor] = {}
    if supervised is not None:
        terms["loss_ce"], parts["ce"] = supervised.detach(), supervised
    if nu_emb > 0 and peers:
        loss_emb = embedding_loss(pub_emb, [p.embedding for p in peers])
        parts["emb"] = nu_emb * loss_emb
        loss = loss + parts["emb"]
        terms["loss_emb"] = loss_emb.detach()
    m = len(pub_logits) - 1
    if m:
        b, c = pub_logits[0].shape
        stacked = (torch.stack([torch.stack(p.head_probs[:m]) for p in peers], dim=1) if peers
                   else pub_logits[0].new_zeros((m, 0, b, c)))  # (m, P, B, C)
        stats = aux_chain_losses(pub_logits, stacked, selection, skip_less_confident, generator)
        for k, s in enumerate(stats, start=1):
            parts[f"aux{k}"] = nu_aux * s.loss
            loss = loss + parts[f"aux{k}"]
            terms[f"loss_aux{k}"] = s.loss.detach()
            terms[f"self_target_aux{k}"] = s.chosen_self_fraction
            terms[f"skipped_aux{k}"] = s.skipped_fraction
    terms["loss_total"] = loss.detach()
    return loss, terms, parts
