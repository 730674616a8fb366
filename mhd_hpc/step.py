"""One training step of one client: the code path the trainer runs and the step benchmark times.

Forward over [private batch; public batch] in one pass (half the kernel launches, and BatchNorm
sees the public distribution the distillation losses are computed on), the supervised loss, the
distillation targets of this step (``targets``), the MHD objective (``losses.mhd_loss``),
backward, the method's gradient reduction (``strategies``) and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhd_hpc import losses
from mhd_hpc.schedules import distill_ramp
from mhd_hpc.seeds import SELECTION, seed_of

__all__ = ["DistillSettings", "TrainStep"]


@dataclass(frozen=True)
class DistillSettings:
    """The loss weights and target rules of a job (``distill.*``; nu_emb is 0 for baselines)."""

    nu_aux: float  # weight of each aux head's loss (losses.aux_head_weight)
    nu_emb: float
    selection: str = "confidence"
    skip_less_confident: bool = False
    warmup_steps: int = 0  # nu_aux and nu_emb ramp from 0 over these steps


class TrainStep:
    """Callable ``(step, images, labels, pub) -> terms`` for one client."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, strategy, source,
                 distill: DistillSettings, seed: int, client: int, device: torch.device):
        self.model, self.opt, self.strategy, self.source = model, opt, strategy, source
        self.distill, self.seed, self.client = distill, seed, client
        self.select_gen = torch.Generator(device=device)

    def __call__(self, step: int, images: torch.Tensor, labels: torch.Tensor, pub,
                 grad_norms: bool = False) -> dict:
        """One step; ``grad_norms`` also records each loss part's gradient norm on the
        backbone (``gradnorm_<part>``, diagnostics: one extra backward pass per part)."""
        b = images.shape[0]
        emb, logits = self.model(torch.cat([images, pub.images]))
        loss_ce = losses.main_ce_loss(logits[0][:b], labels)
        if not torch.isfinite(loss_ce):
            raise FloatingPointError(f"client {self.client}: non-finite loss at step {step} "
                                     "(training diverged: lower optim.lr or check the data)")
        pub_emb, pub_logits = emb[b:], [l[b:] for l in logits]
        self.source.begin_step(step, self.model)
        peers = self.source.targets(step, pub, pub_logits, pub_emb)
        self.select_gen.manual_seed(seed_of(self.seed, SELECTION, self.client, step))
        d = self.distill
        ramp = distill_ramp(step, d.warmup_steps)
        loss, terms, parts = losses.mhd_loss(
            loss_ce, pub_logits, pub_emb, peers, ramp * d.nu_aux, ramp * d.nu_emb, d.selection,
            d.skip_less_confident, self.select_gen)
        if grad_norms:
            terms.update(self._grad_norms(parts))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.reduce_gradients([p.grad for p in self.model.parameters()
                                        if p.grad is not None])
        self.opt.step()
        self.strategy.after_step(step, self.model)
        out = {n: float(v) for n, v in terms.items()}
        out.update(self.source.stats())
        return out

    def _grad_norms(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L2 norm of the gradient each weighted loss part alone puts on the backbone: which
        term drives the shared representation (what tells an aux-chain collapse early)."""
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        out = {}
        for name, part in parts.items():
            grads = torch.autograd.grad(part, backbone, retain_graph=True, allow_unused=True)
            out[f"gradnorm_{name}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        return out
