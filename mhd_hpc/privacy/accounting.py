"""How much privacy a client's training spends: (epsilon, delta) of DP-SGD with Poisson sampling,
from Opacus's RDP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019), and the noise that
spends a target over a number of steps.

Each client is its own mechanism over its own private data: its sampling rate is its batch size
over its private samples, so clients with less data spend more at the same noise. The plan for
every client is made once, by the root before training (:func:`plan`), from the first start's
settings, so that a resumed run keeps the noise it started with.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from mhd_hpc.errors import ConfigError

__all__ = ["ALPHAS", "ClientBudget", "epsilon", "calibrate", "steps_within", "plan",
           "accountant_import_error"]

#: RDP orders: Opacus's defaults (1.1 to 63) and larger ones, which the small epsilons of
#: large noise need (else Opacus warns that the best order is the largest it tried).
ALPHAS: list[float] = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                       + [80, 128, 256, 512, 1024])


def accountant_import_error() -> str | None:
    """Why Opacus's accountant cannot be imported (None: it can)."""
    try:
        from opacus.accountants import RDPAccountant  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order of :data:`ALPHAS` (Opacus's analysis). Steps compose by
    adding RDP, so T steps cost T times this: epsilon at any step, for every client at every
    log row, is a cheap conversion, not a new analysis."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=ALPHAS))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon at ``delta`` after ``steps`` steps of the subsampled Gaussian mechanism (0 for
    no step): what Opacus's ``RDPAccountant`` gives for that history and :data:`ALPHAS`."""
    if steps <= 0:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = _rdp_per_step(float(noise_multiplier), float(sample_rate)) * int(steps)
    with warnings.catch_warnings():  # the order range is ours (ALPHAS); the bound is valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose epsilon after ``steps`` steps is at most ``target_epsilon``
    (within 1% below it; Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          epsilon_tolerance=0.01 * target_epsilon,
                                          alphas=ALPHAS))


def steps_within(target_epsilon: float, noise_multiplier: float, sample_rate: float,
                 delta: float, upto: int) -> int:
    """The most steps (at most ``upto``) whose epsilon stays within ``target_epsilon``
    (epsilon grows with the steps: a bisection)."""
    if epsilon(noise_multiplier, sample_rate, upto, delta) <= target_epsilon:
        return upto
    lo, hi = 0, upto  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(noise_multiplier, sample_rate, mid, delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class ClientBudget:
    """One client's DP-SGD settings and budget, the same on every rank."""

    client: int
    samples: int  # private samples N
    sample_rate: float  # q = data.batch_size / N: each sample joins a step's batch with this
    noise_multiplier: float  # sigma
    calibrated: bool  # sigma was chosen from privacy.target_epsilon
    delta: float
    target_epsilon: float  # 0: none
    private_steps: int  # steps that may use private data (all of run.steps without a target)

    def epsilon_at(self, step: int) -> float:
        """epsilon spent by the end of ``step`` (the private steps up to it)."""
        return epsilon(self.noise_multiplier, self.sample_rate,
                       min(step, self.private_steps), self.delta)

    def describe(self) -> str:
        how = ("calibrated to epsilon " f"{self.target_epsilon:g}" if self.calibrated
               else "privacy.noise_multiplier")
        budget = (f"; budget epsilon {self.target_epsilon:g}, spent after "
                  f"{self.private_steps} private steps" if self.target_epsilon else "")
        return (f"client {self.client}: sigma {self.noise_multiplier:.4g} ({how}), Poisson "
                f"sampling rate {self.sample_rate:.4g} ({self.samples} private samples){budget}")


def plan(samples: list[int], batch_size: int, steps: int, *, noise_multiplier: float,
         target_epsilon: float, delta: float,
         calibration_steps: int | None = None) -> list[ClientBudget]:
    """Every client's budget: ``samples`` private samples per client, ``batch_size`` the
    expected batch, ``steps`` the run's steps; a calibrated noise is chosen for
    ``calibration_steps`` (default ``steps``: a resumed run passes the steps it first started
    with, so that it keeps its noise). Raises ``ConfigError`` naming the key and the client
    whose data cannot be sampled or whose target cannot be met."""
    out = []
    for client, n in enumerate(samples):
        if n < batch_size:
            raise ConfigError("data.batch_size", f"client {client} has {n} private samples, "
                              f"fewer than the expected batch data.batch_size={batch_size}: "
                              "Poisson sampling needs a rate batch_size / samples below 1")
        if delta >= 1.0 / n:
            raise ConfigError("privacy.delta", f"privacy.delta={delta:g} is not below 1 / {n}, "
                              f"the private samples of client {client}: such a delta allows a "
                              "sample to leak outright")
        q = batch_size / n
        sigma = noise_multiplier
        if sigma == 0:
            try:
                sigma = calibrate(target_epsilon, delta, q, calibration_steps or steps)
            except ValueError as exc:
                raise ConfigError("privacy.target_epsilon", f"client {client}: no noise spends "
                                  f"privacy.target_epsilon={target_epsilon:g} over "
                                  f"{calibration_steps or steps} steps at sampling rate "
                                  f"{q:.4g} ({exc})") from None
        private_steps = (steps_within(target_epsilon, sigma, q, delta, steps)
                         if target_epsilon else steps)
        if private_steps == 0:
            raise ConfigError("privacy.target_epsilon", f"client {client}: one step at "
                              f"noise_multiplier {sigma:g} and sampling rate {q:.4g} already "
                              f"spends more than privacy.target_epsilon={target_epsilon:g}: "
                              "raise the noise or the target")
        out.append(ClientBudget(client, n, q, sigma, noise_multiplier == 0, delta,
                                target_epsilon, private_steps))
    return out
