"""``python -m mhd_hpc.config [--markdown | JOB.yaml key=value ...]``: print the option reference
(as docs/options.md's Markdown table with ``--markdown``), or the resolved config of a job
checked by the config's own rules (``python -m mhd_hpc.job`` adds the domain's, as a job start
does)."""

from __future__ import annotations

import sys

from mhd_hpc.config import ConfigError, load_config, markdown_table, reference


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        for key, default, text in reference():
            print(f"{key:28s} {default:12s} {text}")
        return 0
    if args == ["--markdown"]:
        print(markdown_table())
        return 0
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
