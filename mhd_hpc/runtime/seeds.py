"""Every random choice of a run derives from (run.seed, purpose, ...): this module is the list of
purposes. Because nothing depends on the order in which ranks or steps happen, a resumed run takes
exactly the random choices an uninterrupted one takes, and every rank can recompute any other
rank's choices (the public batch order, the peer schedule) without asking.

Two spellings exist, both kept because changing either would change every existing run:

* ``seed_of(seed, PURPOSE, ...)``: a SeedSequence mixed into one integer (torch generators);
* ``numpy.random.default_rng([seed, PURPOSE, ...])``: numpy generators keyed by the list.

Streams keyed without a purpose number (they predate this list) are written down here too, with
the key they use, so that the list is complete.
"""

from __future__ import annotations

import numpy as np

__all__ = ["seed_of", "DP", "DP_SAMPLING", "DP_NOISE", "PRIVATE_ORDER", "PUBLIC_ORDER", "INIT",
           "SELECTION", "POOL_DRAW", "POOL_SLOT", "POOL_REFRESH", "RANDOM_GRAPH", "AUGMENT",
           "WRITE_ORDER", "PARTITION"]

# -- seed_of(run.seed, PURPOSE, ...) -------------------------------------------------------------
PRIVATE_ORDER = 1  # (seed, 1, client): the client's private batch order
PUBLIC_ORDER = 2  # (seed, 2): the public batch order, the same for every client
INIT = 3  # (seed, 3, client or 0): weight initialisation (0 when methods share weights)
SELECTION = 4  # (seed, 4, client, step): random distillation-target selection

# -- default_rng([run.seed, PURPOSE, ...]) -------------------------------------------------------
POOL_DRAW = 5  # [seed, 5, client, step]: which pool entries give this step's targets
POOL_SLOT = 6  # [seed, 6, client, step]: which entry a new checkpoint replaces in a full pool
POOL_REFRESH = 7  # [seed, 7, client, step]: whose checkpoint a client receives at a refresh
# [partition seed, 8]: public set and dealing of data.partition=dirichlet, the public set of a
# plug-in partition (the paper's partition keeps its own stream, below)
PARTITION = 8
RANDOM_GRAPH = 0xD1CE  # [seed, 0xD1CE, draw, client]: in-neighbours of topology.kind=random
WRITE_ORDER = 0x5EED  # [seed, 0x5EED]: the shuffle of public/client samples when shards are built
# [batch-order seed, tag, part, AUGMENT]: a PIL-decoded training batch's random crops and flips
# (tag = the step; the batch-order seed is the stream's, from PRIVATE_ORDER)
AUGMENT = 0xA06
# privacy.enabled: [client key, 0xD9, 1]: the private stream's Poisson sampling; [client key,
# 0xD9, 2, step]: the step's gradient noise (the key: privacy.secret, or [run.seed, 0xD9, client])
DP = 0xD9
DP_SAMPLING, DP_NOISE = 1, 2

# -- streams keyed without a purpose number (kept as they were) -----------------------------------
# default_rng([order seed, epoch]): the permutation of one epoch of a split (data.batches)
# default_rng([run.seed, step, client]): the peers a client distills from at a step (topology)
# default_rng(partition seed): primary labels, public set and dealing (data.partition)
# default_rng([order seed, part, start step]): a DALI pipeline's augmentation seed


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, purpose, client, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))
