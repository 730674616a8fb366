"""GPU-speed features that CPU CI can check (issue 11): the message codec on tensors, the
precision and layout choices, the shared-GPU rule, and under mpirun bf16 and fp16 training,
fp16 resume with its gradient scaler, and the non-finite check."""

import h5py
import numpy as np
import pytest
import torch

from mhd_hpc.run.checkpoint_files import ClientCheckpoints
from mhd_hpc.codec import MessageCodec
from mhd_hpc.devices import (Precision, clients_sharing_a_gpu, resolve_channels_last,
                             resolve_precision)
from mhd_hpc.run.metrics_file import read_metrics

from conftest import run_mpi, train_args

SMALL = ["clients.count=2", "run.steps=30", "run.eval_every=10", "run.log_every=10",
         "run.checkpoint_every=10", "data.labels_per_client=5", "data.public_batch_size=32"]


@pytest.mark.parametrize("top_k", [0, 3])
def test_codec_round_trip_on_tensors(top_k):
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(3 * torch.randn(6, 10, generator=g), 1) for _ in range(3)]
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    codec = MessageCodec(3, 10, 6, top_k, 4)
    payload, finite = codec.encode_payload(probs, emb)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes
    assert bool(finite)
    heads, got_emb = codec.decode_payload(payload.clone())
    for want, got in zip(probs, heads):
        if top_k == 0:
            assert torch.allclose(got, want, atol=2e-3)
        else:
            v, i = want.topk(top_k, dim=1)
            assert torch.allclose(got.gather(1, i), v, atol=2e-3)
            assert torch.allclose(got.sum(1), torch.ones(6), atol=1e-2)
    assert torch.allclose(got_emb, emb, atol=2e-3)
    # The GPU encodes all heads at once, the CPU head by head: the same bytes either way.
    (stacked, stacked_sum), (per_head, per_head_sum) = (codec._encode_stacked(probs),
                                                        codec._encode_per_head(probs))
    assert torch.equal(torch.cat(stacked), torch.cat(per_head))
    assert torch.allclose(stacked_sum, per_head_sum)
    for bad in (float("nan"), float("inf")):  # in the probabilities or the embedding
        broken = [p.clone() for p in probs]
        broken[1][2, 3] = bad
        assert not bool(codec.encode_payload(broken, emb)[1])
        broken_emb = emb.clone()
        broken_emb[5, 0] = -bad
        assert not bool(codec.encode_payload(probs, broken_emb)[1])
    header = np.zeros(codec.message_bytes, np.uint8)
    codec.write_header(header, 7, 2 ** 63 + 5, 3)
    assert codec.read_header(header) == (7, 2 ** 63 + 5, 3)


def test_precision_and_layout_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu)[0] == Precision("fp32")
    assert resolve_precision("bf16", cpu)[0].dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu)[0].scaled
    assert not resolve_channels_last("auto", cpu) and resolve_channels_last(True, cpu)
    with Precision("bf16").autocast(cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_shared_gpu_rule_is_a_function_of_the_layout():
    # 2 clients x 2 ranks on one node with 1 GPU: both clients share it.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 1) == [0, 1]
    # 4 GPUs: every rank has its own.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 4) == []
    # 2 GPUs: client 0 = local ranks 0, 1 -> GPUs 0, 1; client 1 = 2, 3 -> GPUs 0, 1: fine.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 2) == []
    # 3 GPUs: client 1 = local ranks 2, 3 -> GPUs 2, 0, client 2 = 4, 5 -> 1, 2.
    assert clients_sharing_a_gpu([[0, 1], [2, 3], [4, 5]], ["a"] * 6, range(6), 3) == []
    # Two nodes, one GPU each: a client spanning both nodes is fine, one within a node is not.
    hosts = ["a", "b", "a", "a"]
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], hosts, [0, 0, 1, 2], 1) == [1]
    assert clients_sharing_a_gpu([[0], [1]], ["a", "a"], [0, 1], 1) == []  # one rank each
    assert clients_sharing_a_gpu([[0, 1]], ["a", "a"], [0, 1], 0) == []  # no GPU at all


def beta_sh(run_dir):
    m = read_metrics(run_dir / "metrics.h5")
    return m["eval"]["beta_sh"][-1].mean(axis=0)  # per head, mean over clients


def test_bf16_trains_like_fp32_on_cpu(tmp_path, data_root):
    job = ["clients.count=2", "run.steps=150", "run.eval_every=150", "run.log_every=50",
           "run.checkpoint_every=150", "data.labels_per_client=5"]
    for precision in ("fp32", "bf16"):
        res = run_mpi(2, train_args(tmp_path / precision, data_root, *job,
                                    f"backend.precision={precision}"), timeout=300)
        assert res.returncode == 0, res.stderr
    assert "backend.precision=bf16" in res.stdout
    fp32, bf16 = beta_sh(tmp_path / "fp32"), beta_sh(tmp_path / "bf16")
    assert np.all(np.abs(fp32 - bf16) < 0.08), (fp32, bf16)
    assert bf16[-1] > 0.5  # it trained


def test_fp16_resume_restores_the_gradient_scaler(tmp_path, data_root):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    fp16 = [*SMALL, "backend.precision=fp16"]
    assert run_mpi(2, train_args(straight, data_root, *fp16), timeout=180).returncode == 0
    res = run_mpi(2, train_args(crashed, data_root, *fp16), env={"MHD_INJECT_FAULT": "1:25"},
                  timeout=180)
    assert res.returncode != 0
    state, _ = ClientCheckpoints(crashed, 0, 2).load(20)
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    res = run_mpi(2, train_args(crashed, data_root, *fp16), timeout=180)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    if torch.cuda.is_available():
        return  # cuDNN's autotuned kernels are not bit-deterministic: exactness is a CPU claim
    with h5py.File(straight / "metrics.h5") as a, h5py.File(crashed / "metrics.h5") as b:
        np.testing.assert_allclose(b["eval/per_class_acc"][()], a["eval/per_class_acc"][()],
                                   atol=1e-6)


def test_a_diverging_run_stops_naming_client_and_steps(tmp_path, data_root):
    res = run_mpi(2, train_args(tmp_path / "run", data_root, *SMALL, "optim.lr=1e12"),
                  timeout=180)
    assert res.returncode != 0
    assert "FloatingPointError" in res.stderr and "non-finite" in res.stderr
    assert "client" in res.stderr and ("between steps" in res.stderr or "at step" in res.stderr)
    assert not (tmp_path / "run" / "checkpoints" / "client_000" / "step_000000010.h5").exists()
