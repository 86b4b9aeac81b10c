"""Run a notebook's code cells in-process, to test the functions it defines.

``namespace("solutions/02_x.ipynb")`` executes every code cell except the check
cells (those that call a ``check_*`` function) and returns the resulting globals, so a
test can hand the notebook's own solution, or the generated stub, to a check.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHECK_CALL = re.compile(r"^\s*check_\w+\(", re.MULTILINE)


def namespace(relative_path: str) -> dict:
    matplotlib.use("Agg")
    nb = nbformat.read(ROOT / relative_path, as_version=4)
    scope: dict = {"__name__": "__notebook__"}
    for cell in nb.cells:
        if cell.cell_type != "code" or CHECK_CALL.search(cell.source):
            continue
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        try:
            exec(compile(source, f"{relative_path}", "exec"), scope)
        except NotImplementedError:
            pass  # a stub executed at top level; the function definitions are what we need
    return scope
