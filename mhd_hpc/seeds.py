"""Every random choice of a run derives from (run.seed, purpose, ...): this module is the list of
purposes. Because nothing depends on the order in which ranks or steps happen, a resumed run takes
exactly the random choices an uninterrupted one takes, and every rank can recompute any other
rank's choices (the public batch order, the peer schedule) without asking."""

from __future__ import annotations

import numpy as np

__all__ = ["seed_of", "PRIVATE_ORDER", "PUBLIC_ORDER", "INIT", "SELECTION"]

PRIVATE_ORDER = 1  # (seed, 1, client): the client's private batch order
PUBLIC_ORDER = 2  # (seed, 2): the public batch order, the same for every client
INIT = 3  # (seed, 3, client or 0): weight initialisation (0 when methods share weights)
SELECTION = 4  # (seed, 4, client, step): random distillation-target selection


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, purpose, client, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))
