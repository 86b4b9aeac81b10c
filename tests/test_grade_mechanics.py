"""The grader's mechanics, on a tiny course (fixture_course): fast, torch-light notebooks.

Each test grades a batch through the command line's ``main`` (in process, with the
fixture course in place of the shipped one) and reads the JSON report.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout

import pytest
from fixture_course import COURSE, ENV, NAME, STUB, cells, notebook

from transformer_book.grade import main


def grade_batch(*paths, timeout=None):
    """Grade ``paths`` (--jobs 2); the exit status and each notebook's JSON report by path."""
    out = io.StringIO()
    options = ["--json", "--jobs", "2", *(["--timeout", str(timeout)] if timeout else [])]
    with redirect_stdout(out):
        status = main([*map(str, paths), *options], course=COURSE, env=ENV)
    return status, {n["notebook"]: n for n in json.loads(out.getvalue())["notebooks"]}


def messages(notebook: dict) -> dict[str, str]:
    return {e["number"]: e["message"] for e in notebook["exercises"]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One batch of notebooks, each a case of the issue; graded once for the tests below."""
    d = tmp_path_factory.mktemp("batch")
    double_in_place = (  # forward is right; the check's backward pass then crashes
        "def double(x):\n    s = x.exp()\n    out = 2 * x + 0 * s\n    s.add_(1)\n    return out"
    )
    cases = {
        "complete": cells(),
        "crash_in_check": cells(double=double_in_place),
        # a scratch cell that calls a check with a right answer does not count
        "scratch": cells(solved=("double", "square"),
                         setup=cells()[0] + "\ncheck_add_one(lambda x: x + 1)"),
        # two check cells merged into one: both still run, as shipped
        "merged": cells(check_add_one=None,
                        check_double="check_add_one(add_one)\ncheck_double(double)"),
        # a check shadowed by the student's own function of the same name
        "shadowed": cells(solved=("add_one", "double"),
                          square=STUB.format(name="square")
                          + '\n\n\ndef check_square(f):\n    print("✓ passed")'),
        # the setup cell's imports lost: the shipped check cells import their checks
        "no_imports": cells(setup="x = 1"),
        "not_defined": cells(add_one=None),
        "all_removed": cells(check_add_one=None, check_double=None, check_square=None),
    }
    paths = {case: notebook(d / case / NAME, code) for case, code in cases.items()}
    paths["renamed"] = notebook(d / "renamed" / "homework.ipynb", cells())
    status, by_path = grade_batch(*paths.values())
    return status, {case: by_path[str(p)] for case, p in paths.items()}


def test_a_complete_notebook_and_a_renamed_one_score_full_marks(batch):
    status, results = batch
    assert status == 1  # the batch has failures
    for case in ("complete", "renamed", "no_imports"):
        assert (results[case]["passed"], results[case]["total"]) == (3, 3), results[case]


def test_a_crash_inside_the_checks_own_computation_is_the_checks_finding(batch):
    message = messages(batch[1]["crash_in_check"])["99.2"]
    assert message.startswith("checking your result raised RuntimeError"), message
    assert "in place" in message and "before checking" not in message


def test_only_the_shipped_check_cells_count(batch):
    results = batch[1]
    assert messages(results["scratch"])["99.1"].startswith("not done yet")
    assert results["scratch"]["passed"] == 2
    assert messages(results["shadowed"])["99.3"].startswith("not done yet")


def test_merged_check_cells_each_run_as_shipped(batch):
    merged = batch[1]["merged"]
    assert merged["passed"] == merged["total"] == 3
    edited = {e["number"]: e["edited"] for e in merged["exercises"]}
    assert edited == {"99.1": True, "99.2": True, "99.3": False}


def test_a_missing_definition_is_named(batch):
    message = messages(batch[1]["not_defined"])["99.1"]
    assert message.startswith("the check cell raised NameError: name 'add_one' is not defined")


def test_removed_check_cells_fail_and_the_total_stays(batch):
    removed = batch[1]["all_removed"]
    assert (removed["passed"], removed["total"]) == (0, 3)
    for number, message in messages(removed).items():
        assert message == f"the check cell for exercise {number} was removed."


# ----------------------------------------------------------------------------- fail fast


def test_a_hung_cell_or_a_dead_kernel_stops_only_its_notebook(tmp_path):
    cases = {
        "hang": cells(double="while True:\n    pass"),
        "exit": cells(square="import os\nos._exit(1)"),
        "segfault": cells(square="import ctypes\nctypes.string_at(0)"),
        "complete": cells(),
    }
    paths = {case: notebook(tmp_path / case / NAME, code) for case, code in cases.items()}
    timeout = 5
    start = time.monotonic()
    status, report = grade_batch(*paths.values(), timeout=timeout)
    elapsed = time.monotonic() - start
    assert status == 1
    results = {case: report[str(p)] for case, p in paths.items()}
    assert results["complete"]["passed"] == 3

    hang = messages(results["hang"])
    assert results["hang"]["passed"] == 1
    expected = f"not graded: cell 4 (your code before exercise 99.2) ran longer than {timeout} s."
    assert hang["99.2"] == hang["99.3"] == expected
    for case in ("exit", "segfault"):
        result = messages(results[case])
        assert results[case]["passed"] == 2
        assert result["99.3"].startswith(
            "not graded: the kernel died while running cell 6 (your code before exercise 99.3)"
        ), result
        assert results[case]["seconds"] < 15  # noticed within seconds, not at the time limit
    assert results["hang"]["seconds"] < timeout + 15
    assert elapsed < 60, elapsed
