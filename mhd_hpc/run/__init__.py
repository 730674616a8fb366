"""What a run leaves on disk: the run folder and its lock (``folder``), checkpoint files
(``checkpoint_files``), a client's saved and resumed state (``client_state``) and the metrics
file (``metrics_file``)."""
