"""Multi-headed model of one MHD client (docs/design.md, "The method"; paper §3.2).

backbone -> [optional linear projection] -> embedding xi(x) -> heads

* The embedding is the pre-logits representation used by embedding distillation.
  When ``embedding_dim > 0`` a linear projection maps the backbone feature to that
  size, so that clients with different architectures (e.g. ResNet-18 with 512-d
  and ResNet-50 with 2048-d features) live in embedding spaces of the same size
  and can be compared. With ``embedding_dim == 0`` the backbone feature is used
  as is and ``embedding_dim`` becomes the backbone's native width.
* Heads are linear layers on the embedding: the main head (the only one trained
  on labels) and ``aux_heads`` auxiliary heads (aux_1 distills from peers' main
  heads, aux_k from peers' aux_{k-1}); which loss reaches which head is decided by
  the loss code, not here.

This module knows nothing about communication, normalisation for distillation or
losses: it returns the raw embedding and the logits of every head.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MultiHeadModel"]


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; aux_heads=True is almost certainly a config mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MultiHeadModel(nn.Module):
    """A backbone with an embedding and ``1 + aux_heads`` linear classification heads.

    Attributes:
        arch: name of the backbone architecture (informational; used in checkpoints/logs).
        num_classes: number of output classes of every head.
        embedding_dim: width of the embedding xi(x) fed to the heads.
        aux_heads: number of auxiliary heads.
        head_names: ``["main", "aux1", ..., "auxm"]``; the order of ``forward``'s logits.
        backbone: the feature extractor (has ``out_dim``).
        projection: ``nn.Linear`` to ``embedding_dim``, or ``nn.Identity`` when none.
        heads: ``nn.ModuleDict`` of the heads keyed by head name.
    """

    @staticmethod
    def check_heads(num_classes: object, aux_heads: object, embedding_dim: object) -> None:
        """The one rule for the heads' arguments: classes >= 1, aux heads >= 0, embedding >= 0
        (0: the backbone's own width)."""
        _check_int("num_classes", num_classes, 1)
        _check_int("aux_heads", aux_heads, 0)
        _check_int("embedding_dim", embedding_dim, 0)

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        num_classes: int,
        aux_heads: int,
        embedding_dim: int = 0,
    ) -> None:
        super().__init__()
        self.check_heads(num_classes, aux_heads, embedding_dim)
        native = getattr(backbone, "out_dim", None)
        if not isinstance(native, int) or native < 1:
            raise ValueError("backbone must have a positive integer attribute out_dim")

        self.arch = arch
        self.num_classes = num_classes
        self.aux_heads = aux_heads
        self.backbone = backbone
        # Projection whenever an embedding size is requested, even if it equals the
        # native width: every client of a heterogeneous job then has the same
        # structure (backbone -> learned linear map -> heads).
        self.projection: nn.Module = nn.Linear(native, embedding_dim) if embedding_dim > 0 else nn.Identity()
        self.embedding_dim: int = embedding_dim if embedding_dim > 0 else native
        self.head_names: list[str] = ["main"] + [f"aux{k}" for k in range(1, aux_heads + 1)]
        self.heads = nn.ModuleDict({name: nn.Linear(self.embedding_dim, num_classes) for name in self.head_names})

    @property
    def num_heads(self) -> int:
        """Number of heads: 1 (main) + aux_heads."""
        return len(self.head_names)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return ``(embedding (B, embedding_dim), [logits (B, num_classes) per head])``.

        The embedding is raw (not L2-normalised): the embedding-distillation loss
        normalises it itself, and linear probes want the raw feature.
        """
        embedding = self.projection(self.backbone(x))
        logits = [self.heads[name](embedding) for name in self.head_names]
        return embedding, logits

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, heads={self.head_names}"
