"""The message codec (mhd_hpc/distributed/codec.py): payload round trip on tensors, top-k densification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhd_hpc.distributed.codec import MessageCodec, densify_topk


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


def test_densify_topk_keeps_argmax_and_sums_to_one():
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.06]], dtype=torch.float16)
    idx = torch.tensor([[2, 0], [1, 4]])
    dense = densify_topk(probs, idx, 5)
    assert dense.shape == (2, 5) and dense.dtype == torch.float32
    assert torch.allclose(dense.sum(dim=1), torch.ones(2), atol=1e-3)
    assert dense.argmax(dim=1).tolist() == [2, 1]
    assert torch.allclose(dense.amax(dim=1), probs.float().amax(dim=1))
    assert torch.allclose(dense[0], torch.tensor([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]),
                          atol=1e-3)
    full = densify_topk(torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([[2, 0, 1]]), 3)
    assert torch.allclose(full, torch.tensor([[0.7, 0.2, 0.1]]))


def test_embedding_only_message_and_the_top_k_bound():
    """A job with one aux head sends the main head; with none, only the embedding (the last
    head is nobody's target, so it never travels): a message of 0 heads is valid."""
    from mhd_hpc.distributed.codec import top_k_problem

    emb = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    codec = MessageCodec(0, 10, 5, 3, 4)
    assert codec.payload_bytes == 5 * 4 * 2
    payload, finite = codec.encode_payload([], emb)
    heads, got = codec.decode_payload(payload)
    assert heads == [] and bool(finite) and torch.allclose(got, emb, atol=2e-3)
    # What one head costs: fp16 values and int16 indices of the top 3 for 5 samples.
    assert MessageCodec(1, 10, 5, 3, 4).payload_bytes - codec.payload_bytes == 5 * 3 * 4
    assert top_k_problem(3, 10) is None and top_k_problem(0, 10) is None
    assert "got 11" in top_k_problem(11, 10) and "got -1" in top_k_problem(-1, 10)
    with pytest.raises(ValueError, match="top_k must be in"):
        MessageCodec(2, 10, 5, 11, 4)
