"""README.md and docs/: links that lead somewhere, words a user can read, the benchmark
table's markers where bench/bench.py writes, and every setting documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
START_MARK, END_MARK = "<!-- bench:start -->", "<!-- bench:end -->"

# [text](target), outside code spans and fenced blocks.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INTERNAL_WORDS = [
    re.compile(r"\bissues?\s*#?\s*\d+", re.I),
    re.compile(r"\bthe\s+owners?\b", re.I),
    re.compile(r"\bthe\s+lead\b", re.I),
    re.compile(r"\bsession\s+\d+\b", re.I),
    re.compile(r"\bdesign\s+card\b", re.I),
    re.compile(r"CONTRACT\.md"),
]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where links are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", prose(text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def test_the_pages_are_there():
    """The README's contents lead to every page in docs/, and to no page that is missing."""
    contents = (ROOT / "README.md").read_text().split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = {target.partition("#")[0] for target in LINK.findall(prose(contents)) if target.startswith("docs/")}
    assert listed == {str(page.relative_to(ROOT)) for page in PAGES if page.parent.name == "docs"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        relative = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            broken.append(f"{target}: no such file")
            continue
        if fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{fragment} in {relative}")
    assert not broken, broken


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages missing from README.md's contents: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_code_fences_are_closed(page):
    fences = [line for line in page.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{page.name} has an unclosed code block"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_internal_words(page):
    text = page.read_text()
    found = [match.group(0) for pattern in INTERNAL_WORDS for match in pattern.finditer(text)]
    assert not found, f"{page.name} speaks of {found}"


def test_every_setting_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = " ".join(line.split("|")[1] for line in text.splitlines() if line.startswith("| "))
    missing = [name for name in SETTINGS if not re.search(rf"\b{name}\b", rows)]
    assert not missing, f"settings with no row in docs/configuration.md: {missing}"


def test_the_benchmark_table_lives_between_its_markers_on_the_benchmark_page():
    page = (ROOT / "docs" / "benchmark.md").read_text()
    assert page.count(START_MARK) == 1 and page.count(END_MARK) == 1
    assert page.index(START_MARK) < page.index(END_MARK)
    assert START_MARK not in (ROOT / "README.md").read_text()


def test_bench_writes_its_table_into_the_benchmark_page(tmp_path):
    """bench.py's writer, run on a copy: only the block between the markers changes."""
    copy = tmp_path / "benchmark.md"
    shutil.copy(ROOT / "docs" / "benchmark.md", copy)
    script = (
        "import importlib.util, sys, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(ROOT / 'bench' / 'bench.py')!r})\n"
        "bench = sys.modules['bench'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(bench)\n"
        "print(bench.BENCHMARK_PAGE)\n"
        f"bench.write_table('| new | table |', pathlib.Path({str(copy)!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()) == ROOT / "docs" / "benchmark.md"
    before = (ROOT / "docs" / "benchmark.md").read_text()
    after = copy.read_text()
    head, tail = before.split(START_MARK)[0], before.split(END_MARK)[1]
    assert after == f"{head}{START_MARK}\n| new | table |\n{END_MARK}{tail}"
