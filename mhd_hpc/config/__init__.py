"""One typed config tree for a job (``tree``), the facts its keys declare (``keys``), reading a
job (``parse``), the choices of enumerated keys (``choices``) and the config's own rules that
make a job impossible (``validation``; the domain's rules are ``mhd_hpc.job``'s). Every error
names the dotted key; validation runs identically on every rank before any communication.
``python -m mhd_hpc.config`` prints the option reference."""

from mhd_hpc.config.keys import (ADDED_KEYS, BOOKKEEPING_KEYS, LOCATION_KEYS, RESUMABLE_CHANGES,
                                 format_value, markdown_table, reference)
from mhd_hpc.config.parse import (config_from_dict, config_from_saved, load_config,
                                  parse_override)
from mhd_hpc.config.tree import JobConfig
from mhd_hpc.config.validation import check_world_size, num_classes, validate
from mhd_hpc.errors import ConfigError

__all__ = ["JobConfig", "ConfigError", "load_config", "config_from_dict", "config_from_saved",
           "parse_override", "format_value", "reference", "markdown_table", "validate",
           "num_classes", "check_world_size", "ADDED_KEYS", "RESUMABLE_CHANGES",
           "LOCATION_KEYS", "BOOKKEEPING_KEYS"]
