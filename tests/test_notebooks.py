"""Every notebook runs top to bottom (in its short form: PCJAX_NOTEBOOK_SMALL=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NEEDS_MNIST = {"precision_as_attention.ipynb"}  # the others fall back to the bundled digits


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, monkeypatch, request):
    if name in NEEDS_MNIST:
        monkeypatch.setenv("PCJAX_DATA_DIR", str(request.getfixturevalue("mnist_dir")))
    else:
        try:
            monkeypatch.setenv("PCJAX_DATA_DIR", str(request.getfixturevalue("mnist_dir")))
        except pytest.skip.Exception:
            monkeypatch.setenv("PCJAX_DATA_DIR", str(NOTEBOOKS / "no-data-here"))
    monkeypatch.setenv("PCJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
