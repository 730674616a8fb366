"""The losses (mhd_hpc/method/losses.py) on hand-made tensors (paper eq. 2-5) and the MHD objective."""

from __future__ import annotations

import math

import pytest
import torch

from mhd_hpc.method import losses
from mhd_hpc.method.losses import (HeadDistillStats, aux_chain_losses, embedding_loss, main_ce_loss,
                            normalize_embedding, select_targets, soft_cross_entropy)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference per-sample soft cross-entropy written out by hand."""
    logz = torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
    return -(target * (logits - logz)).sum(dim=1)


def _cands() -> torch.Tensor:
    # (P=3, B=5, C=3); per-sample maxima chosen so the winner is known.
    c = torch.tensor([
        [[.5, .3, .2], [.9, .05, .05], [.4, .3, .3], [.6, .2, .2], [.4, .3, .3]],
        [[.1, .7, .2], [.4, .3, .3], [.25, .5, .25], [.2, .6, .2], [.1, .7, .2]],
        [[.2, .2, .6], [.1, .1, .8], [.2, .2, .6], [.5, .25, .25], [.15, .15, .7]],
    ])
    return c


def test_main_ce_loss_matches_manual():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(main_ce_loss(logits, labels), _soft_ce(logits, onehot).mean())


def test_select_targets_confidence_and_ties():
    cands = _cands()
    targets, chosen = select_targets(cands, "confidence")
    # sample 3: tie 0.6 vs 0.6 -> lowest index 0; sample 4: tie 0.7 vs 0.7 -> index 1.
    assert chosen.tolist() == [1, 0, 2, 0, 1]
    assert chosen.dtype == torch.long
    for b, p in enumerate(chosen.tolist()):
        assert torch.equal(targets[b], cands[p, b])


def test_select_targets_random_uses_all_and_is_reproducible():
    cands = torch.rand(3, 300, 4).softmax(dim=2)
    t1, c1 = select_targets(cands, "random", torch.Generator().manual_seed(5))
    t2, c2 = select_targets(cands, "random", torch.Generator().manual_seed(5))
    _, c3 = select_targets(cands, "random", torch.Generator().manual_seed(6))
    assert torch.equal(c1, c2) and torch.equal(t1, t2) and not torch.equal(c1, c3)
    assert set(c1.tolist()) == {0, 1, 2}
    assert torch.equal(t1, cands[c1, torch.arange(300)])


def test_select_targets_errors():
    with pytest.raises(ValueError, match="selection"):
        select_targets(_cands(), "entropy")
    with pytest.raises(ValueError):
        select_targets(torch.zeros(0, 2, 3), "confidence")


def test_targets_carry_no_gradient():
    cands = _cands().clone().requires_grad_(True)
    targets, _ = select_targets(cands, "confidence")
    assert not targets.requires_grad
    student = torch.zeros(5, 3, requires_grad=True)
    tgt = cands[0].clone()  # a target that *does* require grad: soft_cross_entropy must detach it
    loss, _ = soft_cross_entropy(student, tgt)
    loss.backward()
    assert cands.grad is None and student.grad is not None


def test_distill_loss_value_matches_manual_soft_ce():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    targets = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    loss, kept = soft_cross_entropy(student, targets)
    assert kept.tolist() == [True, True]
    assert torch.allclose(loss, _soft_ce(student, targets).mean())


def test_skip_less_confident_masks_expected_samples():
    # Student confidences: ~1.0 (sample 0) and 1/3 (sample 1); target confidence 0.6 for both.
    student = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[0.6, 0.2, 0.2], [0.6, 0.2, 0.2]])
    loss, kept = soft_cross_entropy(student, targets, skip_less_confident=True)
    assert kept.tolist() == [False, True]
    # Mean over the whole batch (B = 2), skipped sample contributes 0.
    assert torch.allclose(loss, _soft_ce(student.detach(), targets)[1] / 2)
    loss.backward()
    assert torch.all(student.grad[0] == 0) and torch.any(student.grad[1] != 0)


def test_embedding_loss_known_values_and_no_peer_grad():
    student = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    peer_a = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)  # orthogonal / equal
    peer_b = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float16)  # fp16 on the wire
    # sample 0: |(1,0)-(0,1)|^2 = 2; sample 1: 0 (peer_a) or 2 (peer_b).
    loss = embedding_loss(student, [peer_a, peer_b])
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), (2 + 0) / 2 + (2 + 2) / 2, rel_tol=1e-6)
    scaled = embedding_loss(student.detach() * 10, [peer_a, peer_b])
    assert math.isclose(scaled.item(), loss.item(), rel_tol=1e-6)
    loss.backward()
    assert peer_a.grad is None and student.grad is not None


def test_embedding_loss_without_peers_is_zero_with_grad_path():
    student = torch.randn(4, 3, requires_grad=True)
    loss = embedding_loss(student, [])
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()  # must not raise
    assert torch.all(student.grad == 0)


def test_normalize_embedding_unit_rows():
    emb = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    assert torch.allclose(normalize_embedding(emb), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_aux_chain_uses_main_for_aux1_and_aux1_for_aux2():
    zero = torch.zeros(1, 3)
    main = zero.clone().requires_grad_(True)                    # self conf 1/3
    aux1 = zero.clone().requires_grad_(True)                    # self conf 1/3
    aux2 = torch.tensor([[1.0, -1.0, 0.0]], requires_grad=True)
    peer_main = torch.tensor([[[0.2, 0.2, 0.6]]])               # (P=1, B=1, C=3)
    peer_aux1 = torch.tensor([[[0.8, 0.1, 0.1]]])
    peer_aux2 = torch.tensor([[[0.0, 0.0, 1.0]]])               # never a target
    stats = aux_chain_losses([main, aux1, aux2], [peer_main, peer_aux1, peer_aux2],
                             "confidence", skip_less_confident=False)
    assert len(stats) == 2 and all(isinstance(s, HeadDistillStats) for s in stats)
    assert torch.allclose(stats[0].loss, _soft_ce(aux1.detach(), peer_main[0]).mean())
    assert torch.allclose(stats[1].loss, _soft_ce(aux2.detach(), peer_aux1[0]).mean())
    assert stats[0].chosen_self_fraction == 0.0 and stats[0].skipped_fraction == 0.0
    sum(s.loss for s in stats).backward()
    assert main.grad is None  # main head is only a (detached) source here


def test_aux_chain_self_target_and_no_peers():
    main = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])     # self conf ~0.96, 1/3
    aux1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    peer_main = torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]], requires_grad=True)
    stats = aux_chain_losses([main, aux1], [peer_main], "confidence", True)
    # sample 0 -> self (more confident), sample 1 -> peer; student aux1 conf on sample 1 is
    # e^3/(e^3+2) ~ 0.91 > 0.5, so sample 1 is skipped.
    expected_target = torch.stack([main[0].softmax(0), peer_main[0, 1].detach()])
    per = _soft_ce(aux1.detach(), expected_target)
    assert torch.allclose(stats[0].loss, per[0] / 2)
    assert stats[0].chosen_self_fraction == 0.5 and stats[0].skipped_fraction == 0.5
    stats[0].loss.backward()
    assert peer_main.grad is None
    # P = 0: pure self-distillation from the main head.
    none = aux_chain_losses([main, aux1], [torch.zeros(0, 2, 3)], "random", False,
                            torch.Generator().manual_seed(0))
    assert none[0].chosen_self_fraction == 1.0
    assert torch.allclose(none[0].loss, _soft_ce(aux1.detach(), main.softmax(1)).mean())


def test_selection_survives_nan_outputs():
    """A diverged model's NaNs must not pick a candidate that does not exist (the job then
    stops on the non-finite check with a clear message, not an IndexError)."""
    own = torch.full((1, 2, 3), float("nan"))
    targets, chosen = select_targets(own, "confidence")
    assert chosen.tolist() == [0, 0]
    student = [torch.full((2, 3), float("nan")), torch.zeros(2, 3, requires_grad=True)]
    stats = aux_chain_losses(student, [torch.zeros(0, 2, 3)], "confidence", False)
    assert stats[0].chosen_self_fraction == 1.0 and torch.isnan(stats[0].loss)


def _reference_objective(ce, logits, emb, peers, nu_aux, nu_emb, skip):
    """Eq. 1-5 written out per sample and candidate with Python floats, nothing shared with
    mhd_hpc.method.losses: embedding term, then for each aux head k the most confident of {self head
    k-1, peers' heads k-1} (ties to self, then to the lower peer), soft CE of head k."""
    def softmax(row):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        return [x / sum(e) for x in e]

    def unit(row):
        n = math.sqrt(sum(x * x for x in row))
        return [x / n for x in row]

    b, heads = len(logits[0]), len(logits)
    total = ce
    for p in peers:
        total += nu_emb * sum(sum((x - y) ** 2 for x, y in zip(unit(emb[i]), p["emb"][i]))
                              for i in range(b)) / b
    for k in range(1, heads):
        head = 0.0
        for i in range(b):
            candidates = [softmax(logits[k - 1][i])] + [p["probs"][k - 1][i] for p in peers]
            best = 0
            for j, cand in enumerate(candidates):
                if max(cand) > max(candidates[best]):
                    best = j
            target, student = candidates[best], softmax(logits[k][i])
            if skip and max(student) > max(target):
                continue
            head += -sum(t * math.log(q) for t, q in zip(target, student))
        total += nu_aux * head / b
    return total


@pytest.mark.parametrize("skip", [False, True])
def test_mhd_loss_assembles_the_paper_objective(skip):
    torch.manual_seed(0)
    b, c = 5, 4
    pub_logits = [(2 * torch.randn(b, c)).requires_grad_(True) for _ in range(3)]
    pub_emb = torch.randn(b, 6, requires_grad=True)
    ce = torch.tensor(1.5)
    peers = [losses.PeerOutputs(j, [torch.softmax(2 * torch.randn(b, c), 1) for _ in range(3)],
                                losses.normalize_embedding(torch.randn(b, 6))) for j in (1, 2)]
    loss, terms, parts = losses.mhd_loss(ce, pub_logits, pub_emb, peers, nu_aux=3.0,
                                         nu_emb=0.5, skip_less_confident=skip)
    want = _reference_objective(
        1.5, [l.tolist() for l in pub_logits], pub_emb.tolist(),
        [{"probs": [h.tolist() for h in p.head_probs], "emb": p.embedding.tolist()}
         for p in peers], 3.0, 0.5, skip)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert set(terms) >= {"loss_ce", "loss_emb", "loss_aux1", "loss_aux2", "loss_total",
                          "self_target_aux1", "skipped_aux2"}
    assert set(parts) == {"ce", "emb", "aux1", "aux2"}
    assert sum(parts.values()).item() == pytest.approx(loss.item())
    # Without peers: no embedding term, the aux heads distill from the client itself.
    loss0, terms0, _ = losses.mhd_loss(ce, pub_logits, pub_emb, [], nu_aux=3.0, nu_emb=0.5)
    assert "loss_emb" not in terms0 and terms0["self_target_aux1"] == 1.0


def test_aux_weighting_chain_divides_by_the_chain_length_and_per_head_does_not():
    assert losses.aux_head_weight(3.0, 1, "chain") == losses.aux_head_weight(3.0, 1, "per_head")
    assert losses.aux_head_weight(3.0, 4, "chain") == pytest.approx(0.75)
    assert losses.aux_head_weight(3.0, 4, "per_head") == 3.0
    assert losses.aux_head_weight(3.0, 0, "chain") == 3.0  # no head: nothing to divide
    with pytest.raises(ValueError, match="aux weighting"):
        losses.aux_head_weight(3.0, 2, "sum")


def test_random_selection_with_peers_in_the_production_chain():
    """The batched aux chain's random path: every candidate (self + 2 peers) is drawn about a
    third of the time for every head, the same draws for the same generator seed, and the loss
    is the soft CE toward exactly the drawn candidates."""
    torch.manual_seed(1)
    b, c, m = 3000, 4, 2
    logits = [torch.randn(b, c) for _ in range(m + 1)]
    peers = torch.softmax(torch.randn(m, 2, b, c), dim=3)  # (heads, P=2, B, C)
    first, again = (losses.aux_chain_losses(logits, peers, "random", False,
                                            torch.Generator().manual_seed(3)) for _ in range(2))
    for s1, s2 in zip(first, again):
        assert torch.equal(s1.loss, s2.loss)
        assert abs(float(s1.chosen_self_fraction) - 1 / 3) < 0.03  # 3000 draws: sd 0.009
    gen = torch.Generator().manual_seed(3)
    own = torch.softmax(torch.stack(logits[:m]), dim=2)
    cand = torch.cat([own[:, None], peers], dim=1)  # (m, 3, B, C)
    chosen = torch.randint(0, 3, (m, b), generator=gen)  # the same single draw
    for k in range(m):
        target = cand[k, chosen[k], torch.arange(b)]
        want = -(target * torch.log_softmax(logits[k + 1], dim=1)).sum(1).mean()
        assert torch.allclose(first[k].loss, want, atol=1e-6)
