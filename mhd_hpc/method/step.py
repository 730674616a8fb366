"""One training step of one client: the code path the trainer runs and the step benchmark times.

Receives for this step's peers are posted first (``targets.prepare``), then the forward pass
over [private batch; public batch] in one pass (half the kernel launches, and BatchNorm sees the
public distribution the distillation losses are computed on), under the job's autocast
(``backend.precision``). The public outputs go to the peers and their targets come back
(``targets``), the MHD objective is assembled in fp32 (``losses.mhd_loss``), then backward (with
the gradient scaler for fp16), the method's gradient reduction (``strategies``) and the optimizer
step.

Nothing here waits for the device: the loss terms stay on it and are read at log steps, and the
check for a non-finite loss accumulates in a device flag that ``check_finite`` reads at log,
evaluation and checkpoint steps (the exchange checks the outputs it sends itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mhd_hpc.method import losses
from mhd_hpc.data.read.batches import Batch
from mhd_hpc.runtime.devices import Precision
from mhd_hpc.method.schedules import distill_ramp
from mhd_hpc.runtime.seeds import SELECTION, seed_of

if TYPE_CHECKING:
    from mhd_hpc.method.strategies import Strategy
    from mhd_hpc.method.targets import TargetSource
    from mhd_hpc.privacy.dp_sgd import PrivateGradient

__all__ = ["DistillSettings", "TrainStep"]


@dataclass(frozen=True)
class DistillSettings:
    """The loss weights and target rules of a job (``distill.*``; nu_emb is 0 for methods that
    exchange no targets)."""

    aux_head_weight: float  # weight of EACH aux head's loss (losses.aux_head_weight of nu_aux)
    nu_emb: float
    selection: str = "confidence"
    skip_less_confident: bool = False
    warmup_steps: int = 0  # both weights ramp from 0 over these steps


class TrainStep:
    """Callable ``(step, private, public) -> terms`` for one client: ``private`` and ``public``
    are batches on the device; terms are 0-dim tensors on the device, or floats."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, *,
                 strategy: Strategy, source: TargetSource, distill: DistillSettings, seed: int,
                 client: int, device: torch.device, precision: Precision = Precision("fp32"),
                 overlap: bool = False, private: PrivateGradient | None = None,
                 private_steps: int = 0):
        """``overlap`` (``exchange.overlap``): the public batch's forward pass first, its
        outputs sent at once, then the private batch's forward and backward while they travel,
        then the distillation terms' backward (see :meth:`_overlapped`). ``private``
        (``privacy.enabled``): the private term's gradient is DP-SGD's, for the first
        ``private_steps`` steps (the client's budget), none after (:meth:`_private`)."""
        self.overlap = overlap
        self.private, self.private_steps = private, private_steps
        self.model, self.opt, self.strategy, self.source = model, opt, strategy, source
        self.distill, self.seed, self.client = distill, seed, client
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type) if precision.scaled else None
        self.select_gen = torch.Generator(device=device)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._checked_upto = 0  # steps up to here had finite losses

    def __call__(self, step: int, private: Batch, public: Batch,
                 grad_norms: bool = False) -> dict:
        """One step; ``grad_norms`` also records each loss part's gradient norm on the
        backbone (``gradnorm_<part>``, diagnostics: one extra backward pass per part)."""
        self.source.prepare(step)
        if self.private is not None:
            return self._private(step, private, public)
        if not self.strategy.uses_public:
            return self._private_only(step, private, grad_norms)
        if self.overlap:
            return self._overlapped(step, private, public)
        b = private.images.shape[0]
        with self.precision.autocast(self.device):
            emb, logits = self.model(torch.cat([private.images, public.images]))
        emb, logits = emb.float(), [l.float() for l in logits]  # losses and targets in fp32
        trains_private = self.strategy.trains_private(step)
        loss_ce = losses.main_ce_loss(logits[0][:b], private.labels) if trains_private else None
        pub_emb, pub_logits = emb[b:], [l[b:] for l in logits]
        self.source.begin_step(step, self.model)
        peers = self.source.targets(step, public, pub_logits, pub_emb)
        loss, terms, parts = self._objective(step, loss_ce, pub_logits, pub_emb, peers)
        self._nonfinite.logical_or_(~torch.isfinite(terms["loss_total"]))
        if grad_norms:
            terms.update(self._grad_norms(parts))
        self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return self._update(step, terms)

    def _private_only(self, step: int, private: Batch, grad_norms: bool) -> dict:
        """A method that learns from its private labels alone (the paper's Separate): the main
        head's cross-entropy on the private batch, nothing else forwarded."""
        with self.precision.autocast(self.device):
            _, logits = self.model(private.images)
        loss = losses.main_ce_loss(logits[0].float(), private.labels)
        terms = {"loss_ce": loss.detach(), "loss_total": loss.detach()}
        self._nonfinite.logical_or_(~torch.isfinite(terms["loss_total"]))
        if grad_norms:
            terms.update(self._grad_norms({"ce": loss}))
        self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return self._update(step, terms)

    def _objective(self, step: int, supervised: torch.Tensor | None,
                   pub_logits: list[torch.Tensor], pub_emb: torch.Tensor, peers: list
                   ) -> tuple[torch.Tensor, dict, dict]:
        """The step's objective: ``losses.mhd_loss`` with the ramped weights and the step's
        selection seed, plus the method's own terms (FedMD's consensus)."""
        self.select_gen.manual_seed(seed_of(self.seed, SELECTION, self.client, step))
        d = self.distill
        ramp = distill_ramp(step, d.warmup_steps)
        loss, terms, parts = losses.mhd_loss(
            supervised, pub_logits, pub_emb, peers, nu_aux=ramp * d.aux_head_weight,
            nu_emb=ramp * d.nu_emb, selection=d.selection,
            skip_less_confident=d.skip_less_confident, generator=self.select_gen)
        extra = self.strategy.extra_loss(step, pub_logits)
        if extra is not None:
            for name, part in extra.parts.items():
                parts[name] = part
                loss = loss + part
            terms.update(extra.terms)
            terms["loss_total"] = loss.detach()
        return loss, terms, parts

    def _backward(self, loss: torch.Tensor) -> None:
        if loss.requires_grad:
            (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _overlapped(self, step: int, private: Batch, public: Batch) -> dict:
        """The step in the order that hides the exchange: forward the public batch and offer
        its outputs to the peers at once; forward and backward the private batch (its CE)
        while the messages travel; then the targets, the distillation terms and their
        backward. The two batches go through BatchNorm separately (its statistics differ from
        the joint pass's), the gradients are the same sum of terms."""
        pub_emb, pub_logits = self._offer_public(step, public)
        self.opt.zero_grad(set_to_none=True)
        loss_ce = None
        if self.strategy.trains_private(step):
            with self.precision.autocast(self.device):
                _, logits = self.model(private.images)
            loss_ce = losses.main_ce_loss(logits[0].float(), private.labels)
            self._backward(loss_ce)
        peers = self.source.targets(step, public, pub_logits, pub_emb)
        loss, terms, _ = self._objective(step, None, pub_logits, pub_emb, peers)
        self._backward(loss)
        if loss_ce is not None:
            terms["loss_ce"] = loss_ce.detach()
            loss = loss.detach() + loss_ce.detach()
        terms["loss_total"] = loss.detach()
        self._nonfinite.logical_or_(~torch.isfinite(terms["loss_total"]))
        return self._update(step, terms)

    def _private(self, step: int, private: Batch, public: Batch) -> dict:
        """``privacy.enabled``: the overlapped order (public forward and offer first), with the
        private term's gradient from DP-SGD (``privacy.dp_sgd``) written into ``.grad`` before
        the distillation terms' ordinary backward adds to it. After the client's budget
        (``private_steps``) the private term is left out. With GroupNorm (required) the
        separate passes compute what the joint one would."""
        public_terms = self.strategy.uses_public
        if public_terms:
            pub_emb, pub_logits = self._offer_public(step, public)
        self.opt.zero_grad(set_to_none=True)
        terms = {}
        if step <= self.private_steps and self.strategy.trains_private(step):
            terms = self.private(step, private.images, private.labels)
        loss = terms.get("loss_ce", torch.zeros((), device=self.device))
        if public_terms:
            peers = self.source.targets(step, public, pub_logits, pub_emb)
            distill, objective, _ = self._objective(step, None, pub_logits, pub_emb, peers)
            self._backward(distill)
            terms = {**objective, **terms}
            loss = loss.detach() + distill.detach()
        terms["loss_total"] = loss.detach()
        self._nonfinite.logical_or_(~torch.isfinite(terms["loss_total"]))
        return self._update(step, terms)

    def _offer_public(self, step: int, public: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The public batch's forward pass alone (losses and targets in fp32), its outputs
        offered to the peers at once."""
        with self.precision.autocast(self.device):
            pub_emb, pub_logits = self.model(public.images)
        pub_emb, pub_logits = pub_emb.float(), [l.float() for l in pub_logits]
        self.source.begin_step(step, self.model)
        self.source.offer(step, public, pub_logits, pub_emb)
        return pub_emb, pub_logits

    def _update(self, step: int, terms: dict) -> dict:
        """Combine the gradients (the method's rule) and take the optimizer step."""
        self.strategy.reduce_gradients([p.grad for p in self.model.parameters()
                                        if p.grad is not None])
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.strategy.after_step(step, self.model)
        terms.update(self.source.stats())
        return terms

    def check_finite(self, step: int) -> None:
        """Raise if any loss since the last check was NaN or infinite (reads the device flag:
        call it where the job is about to log, evaluate, checkpoint or send weights)."""
        if bool(self._nonfinite):
            raise FloatingPointError(
                f"client {self.client}: non-finite loss between steps {self._checked_upto + 1} "
                f"and {step} (training diverged: lower optim.lr, check the data, or use "
                "backend.precision=fp32)")
        self._checked_upto = step

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
