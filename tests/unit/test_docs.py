"""The repository's documents stand alone: every relative link resolves, and no file cites
a document that is not in the repository."""
from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def tracked(*patterns: str) -> list[pathlib.Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines()]


def test_relative_links_in_markdown_resolve():
    broken = []
    for doc in tracked("*.md"):
        for target, _anchor in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_file_cites_the_old_design_document():
    citing = [str(path.relative_to(ROOT)) for path in tracked("*.py", "*.md", "*.pyx", "*.h",
                                                              "*.c", "*.in")
              if "DESIGN" + ".md" in path.read_text(errors="replace")]
    assert not citing, f"cite docs/design.md instead: {citing}"
