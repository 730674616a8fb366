"""mhd_hpc: decentralized learning by Multi-Headed Distillation on HPC clusters."""

__version__ = "0.1.0"
