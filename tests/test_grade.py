"""The grader on the course's own notebooks, through its command line.

Grading every solutions/ notebook is also how the solutions are executed: each must run
top to bottom and pass every check. Grading every exercises/ notebook proves that every
stub fails its check with the stub's NotImplementedError. The other tests take one
chapter (the first with two exercises or more; nothing here names an exercise) and
grade the ways a submission goes wrong: deleted or edited check cells, two students'
notebooks with the same file name, a syntax error, a hung cell, a dead kernel.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from transformer_book.checks import REGISTRY
from transformer_book.checks.manifest import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import generate  # noqa: E402

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))
CHAPTER = next(name for name, cells in sorted(NOTEBOOKS.items()) if len(cells) >= 2)
NUMBERS = [e["number"] for cell in NOTEBOOKS[CHAPTER] for e in cell["exercises"]]
LINE = re.compile(r"^(?P<notebook>\S+\.ipynb): (?P<mark>PASS|FAIL)  (?P<label>Exercise [\d.]+: [^:]+)(: (?P<message>.*))?$")


def grade(*args, cwd=ROOT, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "transformer_book.grade", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def exercise_lines(stdout: str) -> list[re.Match]:
    return [m for m in map(LINE.match, stdout.splitlines()) if m]


# ----------------------------------------------------------------------------- the course


@pytest.fixture(scope="module")
def course_report():
    result = grade(*SOLUTIONS, *EXERCISES, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    return {Path(n["notebook"]).parent.name + "/" + Path(n["notebook"]).name: n
            for n in report["notebooks"]}


def test_every_solution_notebook_runs_and_passes_every_check(course_report):
    for path in SOLUTIONS:
        notebook = course_report[f"solutions/{path.name}"]
        failed = [(e["exercise"], e["message"]) for e in notebook["exercises"] if not e["passed"]]
        assert not failed, path.name
        assert notebook["passed"] == notebook["total"] >= 2


def test_every_stub_fails_with_not_implemented(course_report):
    for path in EXERCISES:
        notebook = course_report[f"exercises/{path.name}"]
        assert notebook["passed"] == 0 and notebook["total"] >= 2
        for record in notebook["exercises"]:
            assert record["message"].startswith("not done yet"), record
            assert not record["edited"]
            assert set(record) == {"notebook", "exercise", "number", "check", "passed",
                                   "message", "edited"}


def test_exercise_and_solution_have_the_shipped_exercises(course_report):
    for path in SOLUTIONS:
        shipped = [f"Exercise {e['number']}: {e['title']}"
                   for cell in NOTEBOOKS[path.name] for e in cell["exercises"]]
        for folder in ("solutions", "exercises"):
            labels = [e["exercise"] for e in course_report[f"{folder}/{path.name}"]["exercises"]]
            assert labels == shipped


def test_the_manifest_is_every_solution_check_cell_with_its_registered_check():
    assert sorted(NOTEBOOKS) == [p.name for p in SOLUTIONS]
    listed = [e for cells in NOTEBOOKS.values() for cell in cells for e in cell["exercises"]]
    assert sorted(e["check"] for e in listed) == sorted(REGISTRY)
    for e in listed:
        check = REGISTRY[e["check"]]
        assert (e["number"], e["title"], e["module"]) == (check.number, check.title,
                                                          check.func.__module__)
    for path in SOLUTIONS:
        code = [c.source.strip() for c in nbformat.read(path, as_version=4).cells
                if c.cell_type == "code"]
        assert all(cell["source"] in code for cell in NOTEBOOKS[path.name])


def test_the_manifest_goes_stale_when_a_check_cell_changes(tmp_path):
    (tmp_path / "transformer_book").symlink_to(ROOT / "transformer_book")
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions")
    before = generate.render_manifest(tmp_path)
    assert before == (ROOT / "transformer_book" / "checks" / "manifest.py").read_text()
    path = tmp_path / "solutions" / CHAPTER
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.source.strip() == NOTEBOOKS[CHAPTER][0]["source"])
    cell.source += "  # edited"
    nbformat.write(nb, path)
    assert generate.render_manifest(tmp_path) != before
    cell.source = f"{generate.BEGIN}\nx = 1\n{generate.END}\n{cell.source}"
    nbformat.write(nb, path)
    with pytest.raises(SystemExit, match="holds a solution region"):
        generate.render_manifest(tmp_path)  # the grader would run the solution as shipped


# ----------------------------------------------------------------------------- submissions


def _solved(upto: int | None = None):
    """The chapter's exercise notebook with the first ``upto`` solution cells filled in."""
    solution = nbformat.read(ROOT / "solutions" / CHAPTER, as_version=4)
    student = nbformat.read(ROOT / "exercises" / CHAPTER, as_version=4)
    regions = [i for i, c in enumerate(solution.cells) if generate.BEGIN in c.source]
    for i in regions[:upto]:
        student.cells[i].source = solution.cells[i].source
    return student, [solution.cells[i].source for i in regions], regions


