"""The console scripts (setup.cfg [options.entry_points]): every one is installed, and its
--help is a complete usage: full sentences, no reStructuredText, examples. Mistakes in the
key=value form are answered with the form that works, and a closed output pipe ends a command
quietly (mhd_hpc/errors.py command)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd=ROOT,
                          **kwargs)


def help_problems(name: str, text: str) -> list[str]:
    """What makes a --help incomplete: no usage line, reStructuredText markup, a description
    that stops mid-sentence, no examples."""
    problems = []
    if not text.startswith(f"usage: {name} "):
        problems.append("does not start with its usage line")
    if "``" in text or re.search(r":(func|mod|class|data):`", text):
        problems.append("shows reStructuredText markup")
    paragraphs = text.split("\n\n")
    description = paragraphs[1].strip() if len(paragraphs) > 1 else ""
    if not description.endswith((".", ":")) or description.startswith(("positional", "options")):
        problems.append(f"has no description in full sentences: {description[-60:]!r}")
    if "Example" not in text and "example" not in text:
        problems.append("shows no example")
    return problems


def test_every_user_command_is_a_console_script():
    assert set(console_scripts()) >= {"mhd-train", "mhd-report", "mhd-sweep", "mhd-config",
                                      "mhd-job", "mhd-make-shards", "mhd-verify-shards"}


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_every_console_script_prints_a_complete_help(name):
    exe = BIN / name
    assert exe.exists(), f"{exe} missing: pip install -e '.[mpi,test,dali]' --no-deps"
    res = run(str(exe), "--help")
    assert res.returncode == 0, res.stderr
    assert not help_problems(name, res.stdout), help_problems(name, res.stdout)
    if name in ("mhd-train", "mhd-job", "mhd-config"):
        assert "key=value" in res.stdout and "run.steps=60" in res.stdout


def test_the_help_check_can_fail():
    assert help_problems("x", "usage: x [-h]\n\nBuild a partitioned dataset (public") != []
    assert help_problems("x", "usage: x [-h]\n\nSee ``report.plots``.\n\nExamples: x") != []
    assert help_problems("x", "usage: x [-h]\n\nDoes it.\n\nExamples: x a") == []


def test_option_like_overrides_get_the_key_value_hint():
    res = run(str(BIN / "mhd-job"), "jobs/digits.yaml", "--run.steps=60", "--data.skew", "0")
    assert res.returncode == 2
    assert "key=value words without dashes: run.steps=60 data.skew=0" in res.stderr


def test_the_module_forms_print_usage():
    res = run(sys.executable, "-m", "mhd_hpc.config", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: mhd-config")
    res = run(sys.executable, "-m", "mhd_hpc.sweep")
    assert res.returncode == 2 and res.stderr.startswith("usage: mhd-sweep")
    assert "required: SWEEP.yaml" in res.stderr


@pytest.mark.parametrize("args", [["-m", "mhd_hpc.config"],
                                  ["-m", "mhd_hpc.job", "jobs/digits.yaml"]])
def test_a_closed_pipe_ends_a_command_quietly(args):
    """``mhd-config | head`` when head has gone: the reader's end is closed before the command
    writes, so every write fails (a pipe buffer cannot hide it)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert err.decode() == "" and proc.returncode == 141, err.decode()
