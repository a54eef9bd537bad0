"""The README stays true to the tree: every file it names exists, and no template field is left unfilled."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NAMED_PATH = re.compile(r"`((?:bench|tests|scenarios|testbed|channel|devices|server|monitoring)/[A-Za-z0-9_./-]+)`")
TEMPLATE_FIELD = re.compile(r"\s*\{[a-z_]+\}\s*")


def test_every_file_the_readme_names_exists() -> None:
    named = set(NAMED_PATH.findall(README))
    assert len(named) > 20, "the pattern no longer finds the README's paths"
    missing = sorted(path for path in named if not (ROOT / path.rstrip("/")).exists())
    assert not missing, f"the README names files that are not in the tree: {missing}"


def test_no_line_is_an_unfilled_template_field() -> None:
    """A figure pasted by a script that never filled it in (`{rows}` on a line of its own) is a number not measured."""
    unfilled = [(number, line) for number, line in enumerate(README.splitlines(), 1) if TEMPLATE_FIELD.fullmatch(line)]
    assert not unfilled, f"unfilled template fields in README.md: {unfilled}"
