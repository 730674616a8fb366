"""The training loop's helpers, without MPI: schedules, run identity, metric rows, faults,
flat buffers, the MHD objective, and a pool-mode target source."""

from types import SimpleNamespace

import pytest
import torch

from mhd_hpc import losses
from mhd_hpc.config import JobConfig, load_config
from mhd_hpc.models import build_model
from mhd_hpc.progress import Interval, merge_client_rows, train_line
from mhd_hpc.config import RESUMABLE_CHANGES
from mhd_hpc.run.folder import fingerprint, identity
from mhd_hpc.schedules import learning_rate, lr_at
from mhd_hpc.signals import Fault
from mhd_hpc.tensors import flatten, unflatten_into

from conftest import ROOT


def test_lr_schedule_warmup_then_cosine_to_zero():
    """1-based steps, like distill_ramp: step 1 is the first training step."""
    assert lr_at(1, 0.1, 100, warmup_steps=10) == pytest.approx(0.01)
    assert lr_at(10, 0.1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(11, 0.1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(56, 0.1, 100, warmup_steps=10) == pytest.approx(0.05)
    assert lr_at(101, 0.1, 100, warmup_steps=10) == pytest.approx(0.0)
    assert lr_at(501, 0.1, 100) == pytest.approx(0.0)  # clamped past the end
    assert lr_at(71, 0.1, 100, schedule="constant") == 0.1
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(1, 0.1, 100, schedule="linear")
    lr = learning_rate(0.1, 100, 10, "cosine")
    assert [lr(s) for s in (1, 56, 101)] == [lr_at(s, 0.1, 100, 10) for s in (1, 56, 101)]


def test_run_identity_ignores_bookkeeping_keys_only():
    base = load_config(str(ROOT / "jobs" / "digits.yaml"))
    assert not any(k in identity(base) for k in RESUMABLE_CHANGES)
    longer = load_config(str(ROOT / "jobs" / "digits.yaml"), ["run.steps=900",
                                                              "run.out_dir=elsewhere"])
    assert fingerprint(longer) == fingerprint(base)
    other = load_config(str(ROOT / "jobs" / "digits.yaml"), ["distill.nu_aux=1"])
    assert fingerprint(other) != fingerprint(base)
    assert len(fingerprint(JobConfig())) == 16


def test_client_rows_are_means_over_ranks_and_bytes_are_summed():
    rows = [(0, {"loss_ce": 1.0, "bytes_sent": 10.0}), (0, {"loss_ce": 3.0, "bytes_sent": 5.0}),
            (1, {"loss_ce": 2.0, "bytes_sent": 7.0, "staleness": 4.0})]
    merged = merge_client_rows(rows, 2)
    assert merged[0] == {"loss_ce": 2.0, "bytes_sent": 15.0}
    assert merged[1] == {"loss_ce": 2.0, "bytes_sent": 7.0, "staleness": 4.0}


def test_interval_rows_average_and_reset():
    interval = Interval()
    interval.add({"loss_ce": 1.0})
    interval.add({"loss_ce": 3.0})
    row = interval.row(sent=100, received=50, waited=0.5, lr=0.1)
    assert row["loss_ce"] == 2.0 and row["exchange_wait_s"] == 0.25
    assert row["bytes_sent"] == 100 and row["lr"] == 0.1 and row["step_time_s"] >= 0
    assert interval.steps == 0 and interval.sums == {}
    line = train_line(20, 600, [dict(row, loss_total=2.0)])
    assert line.startswith("step     20/600 | ce 2.000 total 2.000 |")


def test_fault_spec_is_parsed_for_its_rank_only(monkeypatch):
    monkeypatch.setenv("MHD_INJECT_FAULT", "1:20:kill_in_checkpoint")
    assert Fault.for_rank(0) is None
    fault = Fault.for_rank(1)
    assert fault.in_checkpoint(20) and not fault.in_checkpoint(10)
    fault.at_step_start(20)  # the checkpoint mode does nothing at the start of a step
    monkeypatch.setenv("MHD_INJECT_FAULT", "0:3")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        Fault.for_rank(0).at_step_start(3)
    monkeypatch.setenv("MHD_INJECT_FAULT", "0:3:explode")
    with pytest.raises(ValueError, match="RANK:STEP"):
        Fault.for_rank(0)


def test_flat_buffer_round_trip_keeps_shapes_and_dtypes():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7, 8], dtype=torch.int64),
               torch.ones(1, 1, 2, dtype=torch.float64)]
    flat = flatten(tensors)
    assert flat.dtype == torch.float32 and flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 1, 1]
    targets = [torch.zeros_like(t) for t in tensors]
    unflatten_into(flat * 2, targets)
    assert targets[1].dtype == torch.int64 and targets[1].tolist() == [14, 16]
    assert targets[0].shape == (2, 3) and targets[2].dtype == torch.float64
    with pytest.raises(ValueError, match="10 values"):
        unflatten_into(flat, targets[:1])


