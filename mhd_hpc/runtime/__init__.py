"""What every part runs on: devices and precision, named seeds, stop signals, flat tensors and
atomic file writes."""
