"""Grade exercise notebooks with pytest and nbval.

    pytest --nbval-lax exercises/02_scaled_dot_product_attention.ipynb
    pytest --nbval-lax submissions/ --junitxml grades.xml

The package registers this module as a pytest plugin (a ``pytest11`` entry point), so
it is active wherever the package and nbval are installed. When nbval collects an
exercise notebook of the course (one the shipped manifest knows, recognised as the
grader recognises it), the notebook is held to the shipped exercises exactly as
``python -m transformer_book.grade`` holds it, through the same plan and the same
judgement (:mod:`transformer_book.grading`):

- each shipped check cell is an item named after its exercise (``Exercise 2.1:
  Numerically stable softmax``) and runs as shipped, even if the student edited it;
- a deleted check cell is a failing item that says it was removed;
- the student's other cells are items too, quiet unless they raise;
- a failure shows the grader's sentence, not a cell dump;
- a cell that runs longer than ``--nbval-cell-timeout`` or a kernel that dies stops the
  notebook: its remaining exercises fail with one sentence saying why;
- the terminal summary counts exercises: ``2/3 exercises passed``.

Any other notebook is left to nbval. A file that is not a readable notebook is one
failing item saying so.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from queue import Empty

import pytest

from .checks._core import GRADE_LOG
from .grading import (
    BadInput,
    CheckLog,
    Course,
    Exercise,
    Judge,
    Plan,
    Result,
    error_pair,
    kernel_did_not_start,
    plan,
    read_notebook,
    sentence,
    where,
)

COURSE = pytest.StashKey[Course]()  # tests put a course of their own here
NOTEBOOKS = pytest.StashKey[list]()  # the exercise notebooks collected
NOTES = pytest.StashKey[list]()  # sentences for the summary
QUIET = pytest.StashKey[set]()  # node ids of the student's cells


def _course(config) -> Course:
    if COURSE not in config.stash:
        config.stash[COURSE] = Course.shipped()
    return config.stash[COURSE]


def _nbval_file_class():
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:  # nbval not installed: nothing collects notebooks
        return None
    return IPyNbFile


@pytest.hookimpl(hookwrapper=True)
def pytest_collect_file(file_path, parent):
    outcome = yield
    nbval_file = _nbval_file_class()
    collectors = outcome.get_result() or []
    if nbval_file is None or not any(isinstance(c, nbval_file) for c in collectors):
        return
    config = parent.config
    path = Path(file_path)
    try:
        nb = read_notebook(path)
    except BadInput as error:
        message = str(error).replace(str(path), _relative(config, path))
        replacement = BadNotebook.from_parent(parent, path=path, message=message)
    else:
        try:
            planned = plan(path, _course(config), nb)
        except BadInput:
            config.stash.setdefault(NOTES, []).append(
                f"{_relative(config, path)} is not an exercise notebook of this course: "
                "nbval ran it as a plain notebook."
            )
            return
        replacement = exercise_notebook_class().from_parent(parent, path=path)
        replacement.prepare(planned)
        config.stash.setdefault(NOTEBOOKS, []).append(replacement)
        if planned.note:
            config.stash.setdefault(NOTES, []).append(planned.note)
    outcome.force_result([replacement if isinstance(c, nbval_file) else c for c in collectors])


def _relative(config, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(config.rootpath).resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- execution


def execute(kernel, source: str, timeout: float) -> tuple[str, tuple[str, str] | None]:
    """Run ``source`` in nbval's kernel: ("ok", error or None), ("timeout"|"dead", None).

    Unlike nbval's own loop, a dead kernel is noticed within a second, not at the time
    limit, and a hung cell stops the notebook (as in the grader).
    """
    kc, km = kernel.kc, kernel.km
    msg_id = kc.execute(source, store_history=True, allow_stdin=False, stop_on_error=False)
    deadline = time.monotonic() + timeout
    error = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        try:
            msg = kc.get_iopub_msg(timeout=min(1.0, remaining))
        except Empty:
            if not km.is_alive():
                return "dead", None
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "error" and error is None:
            error = error_pair(content)
        elif kind == "status" and content.get("execution_state") == "idle":
            break
    try:  # take the reply off the shell channel, so replies never pile up
        while kc.get_shell_msg(timeout=5)["parent_header"].get("msg_id") != msg_id:
            pass
    except Empty:
        pass
    return "ok", error


# ----------------------------------------------------------------------------- collectors


def _base(name: str):
    from nbval import plugin

    return getattr(plugin, name)


def _make_classes():
    """Subclasses of nbval's classes, made on first use: importing this module (which
    pytest does in every session) never needs nbval."""
    IPyNbFile, IPyNbCell = _base("IPyNbFile"), _base("IPyNbCell")  # noqa: N806

    class ExerciseNotebook(IPyNbFile):
        """An exercise notebook, held to the shipped exercises."""

        def prepare(self, planned: Plan) -> None:
            self.plan = planned
            self.judge = Judge(planned)
            self.done = 0  # steps executed so far
            self.stopped_at: int | None = None  # the step that timed out or killed the kernel
            self.errors: dict[int, tuple[str, str] | None] = {}
            self.reported: dict[str, Result] = {}
            self.workdir: str | None = None
            self.log: CheckLog | None = None

        def collect(self):
            import nbformat

            self.nb = read_notebook(self.path) if not hasattr(self, "nb") else self.nb
            quiet = self.config.stash.setdefault(QUIET, set())
            for index, step in enumerate(self.plan.steps):
                cell = nbformat.v4.new_code_cell(step.source)
                if step.check_cell is None:
                    item = StudentCell.from_parent(self, name=f"Cell {step.cell}",
                                                   cell_num=step.cell, cell=cell, options={})
                    item.index = index
                    quiet.add(item.nodeid)
                    yield item
                    continue
                for exercise in step.check_cell.exercises:
                    yield ExerciseItem.create(self, exercise, index, cell)
            for exercise in self.plan.exercises:
                if exercise.check in self.plan.removed:
                    yield ExerciseItem.create(self, exercise, None,
                                              nbformat.v4.new_code_cell(""))

        def setup(self):
            self.workdir = tempfile.mkdtemp(prefix="transformer_book_nbval_")
            self.log = CheckLog(Path(self.workdir) / "checks.jsonl")
            try:
                super().setup()
                status, error = execute(
                    self.kernel,
                    f"import os as _os\n_os.environ[{GRADE_LOG!r}] = {str(self.log.path)!r}"
                    "\ndel _os",
                    timeout=60,
                )
                if status != "ok" or error is not None:
                    raise RuntimeError(f"the grade log could not be set up ({status})")
            except Exception as error:  # noqa: BLE001 - any failure to start is one sentence
                self.judge.stopped = kernel_did_not_start(error)

        def teardown(self):
            try:
                if self.kernel is not None and self.kernel.is_alive():
                    self.kernel.stop()
            except Exception:  # noqa: BLE001, S110 - the kernel is gone either way
                pass
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

        def run_upto(self, index: int) -> None:
            """Execute the plan's steps up to ``index`` (those not run yet), judging each."""
            timeout = float(self.config.option.nbval_cell_timeout)
            while self.done <= index and not self.judge.stopped:
                step = self.plan.steps[self.done]
                status, error = execute(self.kernel, step.source, timeout)
                if status != "ok":
                    self.judge.stop(self.done, status, timeout)
                    self.stopped_at = self.done
                    try:
                        self.kernel.stop()
                    except Exception:  # noqa: BLE001, S110 - it may have died already
                        pass
                    return
                self.judge.step(self.done, error, self.log.new())
                self.errors[self.done] = error
                self.done += 1

    class _Item(_ItemBase, IPyNbCell):
        def reportinfo(self):
            return self.path, None, ""  # pytest then shows the node id as it is

        def repr_failure(self, excinfo, style=None):
            if isinstance(excinfo.value, Failed):
                return str(excinfo.value)
            error = excinfo.value
            return f"the transformer_book pytest plugin failed here ({type(error).__name__}: {error})."

    class StudentCell(_Item):
        """One of the student's own cells: quiet unless it raises."""

        index: int

        def setup(self):  # nbval's marks a cell after a time-out as xfail: not here
            pass

        def runtest(self):
            notebook = self.parent
            notebook.run_upto(self.index)
            stopped = notebook.judge.stopped
            if notebook.stopped_at == self.index:  # this cell hung or killed the kernel
                raise Failed(f"{stopped[0].upper()}{stopped[1:]}.")
            if self.index not in notebook.errors:  # the notebook stopped before this cell
                pytest.skip(f"not run: {stopped}.")
            error = notebook.errors[self.index]
            if error is not None:
                steps = notebook.plan.steps
                raise Failed(f"Cell {steps[self.index].cell} ({where(steps, self.index)}) "
                             f"raised {sentence(error)}.")

    class ExerciseItem(_Item):
        """A shipped exercise: its check cell, run as shipped (or its absence)."""

        exercise: Exercise
        index: int | None

        @classmethod
        def create(cls, notebook, exercise: Exercise, index: int | None, cell):
            item = cls.from_parent(notebook, name=exercise.label, cell_num=0, cell=cell,
                                   options={})
            item.exercise, item.index = exercise, index
            item.user_properties.append(("exercise", exercise.number))
            return item

        def setup(self):
            pass

        def runtest(self):
            notebook = self.parent
            if self.index is not None:
                notebook.run_upto(self.index)
            result = notebook.judge.result(self.exercise)
            notebook.reported[self.exercise.check] = result
            if result.edited:
                self.user_properties.append(("edited", "the check cell was run as shipped"))
            if not result.passed:
                note = "\n[check cell edited: it was run as shipped]" if result.edited else ""
                raise Failed(f"{result.message}{note}")  # the header names the exercise

    return ExerciseNotebook, StudentCell, ExerciseItem