def _check_cells(nb) -> list[int]:
    shipped = [cell["source"] for cell in NOTEBOOKS[CHAPTER]]
    return [i for i, c in enumerate(nb.cells) if c.source.strip() in shipped]


@pytest.fixture(scope="module")
def submissions(tmp_path_factory):
    """A small class: the issue's cases, two of them under the same file name."""
    root = tmp_path_factory.mktemp("class")
    notebooks = {}
    notebooks["A"] = _solved()[0]  # everything done
    notebooks["B"] = _solved(0)[0]  # nothing done: same file name as A
    deleted, _, _ = _solved(1)  # first exercise done, the other check cells deleted
    checks = _check_cells(deleted)
    deleted.cells = [c for i, c in enumerate(deleted.cells) if i not in checks[1:]]
    notebooks["deleted"] = deleted
    edited, sources, _ = _solved(0)  # nothing done, but the first check cell is handed a
    first = _check_cells(edited)[0]  # working definition of its own
    edited.cells[first].source = sources[0] + "\n\n\n" + edited.cells[first].source
    notebooks["edited"] = edited
    syntax, _, regions = _solved()
    syntax.cells[regions[0]].source = "def broken(:\n    pass\n"
    notebooks["syntax"] = syntax
    paths = {}
    for case, nb in notebooks.items():
        (root / case).mkdir()
        nbformat.write(nb, root / case / CHAPTER)
        paths[case] = f"{case}/{CHAPTER}"
    result = grade(*paths.values(), "--jobs", "2", "--csv", "grades.csv",
                   "--gradescope", "results.json", cwd=root)
    return root, paths, result


def test_each_line_names_its_notebook_and_results_stay_apart(submissions):
    root, paths, result = submissions
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert all(line.startswith(tuple(paths.values())) for line in lines[:-1]), lines
    assert lines[-1] == f"{len(paths)} notebooks graded, 1 with every exercise passed."
    assert "grading: 100%|" in result.stderr and f"{len(paths)}/{len(paths)}" in result.stderr
    marks = {}
    for m in exercise_lines(result.stdout):
        marks.setdefault(m["notebook"], []).append(m["mark"])
    assert marks[paths["A"]] == ["PASS"] * len(NUMBERS)
    assert marks[paths["B"]] == ["FAIL"] * len(NUMBERS)
    assert f"{paths['A']}: score {len(NUMBERS)}/{len(NUMBERS)}" in lines
    assert f"{paths['B']}: score 0/{len(NUMBERS)}" in lines


def _messages(result, path) -> list[str]:
    return [m["message"] for m in exercise_lines(result.stdout) if m["notebook"] == path]


def test_a_deleted_check_cell_is_a_failed_exercise_and_the_total_stays(submissions):
    _, paths, result = submissions
    assert f"{paths['deleted']}: score 1/{len(NUMBERS)}" in result.stdout
    removed = _messages(result, paths["deleted"])[1:]
    assert removed == [f"the check cell for exercise {n} was removed." for n in NUMBERS[1:]]


def test_an_edited_check_cell_runs_as_shipped_and_the_report_says_so(submissions):
    _, paths, result = submissions
    first = _messages(result, paths["edited"])[0]
    assert first.startswith("not done yet")
    assert first.endswith("[check cell edited: it was run as shipped]")


def test_a_syntax_error_is_named_as_such(submissions):
    _, paths, result = submissions
    first = _messages(result, paths["syntax"])[0]
    assert first.startswith(
        f"your code in the cell before exercise {NUMBERS[0]} raised SyntaxError: "
    ), first


