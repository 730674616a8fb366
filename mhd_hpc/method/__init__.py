"""The method: MHD's losses, one training step, the baselines as strategies, where targets come
from (live peers or a checkpoint pool), the communication graph and the schedules."""
