"""The README's test command is the one CI runs (.ci/run)."""

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```")
    test_command = [b.strip() for b in blocks if "python -m pytest" in b][0]
    assert test_command in (ROOT / ".ci" / "run").read_text()
