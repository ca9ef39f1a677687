"""The ```python blocks of the documentation pages run as written (```py blocks are shown only).

Each page's blocks continue one another, as in a notebook, in a namespace of their own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


GUIDES = sorted(p for p in DOCS.rglob("*.md") if _blocks(p))


def test_the_guides_have_code():
    assert len(GUIDES) >= 8


@pytest.mark.parametrize("path", GUIDES, ids=[str(p.relative_to(DOCS)) for p in GUIDES])
def test_guide_code_runs(path):
    namespace: dict = {}
    for code in _blocks(path):
        exec(compile(code, str(path), "exec"), namespace)
