"""Every chapter notebook runs top to bottom without an error.

The book build (`jupyter-book build .`, the README's first command) already executes every
chapter, with errors fatal, and stores each executed notebook in its cache
(`_build/.jupyter_cache`), keyed by the notebook's code. Running the chapters a second time
here would double the longest part of CI, so a chapter passes on that evidence when the
cache holds a run of exactly its current code, made after the last change to the package
it imports, with no error output. Without such a record (no build yet, an edited chapter
or package) the chapter is executed here, in a fresh kernel.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def _newest_source_change() -> datetime:
    files = list((ROOT / "transformer_book").rglob("*.py")) + [ROOT / "pyproject.toml"]
    newest = max(f.stat().st_mtime for f in files)
    return datetime.fromtimestamp(newest, tz=timezone.utc).replace(tzinfo=None)


def cached_run(path: Path):
    """The build's executed copy of ``path``, if it is current; otherwise None."""
    if not CACHE.exists():
        return None
    from jupyter_cache import get_cache

    nb = nbformat.read(path, as_version=4)
    try:
        record = get_cache(str(CACHE)).match_cache_notebook(nb)
    except KeyError:
        return None
    # jupyter-cache stores naive UTC times; package files changed later make it stale
    newest = max(_newest_source_change(),
                 datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).replace(tzinfo=None))
    if record.created < newest:
        return None
    return get_cache(str(CACHE)).get_cache_bundle(record.pk).nb


def errors_in(nb) -> list[str]:
    return [
        f"cell {n}: {o.get('ename')}: {o.get('evalue')}"
        for n, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_runs_top_to_bottom(path):
    executed = cached_run(path)
    if executed is None:
        nb = nbformat.read(path, as_version=4)
        env = dict(os.environ, MPLBACKEND="Agg")
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute(env=env, cwd=str(path.parent))
        except CellExecutionError as error:
            pytest.fail(f"{path.name} failed: {str(error)[-3000:]}")
        executed = nb
    assert not errors_in(executed), errors_in(executed)
    code = [c for c in executed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"


def test_a_stale_or_failing_run_is_not_trusted(tmp_path):
    """Guard: an error output is found, and a chapter with no current record is re-run."""
    broken = nbformat.v4.new_notebook()
    broken.cells = [nbformat.v4.new_code_cell("1 / 0")]
    broken.cells[0].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError",
                                                      evalue="division by zero", traceback=[])]
    assert errors_in(broken) == ["cell 0: ZeroDivisionError: division by zero"]
    edited = tmp_path / CHAPTERS[0].name
    nb = nbformat.read(CHAPTERS[0], as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 'a cell the build never ran'"))
    nbformat.write(nb, edited)
    assert cached_run(edited) is None
