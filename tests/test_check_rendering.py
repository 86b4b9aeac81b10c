"""What a student sees in Jupyter when a check fails: run in a real kernel, lines counted.

A failed check shows its message under a ✗ and the exercise's label, in a few lines,
not a traceback through the check machinery; when the student's own code crashed, the
student's frames are still shown.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from fixture_course import ENV, SETUP
from nbclient import NotebookClient
from test_grade import CHAPTER, NUMBERS, ROOT

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def shown(nb) -> list[list[str] | None]:
    """Execute ``nb``; for each code cell, the lines its error shows (None: no error)."""
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute(env=ENV)
    views = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        views.append(ANSI.sub("", "\n".join(errors[0].traceback)).splitlines() if errors else None)
    return views


@pytest.fixture(scope="module")
def fixture_views():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in [
        SETUP,
        "check_add_one(lambda x: x + 2)",  # a wrong answer
        "def double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\n\n"
        "check_double(double)",  # the stub
        "def square(x):\n    y = x.reshape(3, 1)\n    return y @ torch.ones(2, 2)\n\n\n"
        "check_square(square)",  # the student's code crashes
        "check_add_one(torch.zeros(3))",  # a tensor in place of the function
    ]]
    return shown(nb)


def test_a_wrong_answer_shows_its_message_in_two_lines(fixture_views):
    view = fixture_views[1]
    assert view == ["✗ Exercise 99.1: Add one", view[1]]
    assert view[1].startswith("add_one(x) is wrong (largest difference 1)")


def test_an_unfinished_stub_shows_two_lines(fixture_views):
    assert fixture_views[2] == [
        "✗ Exercise 99.2: Double",
        "not done yet: replace `raise NotImplementedError()` with your code, then run this "
        "cell again.",
    ]


def test_a_crash_in_the_students_code_shows_the_students_frames(fixture_views):
    view = fixture_views[3]
    assert view[0] == "✗ Exercise 99.3: Square"
    assert view[1].startswith("square(x) raised RuntimeError: mat1 and mat2 shapes cannot")
    text = "\n".join(view)
    assert "in square" in text and "return y @ torch.ones(2, 2)" in text  # their frame, line
    assert "_core.py" not in text and "grading_fixture" not in text  # not the checks'
    assert len(view) <= 15, text


def test_a_wrong_argument_shows_one_sentence(fixture_views):
    view = fixture_views[4]
    assert view[0] == "✗ Exercise 99.1: Add one"
    assert view[1].startswith("This check expects your function") and len(view) == 2


def test_a_stub_of_the_course_shows_two_lines():
    nb = nbformat.read(ROOT / "exercises" / CHAPTER, as_version=4)
    views = [v for v in shown(nb) if v is not None]
    first = views[0]
    assert len(first) == 2 and first[0].startswith(f"✗ Exercise {NUMBERS[0]}: ")
    assert first[1].startswith("not done yet")
