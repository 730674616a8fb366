"""ResNet-18/34/50 backbones (He et al., 2016) written from scratch.

The layout follows the torchvision reference implementation (ResNet v1.5: in a
Bottleneck the stride sits on the 3x3 convolution), so that parameter counts and
behaviour match the numbers people know. torchvision itself is deliberately not a
dependency. The classifier is *not* part of the backbone: the backbone returns the
globally average-pooled pre-logits feature, and the heads live in
:class:`mhd_hpc.models.multihead.MultiHeadModel`.

Two stems are provided:

* ImageNet stem (``image_size > 64``): 7x7 conv stride 2 + 3x3 max-pool stride 2.
* CIFAR stem (``image_size <= 64``): 3x3 conv stride 1, no max-pool. On small images
  the ImageNet stem would throw away 4x resolution before the first residual stage
  and leave a 1x1 (or empty) feature map at the end.
"""

from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import Tensor, nn

from mhd_hpc.models.norms import norm_layer

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "SMALL_IMAGE_MAX", "resnet18", "resnet34", "resnet50"]

#: Largest image side for which the CIFAR-style stem is used.
SMALL_IMAGE_MAX = 64


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(norm, planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, with a shortcut."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(norm, planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet feature extractor: stem, four residual stages, global average pooling.

    ``forward(x)`` returns the pooled feature of shape ``(B, out_dim)`` with
    ``out_dim = 512 * block.expansion``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_channels: int = 3,
        image_size: int = 224,
        zero_init_residual: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.norm = norm
        self.small_stem = image_size <= SMALL_IMAGE_MAX
        self.inplanes = 64
        if self.small_stem:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # Identity keeps the attribute (and forward) uniform across both stems.
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out mode as in torchvision: keeps the backward signal variance stable.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity
            # (Goyal et al., 2017); helps large-batch training.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(self.norm, planes * block.expansion),
            )
        modules: list[nn.Module] = [block(self.inplanes, planes, stride, downsample, self.norm)]
        self.inplanes = planes * block.expansion
        modules.extend(block(self.inplanes, planes, norm=self.norm) for _ in range(1, blocks))
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(in_channels: int = 3, image_size: int = 224, **kwargs) -> ResNet:
    """ResNet-18 backbone (BasicBlock, [2, 2, 2, 2]); 512-d output."""
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, image_size, **kwargs)


def resnet34(in_channels: int = 3, image_size: int = 224, **kwargs) -> ResNet:
    """ResNet-34 backbone (BasicBlock, [3, 4, 6, 3]); 512-d output."""
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels, image_size, **kwargs)


def resnet50(in_channels: int = 3, image_size: int = 224, **kwargs) -> ResNet:
    """ResNet-50 backbone (Bottleneck, [3, 4, 6, 3]); 2048-d output."""
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, image_size, **kwargs)
