"""One training step (mhd_hpc/method/step.py) on a tiny model, one client of one rank."""

import copy

import pytest
import torch
from torch import nn

from mhd_hpc.data.read.batches import Batch
from mhd_hpc.distributed.intra import SingleRank
from mhd_hpc.distributed.codec import PeerOutputs
from mhd_hpc.method.step import DistillSettings, TrainStep
from mhd_hpc.method.strategies import Strategy
from mhd_hpc.method.targets import NoTargets
from mhd_hpc.models.multihead import MultiHeadModel

C, B = 4, 8  # classes, batch size


def tiny_model(seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
    backbone.out_dim = 8
    return MultiHeadModel(backbone, "tiny", C, aux_heads=2)


def batch(seed: int, n: int = B) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch([f"k{seed}-{i}" for i in range(n)], torch.randn(n, 1, 4, 4, generator=g),
                 torch.randint(0, C, (n,), generator=g))


class FixedPeers(NoTargets):
    """A target source handing the step fixed outputs of one peer (the exchange is tested
    elsewhere), built from ``source``, a tensor that requires grad."""

    uses_graph = True

    def __init__(self, source: torch.Tensor):
        self.source = source
        self.asked = []

    def targets(self, step, pub, pub_logits, pub_emb):
        self.asked.append(step)
        probs = torch.softmax(self.source, dim=1)
        emb = torch.nn.functional.normalize(self.source[:, :1].expand(-1, 8), dim=1)
        return [PeerOutputs(1, [probs, probs, probs], emb)]


def make_step(world, model, source=None, *, warmup=0, lr=0.1, overlap=False, nu_emb=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainStep(model, opt, strategy=Strategy(world, SingleRank(world)),
                     source=source or NoTargets(),
                     distill=DistillSettings(aux_head_weight=0.5, nu_emb=nu_emb,
                                             warmup_steps=warmup),
                     seed=0, client=0, device=torch.device("cpu"), overlap=overlap)


def test_steps_lower_the_loss(one_rank_world):
    step = make_step(one_rank_world, tiny_model())
    private, public = batch(1), batch(2)
    first = float(step(1, private, public)["loss_total"])
    for t in range(2, 30):
        last = float(step(t, private, public)["loss_total"])
    assert last < 0.8 * first, (first, last)


def test_targets_carry_no_gradient(one_rank_world):
    peer = torch.randn(B, C, requires_grad=True)
    source = FixedPeers(peer)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    terms = make_step(one_rank_world, model, source)(1, batch(1), batch(2))
    assert source.asked == [1] and float(terms["loss_emb"]) > 0
    assert peer.grad is None  # the peer's outputs were targets, never trained
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_warm_up_ramp_scales_the_distillation_terms(one_rank_world):
    """loss_total = CE + ramp * (w_aux * sum of aux terms + nu_emb * embedding term), with
    ramp = step / warmup_steps during the warm-up and 1 after it."""
    private, public = batch(1), batch(2)
    for t, ramp in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        step = make_step(one_rank_world, tiny_model(), FixedPeers(torch.randn(B, C)), warmup=4)
        terms = step(t, private, public)
        distill = 0.5 * (terms["loss_aux1"] + terms["loss_aux2"]) + 0.5 * terms["loss_emb"]
        assert float(distill) > 0.1
        assert torch.allclose(terms["loss_total"], terms["loss_ce"] + ramp * distill), t


def test_the_overlapped_order_takes_the_same_step(one_rank_world):
    """Without BatchNorm the two orders compute the same sum of gradients."""
    a, b = tiny_model(), tiny_model()
    peer = torch.randn(B, C)
    ta = make_step(one_rank_world, a, FixedPeers(peer))(1, batch(1), batch(2))
    tb = make_step(one_rank_world, b, FixedPeers(peer), overlap=True)(1, batch(1), batch(2))
    assert torch.allclose(ta["loss_total"], tb["loss_total"], atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_check_finite_raises_on_a_nan_loss_and_names_the_steps(one_rank_world):
    step = make_step(one_rank_world, tiny_model())
    step(1, batch(1), batch(2))
    step.check_finite(1)  # finite so far
    poisoned = batch(3)
    poisoned.images[0, 0, 0, 0] = float("nan")
    step(2, poisoned, batch(2))
    step(3, batch(1), batch(2))
    with pytest.raises(FloatingPointError, match="between steps 2 and 3"):
        step.check_finite(3)


def test_the_papers_separate_learns_from_private_labels_alone(one_rank_world):
    """method=separate (separate.self_distill false): the main head's CE on the private batch
    is the whole objective; the public batch is not even forwarded, the aux heads never move."""
    from mhd_hpc.method.strategies import Separate

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, opt, strategy=Separate(one_rank_world, SingleRank(one_rank_world)),
                     source=NoTargets(), distill=DistillSettings(aux_head_weight=0.5, nu_emb=0.0),
                     seed=0, client=0, device=torch.device("cpu"))
    heads = [model.heads[name] for name in model.head_names]  # main, aux1, aux2
    aux_before = [copy.deepcopy(h.state_dict()) for h in heads[1:]]
    main_before = copy.deepcopy(heads[0].state_dict())
    unusable = Batch(["x"], torch.randn(1, 3, 9, 9), torch.zeros(1, dtype=torch.long))
    terms = step(1, batch(1), unusable)  # a public batch the model cannot take: never used
    assert set(terms) >= {"loss_ce", "loss_total"} and "loss_aux1" not in terms
    assert float(terms["loss_total"]) == pytest.approx(float(terms["loss_ce"]))
    for head, before in zip(heads[1:], aux_before):
        assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert not all(torch.equal(v, main_before[k]) for k, v in heads[0].state_dict().items())
