"""Strip outputs from the notebooks before committing (tests/test_notebooks.py checks they are stripped).

    python notebooks/strip_outputs.py            # every notebooks/*.ipynb, in place
    python notebooks/strip_outputs.py a.ipynb    # given files
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: str | Path) -> bool:
    """Clear outputs, execution counts and per-cell execution metadata; returns whether the file changed."""
    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


if __name__ == "__main__":
    files = sys.argv[1:] or sorted(str(p) for p in Path(__file__).resolve().parent.glob("*.ipynb"))
    for f in files:
        print(f"{'stripped' if strip(f) else 'clean   '} {f}")
