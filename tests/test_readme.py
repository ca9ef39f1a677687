"""The README's API walkthrough runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import cheap_compiles


def test_readme_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "the README has no python example"
    namespace = {}  # the blocks continue one another, as in a notebook
    # The walkthrough is compile-bound (many small functions, each compiled once): XLA's cheaper
    # compiles take 36 s of CPU time instead of 46 s (measured); the checks are the same.
    with cheap_compiles():
        for code in blocks:
            exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    accuracy = float(re.search(r"train accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9
