"""Every relative link in README.md and docs/*.md resolves (issue 16).

A relative link ``[text](path)`` or ``![alt](path)`` must name an existing file or folder,
relative to the document; a ``#fragment`` into a markdown file (or into the document itself)
must name one of its headings, slugged the way GitHub does (lower case, punctuation other than
``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` ... for repeated headings). Links inside
fenced code blocks and inline code spans are not links and are skipped; ``http(s)://`` and
``mailto:`` links are not checked (no network here).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lower case, ``[^\\w\\- ]`` dropped,
    spaces to hyphens (``"Teeth (`a.py`)"`` -> ``"teeth-apy"``)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (repeated headings get ``-1``, ``-2``...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(path.read_text()):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every relative link of a markdown file, outside code."""
    out = []
    for lineno, line in _prose_lines(path.read_text()):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            out.append((lineno, target))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Human-readable problems of one document (named relative to ``root``): missing files,
    unknown anchors."""
    problems = []
    for lineno, target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{lineno}: ({target})"
        if not dest.exists():
            problems.append(f"{where} -> {dest} does not exist")
            continue
        if fragment and dest.is_file() and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{where} -> no heading with anchor #{fragment} in {dest.name}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_resolves(doc: Path) -> None:
    problems = broken_links(doc)
    assert not problems, "broken links (fix the path or the heading):\n" + "\n".join(problems)


def test_the_readme_links_every_doc() -> None:
    """The README's documentation index names every file under docs/."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}: add them to its index"


def test_slug_and_link_checker_catch_what_they_should(tmp_path: Path) -> None:
    """The checker itself can fail: a missing file, an unknown anchor and a link in prose are
    reported; links in code are not."""
    heading = "Teeth at client level: canary clients (`experiments/audit_teeth.py --level client`)"
    assert slug(heading) == (
        "teeth-at-client-level-canary-clients-experimentsaudit_teethpy---level-client"
    )
    assert slug("FedDDPM, FedDDPM+ and FedDiffuse") == "fedddpm-fedddpm-and-feddiffuse"
    (tmp_path / "a.md").write_text("# Top\n## Top\n")
    doc = tmp_path / "b.md"
    doc.write_text(
        "[ok](a.md#top-1) [gone](missing.md) [bad](a.md#nowhere) [self](#here)\n"
        "# Here\n`[code](missing2.md)`\n```\n[fenced](missing3.md)\n```\n[web](https://x.org/y)\n"
    )
    problems = broken_links(doc, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#nowhere" in problems[1]
