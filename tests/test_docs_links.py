"""Every relative link between the repository's markdown files resolves, anchors included: the docs
move between feature pages and docs/results/, and a moved page must not leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKDOWN = sorted(p for p in REPO.rglob("*.md")
                  if not any(part.startswith(".") or part in ("build", "node_modules") for part in p.relative_to(REPO).parts))
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def outside_fences(path: Path):
    fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            yield number, line


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for _, line in outside_fences(path):
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower().replace("`", "")).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_the_docs_exist():
    names = {p.relative_to(REPO).as_posix() for p in MARKDOWN}
    assert {"README.md", "docs/results/README.md"} <= names


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for number, line in outside_fences(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            if REPO not in destination.parents:
                broken.append(f"line {number}: {target} points outside the repository")
            elif not destination.exists():
                broken.append(f"line {number}: {target}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in set(heading_anchors(destination)):
                broken.append(f"line {number}: {target}: no such heading")
    assert not broken, "\n".join(broken)
