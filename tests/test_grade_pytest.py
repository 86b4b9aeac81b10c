"""Grading with pytest + nbval (transformer_book.pytest_plugin) gives the grader's verdicts.

Both tools plan a notebook and judge its run with the same code
(transformer_book.grading); these tests run both on the same notebooks and compare
them exercise by exercise: pass or fail, and the message. First on the tiny fixture
course (the ways a submission goes wrong, cheaply: a stub, a wrong answer, edited,
merged and deleted check cells, a syntax error, a hung cell, a dead kernel; the other
cases of test_grade_mechanics.py go through the same shared judgement), then on one chapter of the real course (the first with two exercises or
more, as in test_grade.py). The class report is tested on the fixture batch.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout
from pathlib import Path

import nbformat
import pytest
from fixture_course import ENV, NAME, cells, notebook

from transformer_book import class_report
from transformer_book.checks.manifest import NOTEBOOKS
from transformer_book.grade import main
from transformer_book.grading import Exercise, NotebookResult, Result

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = next(name for name, cells_ in sorted(NOTEBOOKS.items()) if len(cells_) >= 2)
TIMEOUT = 5
CONFTEST = """\
from fixture_course import COURSE

from transformer_book.pytest_plugin import COURSE as KEY


def pytest_configure(config):
    config.stash[KEY] = COURSE
