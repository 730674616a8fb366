"""The private term of a client under DP-SGD (Abadi et al. 2016): the gradient of the main
head's cross-entropy on the private batch, computed per sample, each sample's gradient scaled
to an L2 norm of at most C, summed, plus Gaussian noise of standard deviation sigma x C, divided
by the expected batch size (Poisson sampling: the batch size itself varies and is private).

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over a ``functional_call``
of the client's model), in chunks so that the memory is ``chunk`` gradients, not the batch's.
The parameters are those the cross-entropy reaches (backbone, projection, main head); the aux
heads' gradient from this term is zero whatever the data, so it needs no noise. The
distillation terms on public data add their ordinary gradient afterwards (docs/privacy.md:
why that is post-processing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from mhd_hpc.runtime.seeds import DP_NOISE, seed_of

__all__ = ["PrivateGradient", "private_parameter_names"]


def private_parameter_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters the main head's output depends on: all but the aux heads'."""
    aux = tuple(f"heads.{h}." for h in getattr(model, "head_names", ["main"])[1:])
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(aux)]


class PrivateGradient:
    """Writes the noisy clipped gradient of one step's private term into the parameters'
    ``.grad`` (:meth:`__call__`); the noise of a step is drawn from (the client's key, step),
    so a resumed client draws what it would have drawn."""

    def __init__(self, model: torch.nn.Module, *, clip_norm: float, noise_multiplier: float,
                 expected_batch: float, key: int, device: torch.device, chunk: int = 32):
        self.model, self.clip_norm, self.sigma = model, float(clip_norm), float(noise_multiplier)
        self.expected_batch, self.key, self.chunk = float(expected_batch), int(key), int(chunk)
        self.names = private_parameter_names(model)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.generator = torch.Generator(device=device)

        def sample_loss(p: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor):
            _, logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(logits[0].float(), y.unsqueeze(0))

        self._per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, None, 0, 0))

    def __call__(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Set ``.grad`` of the private parameters to this step's private gradient (the noise
        alone for an empty batch); returns the step's terms: the batch's mean cross-entropy
        (``loss_ce``, absent for an empty batch), the fraction of samples clipped
        (``dp_clipped``) and the batch size (``dp_batch``)."""
        detached = {n: p.detach() for n, p in zip(self.names, self.params)}
        buffers = dict(self.model.named_buffers())
        total = [torch.zeros_like(p) for p in self.params]
        losses, clipped = [], []
        for lo in range(0, images.shape[0], self.chunk):
            x, y = images[lo:lo + self.chunk], labels[lo:lo + self.chunk]
            grads, loss = self._per_sample(detached, buffers, x, y)
            g = [grads[n] for n in self.names]
            norms = torch.linalg.vector_norm(
                torch.stack([t.flatten(1).norm(dim=1) for t in g], dim=1), dim=1)
            scale = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
            for acc, t in zip(total, g):
                acc.add_(torch.einsum("b,b...->...", scale, t))
            losses.append(loss.detach())
            clipped.append(norms > self.clip_norm)
        self.generator.manual_seed(seed_of(self.key, DP_NOISE, step))
        for p, acc in zip(self.params, total):
            noise = torch.normal(0.0, self.sigma * self.clip_norm, size=acc.shape,
                                 generator=self.generator, device=acc.device, dtype=acc.dtype)
            p.grad = (acc + noise) / self.expected_batch
        n = int(images.shape[0])
        terms: dict = {"dp_batch": float(n)}
        if n:
            terms["loss_ce"] = torch.cat(losses).mean()
            terms["dp_clipped"] = torch.cat(clipped).float().mean()
        return terms
