"""tools/execute_book.py runs what the build would run and caches it as the build would."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # importable by name: its workers are processes
import execute_book  # noqa: E402


def test_it_runs_every_notebook_the_build_executes_and_no_exercise():
    toc = re.findall(r"file: (\S+)", (ROOT / "_toc.yml").read_text())
    executed = {f"{f}.ipynb" for f in toc if (ROOT / f"{f}.ipynb").exists()
                and not f.startswith("exercises/")}
    assert "exercises/*" in (ROOT / "_config.yml").read_text()  # the build skips them
    listed = {p.relative_to(ROOT).as_posix() for p in execute_book.notebooks()}
    assert listed == executed


def test_a_failing_notebook_is_reported_and_not_cached(tmp_path, monkeypatch, capsys):
    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text("execute:\n  timeout: 60\n")
    bad = "for k in range(5):\n    print(f'sum {k}')\nassert 1 + 1 == 3, 'wrong sum'"
    for name, code in (("good", "x = 1 + 1"), ("bad", bad)):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, tmp_path / "book" / f"{name}.ipynb")
    monkeypatch.setattr(execute_book, "ROOT", tmp_path)
    monkeypatch.setattr(execute_book, "CACHE", tmp_path / "_build" / ".jupyter_cache")
    assert execute_book.main(["--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAILED book/bad\.ipynb after [\d.]+ s: AssertionError: wrong sum "
                     r"\(at: assert 1 \+ 1 == 3, 'wrong sum'\); "
                     r"it printed: sum 2 / sum 3 / sum 4$", out, re.M), out
    from jupyter_cache import get_cache

    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    cached = [Path(r.uri).name for r in cache.list_cache_records()]
    assert cached == ["good.ipynb"]
    assert execute_book.main(["--jobs", "1"]) == 1  # the good one is not run again
    assert "running 1 notebooks" in capsys.readouterr().out


def test_a_cell_past_the_timeout_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text("execute:\n  timeout: 2\n")
    nb = nbformat.v4.new_notebook()
    # the timeout's text previews this source: a line of it that says "Error" is no error
    nb.cells = [nbformat.v4.new_code_cell("import time\ntime.sleep(30)  # no ValueError")]
    nbformat.write(nb, tmp_path / "book" / "slow.ipynb")
    monkeypatch.setattr(execute_book, "ROOT", tmp_path)
    monkeypatch.setattr(execute_book, "CACHE", tmp_path / "_build" / ".jupyter_cache")
    assert execute_book.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAILED book/slow\.ipynb after [\d.]+ s: CellTimeoutError: A cell timed "
                     r"out .*2 seconds", out), out
