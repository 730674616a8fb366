"""``python -m mhd_hpc.report``: see :mod:`mhd_hpc.report.cli`."""

import sys

from mhd_hpc.report.cli import main

sys.exit(main())
