"""The commands a user runs besides training and reports, installed as console scripts
(setup.cfg): ``mhd-make-shards``, ``mhd-verify-shards``, ``mhd-sweep``. Each module is one
command: its arguments, its help and its exit codes; the work is done by the packages the
command belongs to (``data.build``, ``data.manifest``, ``sweep``). ``tools/*.py`` of the same
names are thin wrappers for the ``python tools/...`` form."""
