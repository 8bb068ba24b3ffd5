"""README.md and docs/*.md stay true to the repository: every relative link and `#anchor` resolves, every command
shown names a module or file that exists (and flags its argument parser defines), the README stays short and
reaches every page, and every committed figure is shown on one.

Anchors follow GitHub's heading slugs: the rendered heading text lower-cased, every character but letters, digits,
'_', '-' and spaces dropped, spaces turned into '-', and a repeated slug suffixed -1, -2, … in order. Reads text
only: no module of the package is imported (no torch, no Axolotl).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MODULE_COMMAND = re.compile(r"python -m (axolotl_blob(?:\.\w+)+)([^\n`|&;#]*)")
BENCH_COMMAND = re.compile(r"python (bench/[\w/.-]+\.py)([^\n`|&;#]*)")
IMPORT = re.compile(r"from (axolotl_blob(?:\.\w+)*) import (\w+)")
DATA_TYPE = re.compile(r"type: (axolotl_blob(?:\.\w+)+)")
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:axolotl_blob|bench|tests|example_configs|docs)/[\w./-]*\.(?:py|yml|yaml|jsonl|json|md|png|toml))(?![\w.-])"
)
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def split_prose(text: str) -> tuple[str, str]:
    """(prose, code): the lines outside fenced code blocks, and those inside them."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return "\n".join(prose), "\n".join(code)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in split_prose(page.read_text(encoding="utf-8"))[0].splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """Link and image targets in a page's prose (not in code blocks or code spans)."""
    prose = CODE_SPAN.sub("code", split_prose(page.read_text(encoding="utf-8"))[0])
    return LINK.findall(prose)


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if ROOT not in resolved.parents and resolved != ROOT:
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(ROOT)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading '#{anchor}' in {resolved.relative_to(ROOT)}")
    return problems


def module_file(module: str) -> Path | None:
    """The source file of a dotted module of this repository, found on disk (nothing imported)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def missing_flags(flags: str, source: Path, package: Path) -> list[str]:
    """Flags of a shown command that no argument parser of its file (or, failing that, its package) defines."""
    text = source.read_text(encoding="utf-8")
    fallback = "\n".join(path.read_text(encoding="utf-8") for path in sorted(package.rglob("*.py")))
    return [flag for flag in FLAG.findall(flags) if f'"{flag}"' not in text and f'"{flag}"' not in fallback]


def broken_commands(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    problems = []
    for module, flags in MODULE_COMMAND.findall(text):
        source = module_file(module)
        if source is None:
            problems.append(f"python -m {module}: no module {module} in the repository")
        else:
            problems += [f"python -m {module} {flag}: no such flag" for flag in missing_flags(flags, source, ROOT / "axolotl_blob")]
    for script, flags in BENCH_COMMAND.findall(text):
        source = ROOT / script
        if not source.is_file():
            problems.append(f"python {script}: no such file")
        else:
            problems += [f"python {script} {flag}: no such flag" for flag in missing_flags(flags, source, ROOT / "bench")]
    for module, name in IMPORT.findall(text):
        source = module_file(module)
        if source is None:
            problems.append(f"from {module} import {name}: no module {module}")
        elif not re.search(rf"\b{name}\b", source.read_text(encoding="utf-8")):
            problems.append(f"from {module} import {name}: {source.relative_to(ROOT)} never names {name}")
    for module in DATA_TYPE.findall(text):
        if module_file(module) is None:
            problems.append(f"type: {module}: no module {module}")
    for path in REPO_PATH.findall(text):
        if not (ROOT / path).exists():
            problems.append(f"{path}: no such file")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_links_and_anchors_resolve(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken_links(page))


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_commands_name_what_exists(page):
    problems = broken_commands(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_readme_is_short_and_reaches_every_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    reached, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for target in links(page):
            path_part = target.partition("#")[0]
            if not path_part or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            resolved = (page.parent / path_part).resolve()
            if resolved.suffix == ".md" and resolved.is_file() and resolved not in reached:
                reached.add(resolved)
                todo.append(resolved)
    assert not set(PAGES) - reached, f"not reachable from README.md: {sorted(str(p) for p in set(PAGES) - reached)}"


def test_every_figure_is_shown():
    """The committed figures (docs/*.png, bench/results/*.png) each appear on some page."""
    shown = {(page.parent / target.partition("#")[0]).resolve() for page in PAGES for target in links(page)}
    figures = {*ROOT.glob("docs/*.png"), *ROOT.glob("bench/results/*.png")}
    assert not figures - shown, f"figures no page shows: {sorted(str(f.relative_to(ROOT)) for f in figures - shown)}"


def test_slug_rule():
    """GitHub's rule on the cases the pages use: code spans, punctuation, non-ASCII letters, repeats."""
    assert slug("`blob:` settings") == "blob-settings"
    assert slug("On Python 3.12") == "on-python-312"
    assert slug("The demo's data") == "the-demos-data"
    assert slug("The label-token likelihood: `multiple_choice:`") == "the-label-token-likelihood-multiple_choice"
    assert slug("σ and the [KL](kl.md)") == "σ-and-the-kl"


def test_repeated_headings_get_suffixes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Details\n\n```\n# not a heading\n```\n\n## Details\n\n### Details\n", encoding="utf-8")
    assert anchors(page) == {"details", "details-1", "details-2"}