class _ItemBase:
    """Marks the items of exercise notebooks."""


class Failed(Exception):
    """A failing item whose message is the whole report (no traceback)."""


class BadNotebookItem(pytest.Item):
    def __init__(self, *, message: str, **kwargs):
        super().__init__(**kwargs)
        self.message = message

    def runtest(self):
        raise Failed(self.message)

    def repr_failure(self, excinfo, style=None):
        return str(excinfo.value)

    def reportinfo(self):
        return self.path, None, ""


class BadNotebook(pytest.File):
    """A .ipynb file that is not a readable notebook: one failing item saying so."""

    def __init__(self, *, message: str, **kwargs):
        super().__init__(**kwargs)
        self.message = message

    def collect(self):
        yield BadNotebookItem.from_parent(self, name="not a notebook", message=self.message)


_CLASSES: list = []


def exercise_notebook_class():
    """nbval's notebook collector, held to the shipped exercises (made on first use)."""
    if not _CLASSES:
        _CLASSES.extend(_make_classes())
    return _CLASSES[0]


# ----------------------------------------------------------------------------- reporting


class _NamedReport(pytest.TestReport):
    """A report whose failure header is the item's node id (``path::Exercise 2.1: ...``).

    pytest takes the header from the location's domain, which it also shows in ``-v``
    lines with every "." turned into "::"; the items' domain is empty (the node id is
    shown as it is) and their failure header comes from here.
    """

    @property
    def head_line(self) -> str:
        return self.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_report_to_serializable(config, report):
    """Under pytest-xdist a named report travels as the plain TestReport it is."""
    if isinstance(report, _NamedReport):
        data = report._to_json()
        data["$report_type"] = "TestReport"
        return data
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(item, (_ItemBase, BadNotebookItem)):
        report.__class__ = _NamedReport


