"""``python tools/sweep.py``: the same command as ``mhd-sweep`` (installed with the package) and
``python -m mhd_hpc.sweep``, for a checkout used without ``pip install``. See
``mhd-sweep --help``, mhd_hpc/cli/sweep.py and mhd_hpc/sweep.py."""

from __future__ import annotations

import os
import sys

try:
    from mhd_hpc.cli.sweep import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
