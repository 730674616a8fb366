"""What each method adds to the step (mhd_hpc/method/strategies.py), on a world of one rank."""

import pytest
import torch
from torch import nn

from mhd_hpc.distributed.intra import SingleRank
from mhd_hpc.distributed.world import World
from mhd_hpc.method.losses import soft_cross_entropy
from mhd_hpc.method.strategies import (METHODS, MHD, FedAvg, FedMD, Separate,
                                       Supervised, make_strategy)


class RecordingWorld(World):
    """The real one-rank world (real MPI collectives), noting each average over clients."""

    def __init__(self, world: World):
        self.__dict__.update(world.__dict__)
        self.means: list[int] = []  # how many tensors each clients_mean_ averaged

    def clients_mean_(self, tensors):
        self.means.append(len(tensors))
        return super().clients_mean_(tensors)


@pytest.fixture
def world(one_rank_world):
    return RecordingWorld(one_rank_world)


def strategy(method, world, **kw):
    return make_strategy(method, world, SingleRank(world), **kw)


def test_every_method_has_its_class_and_flags(world):
    made = {m: strategy(m, world, total_steps=10) for m in METHODS}
    assert {m: type(s) for m, s in made.items()} == {
        "mhd": MHD, "separate": Separate, "supervised": Supervised, "fedavg": FedAvg,
        "fedmd": FedMD}
    flags = {m: (s.shared_init, s.one_model, s.exchanges_targets) for m, s in made.items()}
    assert flags == {"mhd": (False, False, True), "separate": (False, False, False),
                     "supervised": (True, True, False), "fedavg": (True, True, False),
                     "fedmd": (False, False, False)}
    assert all(s.extra_loss(1, []) is None for m, s in made.items() if m != "fedmd")
    assert all(s.trains_private(t) for m, s in made.items() if m != "fedmd" for t in range(4))
    # The paper's Separate learns from its private batch alone; the ablation self-distills.
    assert [m for m, s in made.items() if not s.uses_public] == ["separate"]
    assert not strategy("separate", world, separate_self_distill=False).uses_public
    assert strategy("separate", world, separate_self_distill=True).uses_public


def test_an_unknown_method_is_an_error_naming_the_known_ones(world):
    with pytest.raises(ValueError, match="unknown method 'fedprox'.*fedavg"):
        strategy("fedprox", world)


def test_fedavg_averages_at_start_every_period_and_after_the_last_step(world):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # weights and BN statistics
    model(torch.randn(4, 3))  # BN statistics that are not the defaults
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fedavg = strategy("fedavg", world, total_steps=10, fedavg_every=3)
    fedavg.start(model, resumed=True)
    assert world.means == []  # a resumed run is averaged already
    fedavg.start(model, resumed=False)
    averaged_at = []
    for step in range(1, 11):
        n = len(world.means)
        fedavg.after_step(step, model)
        averaged_at += [step] * (len(world.means) - n)
    assert averaged_at == [3, 6, 9, 10]
    state = len(model.state_dict())
    assert world.means == [state] * 5  # every weight and buffer each time
    # the mean over one client is that client's model, integer buffers included
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert fedavg.take_bytes() == 0 and fedavg.take_bytes() == 0  # one rank sends nothing


def test_supervised_averages_gradients_and_statistics_over_clients(world):
    sup = strategy("supervised", world)
    grads = [torch.ones(2, 2), torch.full((3,), 2.0)]
    sup.reduce_gradients(grads)
    sup.settle_buffers([torch.zeros(1)])
    assert world.means == [2, 1]
    assert torch.equal(grads[1], torch.full((3,), 2.0))


def test_fedmd_digests_every_revisit_plus_one_steps(world):
    fedmd = strategy("fedmd", world, fedmd_revisit_steps=2, fedmd_weight=0.5)
    assert [fedmd.trains_private(t) for t in range(1, 7)] == [True, True, False] * 2
    logits = [torch.randn(5, 4, requires_grad=True)]
    assert fedmd.extra_loss(1, logits) is None
    extra = fedmd.extra_loss(3, logits)
    # one client: the consensus is the client's own distribution, its CE is the entropy
    p = torch.softmax(logits[0].detach(), dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    assert torch.allclose(extra.terms["loss_consensus"], entropy, atol=1e-6)
    assert torch.allclose(extra.parts["consensus"], 0.5 * entropy, atol=1e-6)
    assert extra.parts["consensus"].requires_grad and not extra.terms["loss_consensus"].requires_grad
    assert torch.allclose(extra.terms["loss_consensus"],
                          soft_cross_entropy(logits[0], p)[0].detach())