def test_csv_has_a_row_per_notebook_and_a_column_per_exercise(submissions):
    root, paths, _ = submissions
    rows = list(csv.DictReader((root / "grades.csv").open()))
    assert list(rows[0]) == ["notebook", *NUMBERS, "score", "max_score"]
    by_path = {row["notebook"]: row for row in rows}
    assert set(by_path) == set(paths.values())
    total = str(len(NUMBERS))
    assert [by_path[paths["A"]][n] for n in NUMBERS] == ["1"] * len(NUMBERS)
    assert (by_path[paths["A"]]["score"], by_path[paths["A"]]["max_score"]) == (total, total)
    assert (by_path[paths["deleted"]]["score"], by_path[paths["deleted"]]["max_score"]) == (
        "1", total)


def test_gradescope_results_follow_gradescopes_format(submissions):
    root, paths, _ = submissions
    results = json.loads((root / "results.json").read_text())
    assert set(results) >= {"score", "execution_time", "output", "tests"}
    assert isinstance(results["execution_time"], int)
    assert len(results["tests"]) == len(paths) * len(NUMBERS)
    for test in results["tests"]:
        assert set(test) >= {"name", "number", "score", "max_score", "output", "visibility"}
        assert test["number"] in NUMBERS and test["max_score"] == 1.0
        assert test["name"].startswith(CHAPTER + ": Exercise ")
    # one chapter, submitted five times: it counts once, with its best notebook
    assert results["score"] == len(NUMBERS)


def test_a_dead_kernel_or_a_hung_cell_stops_only_its_notebook(tmp_path):
    exit_nb, _, regions = _solved(0)
    exit_nb.cells[regions[0]].source = "import os\nos._exit(1)"
    hang_nb, _, _ = _solved(0)
    hang_nb.cells[regions[0]].source = "while True:\n    pass"
    for case, nb in {"exit": exit_nb, "hang": hang_nb, "done": _solved()[0]}.items():
        (tmp_path / case).mkdir()
        nbformat.write(nb, tmp_path / case / CHAPTER)
    start = time.monotonic()
    result = grade("exit", "hang", "done", "--timeout", "10", cwd=tmp_path, timeout=120)
    assert time.monotonic() - start < 90
    assert result.returncode == 1, result.stderr
    died = _messages(result, f"exit/{CHAPTER}")
    assert len(died) == len(NUMBERS)
    assert all(m.startswith("not graded: the kernel died while running cell ") for m in died)
    hung = _messages(result, f"hang/{CHAPTER}")
    assert all(m.startswith("not graded: cell ") and m.endswith("ran longer than 10 s.")
               for m in hung), hung
    assert f"done/{CHAPTER}: score {len(NUMBERS)}/{len(NUMBERS)}" in result.stdout


# ----------------------------------------------------------------------------- bad input


def _no_checks(d: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('hello')")]
    nbformat.write(nb, d / "notes.ipynb")
    return d / "notes.ipynb"


@pytest.mark.parametrize(
    "make, options, expected",
    [
        (lambda d: d / "missing.ipynb", [], "no such file"),
        (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", [], "not a notebook"),
        (lambda d: (d / "bad.ipynb").write_text("{oops") and d / "bad.ipynb", [], "not a readable"),
        (_no_checks, [], "not an exercise notebook"),
        (lambda d: (d / "empty").mkdir() or d / "empty", [], "no exercise notebook"),
        (lambda d: ROOT / "exercises" / CHAPTER, ["--jobs", "0"], "not a positive number"),
        (lambda d: ROOT / "exercises" / CHAPTER, ["--timeout", "soon"], "not a number"),
        (lambda d: ROOT / "exercises" / CHAPTER, ["--csv", "."], "is a folder"),
        (lambda d: ROOT / "exercises" / CHAPTER, ["--report", "r.pdf"], "ending in .html or .md"),
    ],
    ids=["missing", "not-ipynb", "not-json", "no-checks", "empty-folder", "jobs", "timeout",
         "csv-folder", "report-format"],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path, make, options, expected):
    result = grade(make(tmp_path), *options, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert result.stdout == ""


def test_a_folder_skips_notebooks_that_are_not_exercises(tmp_path):
    _no_checks(tmp_path)
    nbformat.write(_solved(0)[0], tmp_path / CHAPTER)
    result = grade(tmp_path, "--json", cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [Path(n["notebook"]).name for n in report["notebooks"]] == [CHAPTER]
    assert "note: skipped" in result.stderr and "notes.ipynb" in result.stderr
