"""The other half of the notebooks (see `test_notebooks.py`)."""

from __future__ import annotations

import pytest
from conftest import ALL_NOTEBOOKS


@pytest.mark.parametrize("name", ALL_NOTEBOOKS[1::2])
def test_notebook_runs(name, run_notebook):
    run_notebook(name)
