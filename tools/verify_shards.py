"""``python tools/verify_shards.py``: the same command as ``mhd-verify-shards`` (installed with
the package), for a checkout used without ``pip install``. See ``mhd-verify-shards --help`` and
mhd_hpc/cli/verify_shards.py."""

from __future__ import annotations

import os
import sys

try:
    from mhd_hpc.cli.verify_shards import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc.cli.verify_shards import main

if __name__ == "__main__":
    sys.exit(main())
