"""Each client's key for the randomness of its private training: which samples join a step's
batch (Poisson sampling) and the gradient noise.

The guarantee of DP-SGD assumes that whoever sees a client's outputs does not know this
randomness: a peer who could draw the same noise could subtract it, and one who knew the batch
members would lose the subsampling's amplification. The job file and run.seed are shared by all
clients, so with ``privacy.randomness: secret`` the key comes from the operating system
(``secrets``), once per client, and is kept in ``RUN_DIR/privacy/client_NNN.key`` (mode 0600)
so that a resumed client draws the batches and noise it would have drawn. The key is never
sent: checkpoints carry model and optimizer state only. ``seeded`` derives it from run.seed
instead, for studies that must repeat exactly.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mhd_hpc.runtime.files import atomic_write_text
from mhd_hpc.runtime.seeds import DP, seed_of

__all__ = ["client_key", "key_path"]


def key_path(out_dir: str | os.PathLike, client: int) -> Path:
    return Path(out_dir) / "privacy" / f"client_{client:03d}.key"


def client_key(out_dir: str | os.PathLike, client: int, randomness: str,
               run_seed: int) -> tuple[int, str | None]:
    """(a 63-bit key, a note for the log or None). ``secret``: read the client's key file, or
    write a new key when there is none (a fresh client)."""
    if randomness == "seeded":
        return seed_of(run_seed, DP, client), None
    if randomness != "secret":
        raise ValueError(f"unknown privacy.randomness {randomness!r}")
    path = key_path(out_dir, client)
    if path.exists():
        text = path.read_text().strip()
        try:
            return int(text, 16), None
        except ValueError:
            raise ValueError(f"{path}: not a key written by mhd_hpc ({text[:20]!r}); remove "
                             "it to draw a new one (the client's noise and sampling change "
                             "from its next step)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.randbits(63)
    atomic_write_text(path, f"{key:016x}\n", chmod=0o600)
    return key, f"client {client}: new privacy key in {path} (never sent; keep it with the run)"
