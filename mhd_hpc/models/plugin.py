"""A backbone from a researcher's own module: ``clients.arch: package.module:builder``.

The contract (docs/plugins.md)::

    def builder(in_channels: int, image_size: int) -> tuple[torch.nn.Module, int]:
        ...  # a module mapping (B, in_channels, image_size, image_size) -> (B, embedding_dim)
        return backbone, embedding_dim

The heads stay the framework's: :class:`~mhd_hpc.models.multihead.MultiHeadModel` puts the
optional projection (``model.embedding_dim``) and the main and aux heads on the backbone, so a
plug-in takes part in every method, in pool mode and in checkpoints like a built-in backbone.
The builder is called once per client and rank (and once more when the job is checked), under
the rank's weight-initialisation seed; it must build the same architecture on every call.
"""

from __future__ import annotations

import torch
from torch import nn

from mhd_hpc.runtime.plugins import load_callable

__all__ = ["plugin_backbone", "check_plugin_backbone"]

CONTRACT = ("builder(in_channels, image_size) must return (torch.nn.Module, embedding_dim: "
            "int >= 1)")


def plugin_backbone(path: str, in_channels: int, image_size: int) -> nn.Module:
    """The backbone that the builder at ``path`` returns, with ``out_dim`` set to its embedding
    size. Raises ``ValueError`` (``PluginError`` for the import) saying what was wrong."""
    builder = load_callable(path)
    try:
        result = builder(in_channels, image_size)
    except Exception as exc:
        raise ValueError(f"{path}({in_channels}, {image_size}) raised {type(exc).__name__}: "
                         f"{exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"{path} returned {type(result).__name__}; {CONTRACT}")
    backbone, dim = result
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{path} returned a {type(backbone).__name__} as the backbone; "
                         f"{CONTRACT}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{path} returned embedding_dim {dim!r}; {CONTRACT}")
    declared = getattr(backbone, "out_dim", dim)
    if declared != dim:
        raise ValueError(f"{path}: the backbone's out_dim {declared!r} differs from the "
                         f"embedding_dim {dim} it returned")
    backbone.out_dim = dim  # what MultiHeadModel reads
    return backbone


def check_plugin_backbone(path: str, in_channels: int, image_size: int) -> int:
    """Build the plug-in once and run two images through it (eval mode, no gradient): the
    output must be (2, embedding_dim) floats. Returns the embedding size."""
    backbone = plugin_backbone(path, in_channels, image_size).eval()
    images = torch.zeros(2, in_channels, image_size, image_size)
    try:
        with torch.no_grad():
            out = backbone(images)
    except Exception as exc:
        raise ValueError(f"{path}: the backbone failed on a batch of shape "
                         f"{tuple(images.shape)}: {type(exc).__name__}: {exc}") from exc
    want = (2, backbone.out_dim)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want \
            or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{path}: the backbone maps a batch of shape {tuple(images.shape)} to "
                         f"{got}, expected a float tensor of shape {want} (batch, "
                         "embedding_dim)")
    return backbone.out_dim
