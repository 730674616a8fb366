"""Reading runs afterwards (or while they train): ``python -m mhd_hpc.report RUN_DIR ...``.
``summary`` defines the numbers of an evaluated step, ``cli`` prints them as tables, ``compare``
puts runs side by side, ``plots`` draws the figures. Nothing here writes into a run folder."""

from mhd_hpc.report.cli import main

__all__ = ["main"]
