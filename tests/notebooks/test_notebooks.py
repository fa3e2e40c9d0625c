"""Every notebook in notebooks/ executes at its tiny size without a failing cell and draws its figures, and the
committed copy holds the full-size outputs (figures embedded, no errors) and the Claim / Verdict layout."""

from __future__ import annotations

import glob
import os

import nbformat
import pytest

from seqlab import notebooks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
IDS = [os.path.basename(p) for p in NOTEBOOKS]


def test_at_least_ten_notebooks():
    assert len(NOTEBOOKS) >= 10, IDS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    notebooks.check_layout(nb, path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code if c.source.strip()), "some code cells were never run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("ename")
    assert notebooks.figures(nb) >= 1
    assert "seqlab.sweep" in "".join(c.source for c in nb.cells) or "python -m" in "".join(c.source for c in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_executes_tiny(path, tmp_path):
    nb = notebooks.execute(path, tiny=True, runs_dir=str(tmp_path), timeout=300)
    assert notebooks.figures(nb) >= 1


def test_layout_errors_name_the_cell():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("1")])
    with pytest.raises(ValueError, match="first cell must be markdown headed '## Claim'"):
        notebooks.check_layout(nb, "x.ipynb")
    nb.cells[0] = nbformat.v4.new_markdown_cell("## Claim\ntext")
    with pytest.raises(ValueError, match="last cell must be markdown headed '## Verdict'"):
        notebooks.check_layout(nb, "x.ipynb")
    nb.cells.append(nbformat.v4.new_markdown_cell("## Verdict\nmatched"))
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        notebooks.check_layout(nb, "x.ipynb")
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.cells[1].source = "TINY = False"
    assert notebooks.check_layout(nb, "x.ipynb") == 1
    injected = notebooks.with_parameters(nb, {"TINY": True})
    assert injected.cells[2].source == "TINY = True" and len(nb.cells) == 3