def test_mhd_loss_assembles_the_paper_objective():
    torch.manual_seed(0)
    b, c = 5, 4
    pub_logits = [torch.randn(b, c, requires_grad=True) for _ in range(3)]
    pub_emb = torch.randn(b, 6, requires_grad=True)
    ce = torch.tensor(1.5)
    peer = losses.PeerOutputs(1, [torch.softmax(torch.randn(b, c), 1) for _ in range(3)],
                              losses.normalize_embedding(torch.randn(b, 6)))
    loss, terms, parts = losses.mhd_loss(ce, pub_logits, pub_emb, [peer], nu_aux=3.0,
                                         nu_emb=0.5)
    stacked = [peer.head_probs[h][None] for h in range(3)]
    aux = losses.aux_chain_losses(pub_logits, stacked, "confidence", False)
    want = ce + 0.5 * losses.embedding_loss(pub_emb, [peer.embedding]) \
        + 3.0 * (aux[0].loss + aux[1].loss)
    assert loss.item() == pytest.approx(want.item())
    assert set(terms) >= {"loss_ce", "loss_emb", "loss_aux1", "loss_aux2", "loss_total",
                          "self_target_aux1", "skipped_aux2"}
    assert set(parts) == {"ce", "emb", "aux1", "aux2"}
    assert sum(parts.values()).item() == pytest.approx(loss.item())
    # Without peers: no embedding term, the aux heads distill from the client itself.
    loss0, terms0, _ = losses.mhd_loss(ce, pub_logits, pub_emb, [], nu_aux=3.0, nu_emb=0.5)
    assert "loss_emb" not in terms0 and terms0["self_target_aux1"] == 1.0


def test_pool_targets_run_the_drawn_peer_models_on_the_public_batch():
    from mhd_hpc.pool import flatten_state
    from mhd_hpc.targets import PoolSettings, PoolTargets

    def build(arch):
        return build_model(arch, 10, 2, 1, 8)

    # One client of one rank; no transfer is posted at these steps, so nothing talks.
    world = SimpleNamespace(client=0, is_leader=True, local_size=1)
    settings = PoolSettings(capacity=2, every=50, transfer_steps=5, delta=1, seed=0,
                            timeout_s=5, send_embedding=True)
    source = PoolTargets(world, [[1], [0]], ["cnn_small", "cnn_small"], build, settings)
    peer = build("cnn_small")
    source.pool.insert(3, source_client=1, source_step=2, arch="cnn_small",
                       flat=flatten_state(peer))
    pub = SimpleNamespace(images=torch.randn(6, 1, 8, 8))
    out = source.targets(7, pub, None, None)
    assert len(out) == 1 and out[0].client == 1
    assert all(torch.allclose(p.sum(1), torch.ones(6)) for p in out[0].head_probs)
    assert torch.allclose(out[0].embedding.norm(dim=1), torch.ones(6), atol=1e-5)
    assert source.stats() == {"pool_entries": 1.0, "staleness": 5.0}
