"""What a run leaves on disk: the run folder and its lock (``folder``), checkpoint files
(``checkpoint_files``), a client's saved and resumed state (``client_state``), the metrics
file (``metrics_file``), a run's identity and fingerprint (``identity``) and how folders written
by older versions are recognised and read (``compat``)."""
