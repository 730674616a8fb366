"""The models (mhd_hpc/models/): shapes, head layout, parameter counts, gradient flow, training."""

# Kept small and CPU-cheap: 32 px inputs with batch 2, no 224 px forward passes.

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mhd_hpc.models import (
    ARCHS,
    MultiHeadModel,
    build_backbone,
    build_model,
    native_embedding_dim,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_every_arch(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, aux_heads=2, in_channels=3, image_size=32)
    model.eval()
    with torch.no_grad():
        emb, logits = model(torch.randn(2, 3, 32, 32))
    assert isinstance(model, MultiHeadModel)
    assert model.arch == arch
    assert model.embedding_dim == native_embedding_dim(arch)
    assert emb.shape == (2, native_embedding_dim(arch))
    assert len(logits) == model.num_heads == 3
    assert all(lg.shape == (2, 10) for lg in logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_out_dim(arch: str) -> None:
    backbone = build_backbone(arch, in_channels=1, image_size=16)
    assert backbone.out_dim == native_embedding_dim(arch)
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 1, 16, 16)).shape == (2, backbone.out_dim)


def test_native_embedding_dims() -> None:
    assert [native_embedding_dim(a) for a in ARCHS] == [128, 64, 512, 512, 2048]


def test_head_names() -> None:
    assert build_model("cnn_small", 5, 0, 1, 8).head_names == ["main"]
    model = build_model("cnn_small", 5, 3, 1, 8)
    assert model.head_names == ["main", "aux1", "aux2", "aux3"]
    assert model.num_heads == 4
    assert model.num_classes == 5


def test_embedding_projection() -> None:
    model = build_model("resnet18", num_classes=7, aux_heads=1, image_size=32, embedding_dim=64)
    assert model.embedding_dim == 64
    assert isinstance(model.projection, nn.Linear)
    assert all(model.heads[n].in_features == 64 for n in model.head_names)
    model.eval()
    with torch.no_grad():
        emb, logits = model(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 64)
    assert all(lg.shape == (2, 7) for lg in logits)
    # Without a projection the embedding is the backbone feature itself.
    assert isinstance(build_model("cnn_small", 7, 1, 3, 32).projection, nn.Identity)


def test_heterogeneous_archs_share_embedding_shape() -> None:
    x = torch.randn(2, 3, 32, 32)
    shapes = []
    for arch in ("cnn_small", "resnet18"):
        model = build_model(arch, num_classes=10, aux_heads=1, image_size=32, embedding_dim=96).eval()
        with torch.no_grad():
            shapes.append(model(x)[0].shape)
    assert shapes == [torch.Size([2, 96])] * 2


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_resnet_param_counts_match_torchvision(arch: str, expected: int) -> None:
    # 0 aux heads + the main head = torchvision's single fc layer; ImageNet stem at 224.
    model = build_model(arch, num_classes=1000, aux_heads=0, in_channels=3, image_size=224)
    assert _n_params(model) == expected


def test_stem_depends_on_image_size() -> None:
    big = build_backbone("resnet18", 3, 224)
    small = build_backbone("resnet18", 3, 64)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    # The stem changes no parameter count except conv1's kernel.
    assert _n_params(big) - _n_params(small) == 64 * 3 * (49 - 9)


def test_gradient_flows_from_aux_head_into_backbone() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, aux_heads=2, image_size=32, embedding_dim=32)
    model.train()
    _, logits = model(torch.randn(2, 3, 32, 32))
    logits[model.head_names.index("aux2")].sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.projection.weight.grad.abs().sum() > 0
    assert model.heads["aux2"].weight.grad.abs().sum() > 0
    # Heads are independent: the other heads receive no gradient.
    assert model.heads["main"].weight.grad is None
    assert model.heads["aux1"].weight.grad is None


def test_cnn_small_on_8x8_single_channel() -> None:
    model = build_model("cnn_small", num_classes=10, aux_heads=1, in_channels=1, image_size=8)
    model.train()
    emb, logits = model(torch.randn(2, 1, 8, 8))
    assert emb.shape == (2, 128)
    assert [lg.shape for lg in logits] == [torch.Size([2, 10])] * 2


@pytest.mark.parametrize("size", [8, 12, 28, 64])
def test_cnn_small_image_sizes(size: int) -> None:
    model = build_model("cnn_small", num_classes=3, aux_heads=0, in_channels=4, image_size=size).eval()
    with torch.no_grad():
        emb, logits = model(torch.randn(2, 4, size, size))
    assert emb.shape == (2, 128) and logits[0].shape == (2, 3)


def test_cnn_small_sgd_reduces_loss() -> None:
    # Two classes that differ only in which half of the 8x8 image is bright.
    g = torch.Generator().manual_seed(0)
    n = 32
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :, :4] += 1.0
    x[y == 1, :, :, 4:] += 1.0
    torch.manual_seed(0)
    model = build_model("cnn_small", num_classes=2, aux_heads=1, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(15):
        _, logits = model(x)
        loss = F.cross_entropy(logits[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_arch_lists_valid_names() -> None:
    for fn in (
        lambda: build_model("vgg16", 10, 0),
        lambda: build_backbone("vgg16", 3, 32),
        lambda: native_embedding_dim("vgg16"),
    ):
        with pytest.raises(ValueError, match="vgg16") as info:
            fn()
        assert all(name in str(info.value) for name in ARCHS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aux_heads": -1}, "aux_heads"),
        ({"num_classes": 0}, "num_classes"),
        ({"embedding_dim": -5}, "embedding_dim"),
        ({"image_size": 4}, "image_size"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, int], match: str) -> None:
    args = {"arch": "cnn_small", "num_classes": 10, "aux_heads": 1, "in_channels": 1, "image_size": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_embedding_is_not_normalised() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_small", 3, 0, 1, 8, embedding_dim=16).eval()
    with torch.no_grad():
        emb, _ = model(5.0 * torch.randn(4, 1, 8, 8))
    assert not torch.allclose(emb.norm(dim=1), torch.ones(4))