def pytest_report_teststatus(report, config):
    """The student's own cells that pass (or are not run) show nothing, not even a dot,
    unless -v asks for every item."""
    if report.when != "call" or config.option.verbose > 0:  # -v lists every cell
        return None
    if report.nodeid in config.stash.get(QUIET, set()) and not report.failed:
        return ("passed" if report.passed else "skipped"), "", ""
    return None


def pytest_runtest_logreport(report):
    """Count the quiet cells in pytest's progress percentage (else it stops short of 100%)."""
    config = _CONFIG[0] if _CONFIG else None
    if config is None or report.when != "call" or config.option.verbose > 0:
        return
    if report.nodeid in config.stash.get(QUIET, set()) and not report.failed:
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        reported = getattr(terminal, "_progress_nodeids_reported", None)
        if isinstance(reported, set):  # pytest's private counter; only cosmetic
            reported.add(report.nodeid)


_CONFIG: list = []


def pytest_configure(config):
    _CONFIG[:] = [config]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    notebooks = [n for n in config.stash.get(NOTEBOOKS, []) if n.reported]
    notes = config.stash.get(NOTES, [])
    if not notebooks and not notes:
        return
    tr = terminalreporter
    tr.section("exercises")
    for note in notes:
        tr.line(note)
    for notebook in notebooks:
        results = [notebook.reported[e.check] for e in notebook.plan.exercises
                   if e.check in notebook.reported]
        for r in results:
            if r.edited:
                tr.line(f"{_relative(config, notebook.path)}: {r.exercise.label}: the check "
                        "cell was edited; it was run as shipped.")
        passed = sum(r.passed for r in results)
        line = f"{_relative(config, notebook.path)}: {passed}/{len(results)} exercises passed"
        tr.line(line, green=passed == len(results), red=passed < len(results))
    if len(notebooks) > 1:
        passed = sum(r.passed for n in notebooks for r in n.reported.values())
        total = sum(len(n.reported) for n in notebooks)
        tr.line(f"{passed}/{total} exercises passed in {len(notebooks)} notebooks")
