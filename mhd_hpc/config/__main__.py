"""``mhd-config`` (``python -m mhd_hpc.config``): print the option reference, as docs/options.md's
Markdown table with ``--markdown``, or the resolved config of a job checked by the config's own
rules (``mhd-job`` adds the domain's, as a job start does)."""

from __future__ import annotations

import argparse
import sys

from mhd_hpc.config import ConfigError, load_config, markdown_table, reference
from mhd_hpc.config.parse import OVERRIDES_HELP, JobArgumentParser
from mhd_hpc.errors import command

DESCRIPTION = """\
Without arguments, print every option of a job: its dotted key, its default and what it means.
With a job file (and overrides), print the job's resolved config after the config's own checks;
mhd-job also runs the checks that need the models, the graphs and the installation."""

EPILOG = """\
Examples:
  mhd-config                                        every option, default and meaning
  mhd-config --markdown                             the same as docs/options.md's table
  mhd-config jobs/digits.yaml run.steps=60 method=separate
                                                    the resolved config of a job"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobArgumentParser(prog="mhd-config", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--markdown", action="store_true",
                        help="print the option reference as a Markdown table")
    parser.add_argument("job", nargs="?", help="YAML job file (optional)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    args = parser.parse_intermixed_args(argv)
    if args.markdown and args.job:
        parser.error("--markdown prints the option reference: give no job file with it")
    if args.overrides and not args.job:
        parser.error("key=value overrides need a job file before them")
    return args


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown:
        print(markdown_table())
        return 0
    if not args.job:
        for key, default, text in reference():
            print(f"{key:28s} {default:12s} {text}")
        return 0
    try:
        cfg = load_config(args.job, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