"""


def run_pytest(folder: Path, *args, env=None, timeout=300):
    """pytest --nbval-lax in ``folder``: the process and {(notebook, item): failure or None}."""
    junit = folder / "junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval-lax",
         f"--nbval-cell-timeout={TIMEOUT}", f"--junitxml={junit}", *map(str, args)],
        cwd=folder, capture_output=True, text=True, timeout=timeout, env=env,
    )
    items = {}
    for case in ET.parse(junit).iter("testcase"):
        failure = case.find("failure")
        items[(case.get("classname"), case.get("name"))] = (
            None if failure is None else failure.get("message"))
    return result, items


def junit_class(path: str) -> str:
    """JUnit's class name of a notebook's items (its path, dots for slashes)."""
    return path.replace("/", ".")


def assert_same_verdicts(report: dict, items: dict) -> None:
    """Each exercise the grader judged is an item with the same verdict and message."""
    for graded in report["notebooks"]:
        for e in graded["exercises"]:
            key = (junit_class(graded["notebook"]), e["exercise"])
            assert key in items, (key, sorted(items))
            failure = items[key]
            assert (failure is None) == e["passed"], (key, failure, e)
            if failure is not None:
                assert failure.splitlines()[0] == e["message"], (key, failure, e["message"])
                assert ("[check cell edited: it was run as shipped]" in failure) == e["edited"]
    exercise_items = [k for k in items if k[1].startswith("Exercise ")]
    assert len(exercise_items) == sum(len(n["exercises"]) for n in report["notebooks"])


def assert_summary_counts(report: dict, stdout: str) -> None:
    for graded in report["notebooks"]:
        line = f"{graded['notebook']}: {graded['passed']}/{graded['total']} exercises passed"
        assert line in stdout.splitlines(), (line, stdout[-2000:])


# ----------------------------------------------------------------------------- fixture course


@pytest.fixture(scope="module")
def fixture_batch(tmp_path_factory):
    """The same notebooks graded by the grader (--json, --report) and by pytest."""
    d = tmp_path_factory.mktemp("agree")
    cases = {
        "complete": cells(),
        "stub": cells(solved=()),
        "wrong": cells(double="def double(x):\n    return 3 * x"),
        "edited": cells(solved=(), check_add_one="def add_one(x):\n    return x + 1\n\n\n"
                                                 "check_add_one(add_one)"),
        "merged": cells(check_add_one=None,
                        check_double="check_add_one(add_one)\ncheck_double(double)"),
        "deleted": cells(check_double=None),
        "syntax": cells(add_one="def add_one(x:\n    return x + 1"),
        "hang": cells(double="while True:\n    pass"),
        "dead": cells(square="import os\nos._exit(1)"),
    }
    paths = [notebook(d / case / NAME, code) for case, code in cases.items()]
    out = io.StringIO()
    from fixture_course import COURSE

    here = Path.cwd()
    os.chdir(d)  # the reports name the notebooks as pytest does: relative to the folder
    try:
        with redirect_stdout(out):
            status = main([*(p.relative_to(d).as_posix() for p in paths), "--json", "--jobs",
                           "2", "--timeout", str(TIMEOUT), "--report", "class.html"],
                          course=COURSE, env=ENV)
    finally:
        os.chdir(here)
    assert status == 1
    report = json.loads(out.getvalue())
    # pytest also gets what is not a notebook of the course
    (d / "conftest.py").write_text(CONFTEST)
    (d / "broken.ipynb").write_text("{oops")
    plain = nbformat.v4.new_notebook()
    plain.cells = [nbformat.v4.new_code_cell("x = 1 + 1")]
    nbformat.write(plain, d / "notes.ipynb")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), ENV["PYTHONPATH"]])}
    result, items = run_pytest(d, ".", env=env)
    return d, report, result, items


def test_pytest_and_the_grader_agree_exercise_by_exercise(fixture_batch):
    _, report, result, items = fixture_batch
    assert result.returncode == 1, result.stdout[-3000:]
    assert_same_verdicts(report, items)
    assert_summary_counts(report, result.stdout)
    passed = sum(n["passed"] for n in report["notebooks"])
    total = sum(n["total"] for n in report["notebooks"])
    assert f"{passed}/{total} exercises passed in {len(report['notebooks'])} notebooks" in (
        result.stdout)
    by_case = {Path(n["notebook"]).parent.name: n for n in report["notebooks"]}
    assert by_case["complete"]["passed"] == 3 and by_case["stub"]["passed"] == 0
    hung = [e["message"] for e in by_case["hang"]["exercises"] if not e["passed"]]
    assert hung and all(m.endswith(f"ran longer than {TIMEOUT} s.") for m in hung)
    dead = [e["message"] for e in by_case["dead"]["exercises"] if not e["passed"]]
    assert dead and all("the kernel died while running cell" in m for m in dead)


def test_items_are_named_after_exercises_and_failures_are_a_few_lines(fixture_batch):
    _, _, result, items = fixture_batch
    names = {name for (cls, name) in items if cls == junit_class(f"deleted/{NAME}")}
    assert names >= {"Exercise 99.1: Add one", "Exercise 99.2: Double", "Exercise 99.3: Square"}
    assert "Traceback" not in result.stdout and "Input:" not in result.stdout
    header = re.compile(r"^_+ (\S+)::(.+?) _+$")
    sections = re.split(r"^(?=_{3,} )", result.stdout.split("= FAILURES =", 1)[1], flags=re.M)
    for section in sections[1:]:
        lines = section.split("\n=", 1)[0].strip().splitlines()
        assert header.match(lines[0]), lines[0]
        assert len(lines) <= 4, section  # the header, the message, perhaps the edited note
    # the student's cells are items, quiet unless they raise
    assert items[(junit_class(f"complete/{NAME}"), "Cell 1")] is None
    raised = items[(junit_class(f"syntax/{NAME}"), "Cell 2")]
    assert raised.startswith("Cell 2 (your code before exercise 99.1) raised SyntaxError")
    stopped = items[(junit_class(f"hang/{NAME}"), "Cell 4")]
    assert stopped == f"Cell 4 (your code before exercise 99.2) ran longer than {TIMEOUT} s."


def test_a_deleted_check_cell_fails_under_pytest_as_under_the_grader(fixture_batch):
    _, _, _, items = fixture_batch
    assert items[(junit_class(f"deleted/{NAME}"), "Exercise 99.2: Double")] == (
        "the check cell for exercise 99.2 was removed.")
    assert items[(junit_class(f"deleted/{NAME}"), "Exercise 99.3: Square")] is None


def test_bad_input_is_one_sentence_never_a_traceback(fixture_batch):
    _, _, result, items = fixture_batch
    assert items[("broken.ipynb", "not a notebook")] == (
        "broken.ipynb: not a readable Jupyter notebook (NotJSONError).")
    # a notebook that is not an exercise notebook is nbval's, as without the plugin
    assert items[("notes.ipynb", "Cell 0")] is None
    assert "notes.ipynb is not an exercise notebook of this course: nbval ran it as a " \
           "plain notebook." in result.stdout
    assert "INTERNALERROR" not in result.stdout + result.stderr


def test_the_class_report_counts_every_exercise_and_embeds_its_chart(fixture_batch):
    d, report, _, _ = fixture_batch
    page = (d / "class.html").read_text()
    for number, title in (("99.1", "Add one"), ("99.2", "Double"), ("99.3", "Square")):
        results = [e for n in report["notebooks"] for e in n["exercises"]
                   if e["number"] == number]
        passed = sum(e["passed"] for e in results)
        row = (f"<tr><td>Exercise {number}: {title}</td><td class=n>{passed}/{len(results)}"
               f"</td><td class=n>{100 * passed / len(results):.0f}%</td></tr>")
        assert row in page
    # the stub's message, counted from the grader's own report
    stub = sum(e["message"].startswith("not done yet") for n in report["notebooks"]
               for e in n["exercises"] if e["number"] == "99.1")
    assert f"<li><b>{stub} ×</b> not done yet: replace" in page
    image = re.search(r'<img alt="[^"]+" src="data:image/png;base64,([^"]+)">', page)
    assert base64.b64decode(image.group(1)).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page  # one file, offline


def test_the_report_groups_messages_that_differ_only_in_numbers():
    exercises = [Exercise(f"check_{i}", "m", f"9.{i}", f"Part {i}") for i in (1, 2)]

    def graded(first: str | None, second: str | None) -> NotebookResult:
        results = [Result(e, m is None, m or "passed") for e, m in zip(exercises, (first, second))]
        return NotebookResult(Path("x.ipynb"), "09_x.ipynb", results, 1.0)

    results = [graded("f(x) is wrong (largest difference 0.5).", None),
               graded("f(x) is wrong (largest difference 2).", None),
               graded("not done yet.", "not done yet."),
               graded(None, None)]
    text = class_report.render(results, "markdown")
    assert "| Exercise 9.1: Part 1 | 1/4 | 25% |" in text
    assert "| Exercise 9.2: Part 2 | 3/4 | 75% |" in text
    assert "- 2 × f(x) is wrong (largest difference 0.5). (numbers vary)" in text
    assert "- 1 × not done yet." in text
    assert text.index("## Exercise 9.1") < text.index("## Exercise 9.2")
    assert "![Pass rate per exercise](data:image/png;base64," in text


# ----------------------------------------------------------------------------- the course


@pytest.fixture(scope="module")
def course_batch(tmp_path_factory):
    """One chapter: its solution, stub, a wrong answer, deleted and edited check cells,
    and its solution saved under another chapter's name; graded by both tools."""
    sys.path.insert(0, str(ROOT / "tools"))
    import grade_class_batch

    d = tmp_path_factory.mktemp("course")
    for kind in ("correct", "unfinished", "wrong", "deleted", "edited"):
        (d / kind).mkdir()
        nbformat.write(grade_class_batch.submission(CHAPTER, kind), d / kind / CHAPTER)
    other = next(name for name in sorted(NOTEBOOKS) if name != CHAPTER)
    (d / "other").mkdir()
    nbformat.write(grade_class_batch.submission(CHAPTER, "correct"), d / "other" / other)
    names = [f"{kind}/{CHAPTER}" for kind in ("correct", "unfinished", "wrong", "deleted",
                                               "edited")] + [f"other/{other}"]
    grader = subprocess.run(
        [sys.executable, "-m", "transformer_book.grade", *names, "--json", "--jobs", "2"],
        cwd=d, capture_output=True, text=True, timeout=600,
    )
    assert grader.returncode == 1, grader.stderr
    result, items = run_pytest(d, *names)
    return json.loads(grader.stdout), grader, result, items, other


