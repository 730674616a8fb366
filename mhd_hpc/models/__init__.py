"""Model zoo of mhd_hpc: backbones (small CNN, ResNet-18/34/50) and the multi-head wrapper.

Everything else in the framework builds models through :func:`build_model`, so the
architecture names in :data:`ARCHS` are the names accepted in job configs, besides import paths
``package.module:builder`` of a researcher's own backbone (:mod:`mhd_hpc.models.plugin`).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from mhd_hpc.models.cnn import SmallCNN, cnn_mnist, cnn_small
from mhd_hpc.models.multihead import MultiHeadModel, _check_int
from mhd_hpc.models.plugin import plugin_backbone
from mhd_hpc.models.resnet import SMALL_IMAGE_MAX, ResNet, resnet18, resnet34, resnet50
from mhd_hpc.runtime.plugins import is_import_path

__all__ = [
    "ARCHS",
    "MIN_IMAGE_SIZE",
    "SMALL_IMAGE_MAX",
    "MultiHeadModel",
    "ResNet",
    "SmallCNN",
    "build_backbone",
    "build_model",
    "native_embedding_dim",
]

ARCHS: tuple[str, ...] = ("cnn_small", "cnn_mnist", "resnet18", "resnet34", "resnet50")

#: Smallest supported image side. The CIFAR-style ResNet stem halves the resolution
#: three times (8 -> 1 at the last stage) and cnn_small pools once, so below 8 px
#: the last feature maps would be empty or degenerate.
MIN_IMAGE_SIZE = 8

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn_small": cnn_small,
    "cnn_mnist": cnn_mnist,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}

_NATIVE_DIMS: dict[str, int] = {"cnn_small": 128, "cnn_mnist": 64, "resnet18": 512,
                                "resnet34": 512, "resnet50": 2048}


def _check_arch(arch: str) -> None:
    if arch not in _BUILDERS and not is_import_path(arch):
        raise ValueError(f"unknown arch {arch!r}; valid names are: {', '.join(ARCHS)}")


def native_embedding_dim(arch: str) -> int:
    """Width of the backbone's pooled feature for built-in ``arch`` (without any projection);
    a plug-in's is known once it is built (``models.plugin.check_plugin_backbone``)."""
    _check_arch(arch)
    if arch not in _BUILDERS:
        raise ValueError(f"the embedding size of plug-in {arch!r} is known once it is built")
    return _NATIVE_DIMS[arch]


def build_backbone(arch: str, in_channels: int, image_size: int,
                   norm: str = "batch") -> nn.Module:
    """Build the feature extractor for ``arch``; it has ``out_dim`` and maps (B,C,H,W) -> (B,out_dim).

    ResNets use the CIFAR-style stem for ``image_size <= SMALL_IMAGE_MAX`` (64) and the
    ImageNet stem above. ``norm`` (``model.norm``): the built-ins' normalisation layers,
    'batch' or 'group' (:mod:`mhd_hpc.models.norms`). A plug-in ``package.module:builder`` is
    built by its builder, with its own layers.
    """
    _check_arch(arch)
    _check_int("in_channels", in_channels, 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an integer >= {MIN_IMAGE_SIZE} (smallest side the backbones support), "
            f"got {image_size!r}"
        )
    if is_import_path(arch):
        return plugin_backbone(arch, in_channels, image_size)
    backbone = _BUILDERS[arch](in_channels, image_size, norm=norm)
    assert backbone.out_dim == _NATIVE_DIMS[arch]  # keeps the table above honest
    return backbone


def build_model(
    arch: str,
    num_classes: int,
    aux_heads: int,
    in_channels: int = 3,
    image_size: int = 224,
    embedding_dim: int = 0,
    norm: str = "batch",
) -> MultiHeadModel:
    """Build a client model: backbone -> (projection if embedding_dim > 0) -> main + aux heads
    (``norm``: the built-in backbones' normalisation, ``model.norm``)."""
    _check_arch(arch)
    # Validate the head arguments before building a (possibly large) backbone.
    MultiHeadModel.check_heads(num_classes, aux_heads, embedding_dim)
    backbone = build_backbone(arch, in_channels, image_size, norm)
    return MultiHeadModel(backbone, arch, num_classes, aux_heads, embedding_dim)
