"""Differential privacy of each client's private data (``privacy.*``; docs/privacy.md).

- :mod:`~mhd_hpc.privacy.accounting`: epsilon of a client's steps and the noise for a target
  (Opacus's RDP accountant: a maintained library, not our own analysis);
- :mod:`~mhd_hpc.privacy.dp_sgd`: the private term's gradient, per sample clipped and noised;
- :mod:`~mhd_hpc.privacy.secret`: each client's key for the noise and the sampling.

The membership-inference audit of a run is a command: :mod:`mhd_hpc.cli.audit` (``mhd-audit``).
"""
