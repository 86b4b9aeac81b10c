"""The grader, end to end: it executes notebooks with pytest + nbval.

Grading every solutions/ notebook is also how the solutions are executed by nbval:
each must run top to bottom and pass every check. Grading every exercises/ notebook
proves that every stub fails its check with the stub's NotImplementedError.
"""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from transformer_book.grade import CHECK_CALL

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def grade(*args, cwd=ROOT):
    result = subprocess.run(
        [sys.executable, "-m", "transformer_book.grade", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result


@pytest.fixture(scope="module")
def solutions_report():
    result = grade(*SOLUTIONS, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def exercises_report():
    result = grade(*EXERCISES, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_every_solution_notebook_runs_and_passes_every_check(solutions_report):
    status, report = solutions_report
    failed = [(r["exercise"], r["message"]) for r in report["exercises"] if not r["passed"]]
    assert not failed
    assert status == 0
    assert report["passed"] == report["total"] >= 2 * len(SOLUTIONS)
    assert report["score"] == 1.0


def test_every_stub_fails_with_not_implemented(exercises_report):
    status, report = exercises_report
    assert status == 1
    assert report["passed"] == 0 and report["total"] >= 2 * len(EXERCISES)
    for record in report["exercises"]:
        assert not record["passed"]
        assert record["message"].startswith("not done yet"), record
        assert set(record) == {"notebook", "exercise", "check", "passed", "message"}


def test_exercise_and_solution_have_the_same_exercises(solutions_report, exercises_report):
    names = [r["exercise"] for r in solutions_report[1]["exercises"]]
    assert names == [r["exercise"] for r in exercises_report[1]["exercises"]]
    assert all(n.startswith("Exercise ") for n in names)


def _first_exercise_done(tmp_path: Path) -> tuple[Path, int]:
    """An exercise notebook in which only the first solution region is filled in."""
    name = EXERCISES[-1].name
    solution = nbformat.read(ROOT / "solutions" / name, as_version=4)
    student = nbformat.read(ROOT / "exercises" / name, as_version=4)
    first = next(i for i, c in enumerate(solution.cells) if "### BEGIN SOLUTION" in c.source)
    student.cells[first].source = solution.cells[first].source
    path = tmp_path / name
    nbformat.write(student, path)
    total = sum(len(CHECK_CALL.findall(c.source)) for c in student.cells if c.cell_type == "code")
    return path, total


def test_partly_done_notebook_scores_partly_and_prints_one_line_per_exercise(tmp_path):
    path, total = _first_exercise_done(tmp_path)
    result = grade(path, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == total
    assert lines[0].startswith("PASS  Exercise ")
    assert all(line.startswith("FAIL  Exercise ") for line in lines[1:])
    assert f"Score: 1/{total}" in result.stdout


def test_a_crash_before_the_check_is_reported_as_that_crash(tmp_path):
    name = EXERCISES[0].name
    nb = nbformat.read(ROOT / "exercises" / name, as_version=4)
    stub = next(c for c in nb.cells if "raise NotImplementedError()" in c.source)
    stub.source = "def broken(:\n    pass\n"  # a syntax error: the function is never defined
    nbformat.write(nb, tmp_path / name)
    result = grade(tmp_path / name, "--json", cwd=tmp_path)
    assert result.returncode == 1
    first = json.loads(result.stdout)["exercises"][0]
    assert not first["passed"]
    assert first["message"].startswith("the check cell failed before checking: NameError")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.ipynb", "no such file"),
        (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "not a notebook"),
        (lambda d: (d / "bad.ipynb").write_text("{oops") and d / "bad.ipynb", "not a readable"),
        (lambda d: ROOT / "book" / sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))[0],
         "not an exercise notebook"),
    ],
    ids=["missing", "not-ipynb", "not-json", "no-checks"],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path, make, expected):
    result = grade(make(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert result.stdout == ""