def test_pytest_and_the_grader_agree_on_a_chapter_of_the_course(course_batch):
    report, _, result, items, _ = course_batch
    assert result.returncode == 1
    assert_same_verdicts(report, items)
    assert_summary_counts(report, result.stdout)
    by_case = {Path(n["notebook"]).parent.name: n for n in report["notebooks"]}
    assert by_case["correct"]["passed"] == by_case["correct"]["total"]
    for case in ("unfinished", "wrong", "deleted"):  # each fails, naming the exercise
        assert by_case[case]["passed"] < by_case[case]["total"]
        failed = [e["exercise"] for e in by_case[case]["exercises"] if not e["passed"]]
        assert all(f"{case}/{CHAPTER}::{label}" in result.stdout for label in failed)


def test_another_chapters_notebook_is_graded_as_its_checks_say_and_both_tools_say_so(
        course_batch):
    report, grader, result, _, other = course_batch
    sentence = (f"other/{other} was graded as {CHAPTER}, whose checks it calls, although "
                f"its file name is that of {other}.")
    assert f"note: {sentence}" in grader.stderr
    assert sentence in result.stdout
    graded = next(n for n in report["notebooks"] if n["notebook"] == f"other/{other}")
    assert graded["chapter"] == CHAPTER and graded["passed"] == graded["total"]
