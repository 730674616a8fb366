"""The choices of every enumerated key, declared once here, on the ground floor.

The domain modules that implement a choice import its tuple from here (the config never
imports them), so a new method, loader or graph is one edit here and one where it is built;
``tests/test_config.py`` checks that every tuple is handled by its implementation.
"""

from __future__ import annotations

__all__ = ["METHODS", "BUILTIN_DATASETS", "DATASETS", "LOADERS", "LABEL_ASSIGNMENTS",
           "PARTITIONS", "PUBLIC_SOURCES", "AUX_WEIGHTINGS", "SELECTION_MODES", "TOPOLOGY_KINDS",
           "EXCHANGE_MODES", "LATE_PEERS", "SCHEDULES", "INTRA_BACKENDS", "DEVICES",
           "PRECISIONS", "NORMS", "PRIVACY_RANDOMNESS", "PRIVATE_METHODS"]

METHODS = ("mhd", "separate", "fedavg", "supervised", "fedmd")
#: Datasets built by the framework itself, with their number of classes (known before start,
#: so that the partition keys can be checked against them).
BUILTIN_DATASETS = {"digits": 10, "fashion_mnist": 10}
DATASETS = (*BUILTIN_DATASETS, "shards")
LOADERS = ("auto", "dali", "wds")
LABEL_ASSIGNMENTS = ("random", "even")
#: data.partition's built-in schemes (besides a plug-in's import path package.module:function).
PARTITIONS = ("primary", "dirichlet")
PUBLIC_SOURCES = ("split", "all")
AUX_WEIGHTINGS = ("chain", "per_head")
SELECTION_MODES = ("confidence", "random")
TOPOLOGY_KINDS = ("complete", "cycle", "islands", "none", "edges", "exponential", "random")
EXCHANGE_MODES = ("predictions", "pool")
LATE_PEERS = ("wait", "drop")
SCHEDULES = ("cosine", "constant")
INTRA_BACKENDS = ("auto", "horovod", "torch")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMS = ("batch", "group")
PRIVACY_RANDOMNESS = ("secret", "seeded")
#: The methods privacy.enabled supports: each client trains its own model on its private data
#: (the others share weights or gradients, or train on a consensus: not covered yet).
PRIVATE_METHODS = ("mhd", "separate")
