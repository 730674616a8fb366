"""The documentation points at what the repository holds: the README's layout map names every
module (and only existing ones), every path cited in the README, docs/design.md and the
package's docstrings exists, and nothing points outside the repository."""

import re
from pathlib import Path

from conftest import ROOT

PATH = re.compile(r"(?<![\w/.])((?:mhd_hpc|tools|jobs|tests|docs)/[\w./-]*\w)")


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Layout")
    return readme[readme.index("```", start):readme.index("```", readme.index("```", start) + 3)]


def test_the_layout_map_names_every_module():
    block = layout_block()
    for path in sorted((ROOT / "mhd_hpc").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT / "mhd_hpc")
        assert path.name in block, f"README's layout map lacks {rel}"
    for name in re.findall(r"(?<![*\w])(\w+\.py)", block):
        assert list(ROOT.glob(f"**/{name}")), f"README's layout map names {name}, which is gone"


def cited_paths(text: str) -> set[str]:
    # Placeholders (EXP, NNN, a glob) name no file.
    return {m.rstrip(".") for m in PATH.findall(text)
            if not any(p in m for p in ("*", "NNN", "EXP", "SWEEP"))}


def test_every_cited_path_exists_and_nothing_points_outside():
    sources = [ROOT / "README.md", ROOT / "docs" / "design.md",
               *sorted((ROOT / "mhd_hpc").rglob("*.py"))]
    for source in sources:
        text = source.read_text()
        assert "../shared" not in text and "design §" not in text, source
        for cited in cited_paths(text):
            if any(cited.startswith(p) for p in ("mhd_hpc/", "tools/", "jobs/", "tests/", "docs/")) \
                    and Path(cited).suffix in (".py", ".yaml", ".sh", ".md", ".sbatch", ".png"):
                assert (ROOT / cited).exists(), f"{source.relative_to(ROOT)} cites {cited}"
