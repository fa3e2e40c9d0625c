"""Execute the paper-ablation notebooks (notebooks/*.ipynb), at full size or at the tests' tiny size.

    python -m seqlab.notebooks notebooks/zoology_recall.ipynb            # full size, outputs written in place
    python -m seqlab.notebooks --tiny notebooks/*.ipynb                  # tiny size, outputs discarded

Every notebook follows one layout, which `check_layout` enforces: the first cell is markdown headed ``## Claim``
(the paper's claim), the last is markdown headed ``## Verdict`` (matched / partly / did not match, and why), and
one code cell tagged ``parameters`` holds the sizes, with ``TINY = False``. A tiny run inserts ``TINY = True``
after that cell (papermill's convention) and sets ``$SEQLAB_RUNS``, where notebooks put the workdirs of the runs
they train, to a fresh directory. Notebooks run with notebooks/ as the working directory, as Jupyter opens them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import nbformat

PARAMETERS_TAG = "parameters"
RUNS_VARIABLE = "SEQLAB_RUNS"


def _heading(cell) -> str:
    lines = cell.source.strip().splitlines()
    return lines[0].strip() if lines else ""


def check_layout(nb: nbformat.NotebookNode, name: str) -> int:
    """Raise ValueError unless `nb` opens with ``## Claim``, ends with ``## Verdict`` and has one code cell tagged
    ``parameters`` that sets TINY; returns that cell's index."""
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown" or not _heading(cells[0]).startswith("## Claim"):
        raise ValueError(f"{name}: the first cell must be markdown headed '## Claim'")
    if cells[-1].cell_type != "markdown" or not _heading(cells[-1]).startswith("## Verdict"):
        raise ValueError(f"{name}: the last cell must be markdown headed '## Verdict'")
    tagged = [i for i, c in enumerate(cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1 or cells[tagged[0]].cell_type != "code" or "TINY" not in cells[tagged[0]].source:
        raise ValueError(f"{name}: needs exactly one code cell tagged '{PARAMETERS_TAG}' that sets TINY")
    return tagged[0]


def with_parameters(nb: nbformat.NotebookNode, parameters: dict[str, object]) -> nbformat.NotebookNode:
    """A copy of `nb` with a cell assigning `parameters` inserted after its parameters cell."""
    nb = nbformat.from_dict(nb)
    index = check_layout(nb, "notebook")
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def execute(path: str, *, tiny: bool, runs_dir: str | None = None, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell of the notebook at `path` (raises nbclient's CellExecutionError naming the failing cell) and
    return it with its outputs. `tiny` injects ``TINY = True``; `runs_dir` becomes ``$SEQLAB_RUNS``."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    check_layout(nb, path)
    if tiny:
        nb = with_parameters(nb, {"TINY": True})
    previous = os.environ.get(RUNS_VARIABLE)
    if runs_dir is not None:
        os.environ[RUNS_VARIABLE] = runs_dir
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
        client.execute()
    finally:
        if runs_dir is not None and previous is None:
            del os.environ[RUNS_VARIABLE]
        elif runs_dir is not None:
            os.environ[RUNS_VARIABLE] = previous
    return nb


def figures(nb: nbformat.NotebookNode) -> int:
    """How many PNG or SVG figures the notebook's outputs hold."""
    return sum(
        1
        for cell in nb.cells if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if {"image/png", "image/svg+xml"} & set(output.get("data", {}))
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="notebooks to execute")
    parser.add_argument("--tiny", action="store_true", help="the tests' size; outputs are not written back")
    parser.add_argument("--runs", default=None, help="$SEQLAB_RUNS for the notebooks (default: as set, or a temp dir)")
    args = parser.parse_args(argv)
    for path in args.paths:
        runs = args.runs or (tempfile.mkdtemp(prefix="seqlab-runs-") if args.tiny else None)
        start = time.perf_counter()
        nb = execute(path, tiny=args.tiny, runs_dir=runs)
        if not args.tiny:
            nbformat.write(nb, path)
        print(f"{path}: {len(nb.cells)} cells, {figures(nb)} figures, {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
