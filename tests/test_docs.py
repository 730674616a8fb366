"""The documentation points at what the repository holds: the README's layout map names every
module under its own package (and only existing ones), every path and relative link cited in
the README, CHANGELOG.md, docs/**/*.md and the package's docstrings exists, nothing points
outside the repository, and the README stays a short front door."""

import re
from pathlib import Path

from conftest import ROOT

PATH = re.compile(r"(?<![\w/.])((?:mhd_hpc|tools|jobs|tests|docs)/[\w./-]*\w)")
# The layout map: a package heading starts a line ("mhd_hpc/run/   what it holds"); its modules
# follow, indented, one per line ("  folder.py   lock, identity, ...").
HEADING = re.compile(r"^(mhd_hpc/(?:\w+/)*)(?:\s|$)")
ENTRY = re.compile(r"^\s+(\w+\.py)(?:\s|$)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 300


def layout_block(readme: str | None = None) -> str:
    readme = (ROOT / "README.md").read_text() if readme is None else readme
    start = readme.index("## Layout")
    first = readme.index("```", start)
    return readme[readme.index("\n", first) + 1:readme.index("```", first + 3)]


def layout_entries(block: str) -> list[str]:
    """Module paths relative to the repository root, as the map shows them: each indented
    ``name.py`` under the ``mhd_hpc/...`` heading above it."""
    entries, package = [], None
    for line in block.splitlines():
        if heading := HEADING.match(line):
            package = heading.group(1)
        elif not line.startswith((" ", "\t")):
            package = None  # jobs/, tools/, ...: not a package of modules
        elif (entry := ENTRY.match(line)) and package is not None:
            entries.append(package + entry.group(1))
    return entries


def layout_problems(block: str) -> list[str]:
    """What is wrong with a layout map: a module missing from its own package's entry, an entry
    naming a module that does not exist, or a module listed twice."""
    listed = layout_entries(block)
    problems = [f"lists {p} twice" for p in sorted({p for p in listed if listed.count(p) > 1})]
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "mhd_hpc").rglob("*.py")
               if p.name != "__init__.py"}
    problems += [f"lacks {m} (under its package {Path(m).parent}/)"
                 for m in sorted(modules - set(listed))]
    problems += [f"names {p}, which does not exist" for p in sorted(set(listed) - modules)]
    return problems


def test_the_layout_map_names_every_module_under_its_package():
    assert not layout_problems(layout_block()), "README's layout map " + "; ".join(
        layout_problems(layout_block()))


def test_the_layout_check_fails_on_a_broken_map():
    """The check above must be able to fail: a module left out, a module under another package
    (the same basename exists elsewhere, e.g. ``__main__.py``), a module that does not exist."""
    block = layout_block()
    lines = block.splitlines()
    line = next(i for i, text in enumerate(lines) if ENTRY.match(text)
                and text.split()[0] == "codec.py")
    without = "\n".join(lines[:line] + lines[line + 1:])
    assert "lacks mhd_hpc/distributed/codec.py" in " ".join(layout_problems(without))
    main = next(i for i, text in enumerate(lines) if text.startswith("mhd_hpc/report/"))
    entry = next(i for i in range(main + 1, len(lines)) if lines[i].split()[:1] == ["__main__.py"])
    moved = lines[:entry] + lines[entry + 1:]
    moved.insert(next(i for i, t in enumerate(moved) if t.startswith("mhd_hpc/method/")) + 1,
                 lines[entry])
    problems = " ".join(layout_problems("\n".join(moved)))
    assert "lacks mhd_hpc/report/__main__.py" in problems
    assert "names mhd_hpc/method/__main__.py" in problems
    assert "names mhd_hpc/run/gone.py" in " ".join(
        layout_problems(block + "\nmhd_hpc/run/\n  gone.py   nothing\n"))


def cited_paths(text: str) -> set[str]:
    # Placeholders (EXP, NNN, a glob) name no file.
    return {m.rstrip(".") for m in PATH.findall(text)
            if not any(p in m for p in ("*", "NNN", "EXP", "SWEEP"))}


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", markdown, flags=re.M)}


def test_every_cited_path_exists_and_nothing_points_outside():
    sources = [*documents(), *sorted((ROOT / "mhd_hpc").rglob("*.py"))]
    for source in sources:
        text = source.read_text()
        assert "../shared" not in text and "design §" not in text, source
        for cited in cited_paths(text):
            if any(cited.startswith(p) for p in ("mhd_hpc/", "tools/", "jobs/", "tests/", "docs/")) \
                    and Path(cited).suffix in (".py", ".yaml", ".sh", ".md", ".sbatch", ".png"):
                assert (ROOT / cited).exists(), f"{source.relative_to(ROOT)} cites {cited}"


def test_every_relative_link_in_the_documents_resolves_inside_the_repository():
    for source in documents():
        for target in LINK.findall(source.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not a file of the repository
            path, _, anchor = target.partition("#")
            where = (source.parent / path).resolve() if path else source
            name = source.relative_to(ROOT)
            assert where.is_relative_to(ROOT.resolve()), f"{name} links outside: {target}"
            assert where.exists(), f"{name} links to {target}, which does not exist"
            if anchor and where.suffix == ".md":
                assert anchor in anchors(where.read_text()), f"{name}: no heading for {target}"


def test_the_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    # History and provenance belong in CHANGELOG.md and the docs pages, not the front door.
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", readme), "a date in the README"
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", readme), \
        "a commit hash in the README"
    for phrase in ("this machine", "last session", "the issue"):
        assert phrase not in readme.lower(), phrase


def test_the_readme_indexes_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    index = readme[readme.index("## Documentation"):]
    for page in sorted((ROOT / "docs").rglob("*.md")):
        assert f"]({page.relative_to(ROOT)})" in index, f"README's index lacks {page}"
