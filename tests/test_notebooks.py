"""Every notebook runs top to bottom (in its short form: PCJAX_NOTEBOOK_SMALL=1).

The notebooks are split over this file and `test_notebooks_second.py` (alternately, in name
order) so that the two pytest-xdist workers run them in parallel (`--dist loadfile` keeps a
file on one worker); `test_every_notebook_is_run` checks the split covers them all."""

from __future__ import annotations

import pytest
from conftest import ALL_NOTEBOOKS


@pytest.mark.parametrize("name", ALL_NOTEBOOKS[::2])
def test_notebook_runs(name, run_notebook):
    run_notebook(name)


def test_every_notebook_is_run():
    assert set(ALL_NOTEBOOKS[::2]) | set(ALL_NOTEBOOKS[1::2]) == set(ALL_NOTEBOOKS)
    assert len(ALL_NOTEBOOKS) >= 9  # the glob found the notebooks
