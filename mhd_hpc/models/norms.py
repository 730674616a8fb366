"""The normalisation layer of the built-in backbones (``model.norm``).

BatchNorm normalises with statistics over the batch: in training mode one sample's output
depends on every other sample of the pass. MHD forwards the private and public batches together,
so with BatchNorm a private sample shapes the outputs a client sends on public samples, outside
any per-sample bound on its influence. GroupNorm normalises each sample by its own statistics
(over groups of channels), which is what differentially private training needs
(``privacy.enabled``; docs/privacy.md) and what per-sample gradients by ``torch.func.vmap``
can compute.
"""

from __future__ import annotations

from torch import nn

from mhd_hpc.config.choices import NORMS

__all__ = ["NORMS", "norm_layer", "group_count", "batch_norm_modules"]


def group_count(channels: int) -> int:
    """Groups of GroupNorm for ``channels``: 4 channels per group, at most 32 groups (Wu & He's
    default for ResNets), the largest such count that divides ``channels``."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def norm_layer(norm: str, channels: int) -> nn.Module:
    """A 2-d normalisation layer of kind ``norm`` ('batch' | 'group') over ``channels``."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


def batch_norm_modules(module: nn.Module) -> list[str]:
    """Names of the modules that normalise over the batch (any BatchNorm, SyncBatchNorm)."""
    return [name or type(module).__name__ for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
