"""The engine of ``python -m transformer_book.grade``: plan, execute, judge.

A submission is held to the exercises *shipped* with the package
(:mod:`transformer_book.checks.manifest`, generated from ``solutions/``), not to what
the submitted notebook contains:

- its chapter is recognised from the checks it calls (or, when it calls none, from its
  file name);
- each shipped check cell is matched to the student's cell that calls the same check
  and is executed *as shipped* (an edit of a check cell has no effect, and is reported);
- a shipped check cell with no such cell is a failed exercise ("was removed");
- only the shipped check cells' results count: a check the student calls elsewhere
  does not.

Each notebook runs top to bottom in its own kernel (the current Python environment),
cell by cell with a time limit per cell. A cell that runs too long or a kernel that
dies stops that notebook (its remaining exercises fail with one sentence saying so);
the other notebooks are not affected. Notebooks run in parallel, ``jobs`` at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .checks._core import GRADE_LOG

CHECK_CALL = re.compile(r"\b(check_\w+)\s*\(")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_TIMEOUT = 120.0
KERNEL_START_TIMEOUT = 60.0


class BadInput(Exception):
    """The command line names something that cannot be graded (one sentence)."""


# ----------------------------------------------------------------------------- the course


@dataclass(frozen=True)
class Exercise:
    check: str  # the check function's name, e.g. "check_stable_softmax"
    module: str  # where it lives, e.g. "transformer_book.checks.ch02"
    number: str  # "2.1"
    title: str

    @property
    def label(self) -> str:
        return f"Exercise {self.number}: {self.title}"


@dataclass(frozen=True)
class CheckCell:
    source: str
    exercises: tuple[Exercise, ...]

    def executed_source(self) -> str:
        """The shipped source, after importing its checks from the package.

        The import makes the check the package's own, even when the student's notebook
        lost the setup cell's import or defined a function of the same name.
        """
        imports = [f"from {e.module} import {e.check}" for e in self.exercises]
        return "\n".join([*imports, self.source])


class Course:
    """The shipped exercise notebooks: file name -> check cells, in order."""

    def __init__(self, notebooks: dict[str, list[dict]]):
        self.notebooks = {
            name: [
                CheckCell(cell["source"], tuple(Exercise(**e) for e in cell["exercises"]))
                for cell in cells
            ]
            for name, cells in notebooks.items()
        }

    @classmethod
    def shipped(cls) -> Course:
        from .checks.manifest import NOTEBOOKS

        return cls(NOTEBOOKS)

    def exercises(self, name: str) -> list[Exercise]:
        return [e for cell in self.notebooks[name] for e in cell.exercises]

    def checks(self, name: str) -> set[str]:
        return {e.check for e in self.exercises(name)}

    def identify(self, calls: set[str], path: Path) -> str | None:
        """The shipped notebook a submission is a copy of: by its checks, else its name."""
        overlap = {name: len(calls & self.checks(name)) for name in self.notebooks}
        best = max(overlap.values(), default=0)
        if best:
            named = [n for n, k in overlap.items() if k == best]
            return next((n for n in named if path.name.endswith(n)), named[0])
        # No shipped check is called (every check cell deleted?): the file name decides.
        return next((n for n in self.notebooks if path.name.endswith(n)), None)


# ----------------------------------------------------------------------------- planning


@dataclass
class Step:
    """One cell to execute: the student's own, or a shipped check cell."""

    source: str
    cell: int  # the student's code cell it comes from, numbered from 1
    check_cell: CheckCell | None = None


@dataclass
class Plan:
    path: Path
    chapter: str  # the shipped notebook's file name
    steps: list[Step]
    exercises: list[Exercise]
    removed: set[str] = field(default_factory=set)  # checks whose cell is missing
    edited: set[str] = field(default_factory=set)  # checks whose cell was edited
    note: str | None = None  # a sentence for the report (e.g. another chapter's notebook)


def _normal(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def read_notebook(path: Path):
    if not path.exists():
        raise BadInput(f"{path}: no such file.")
    if path.suffix != ".ipynb":
        raise BadInput(f"{path}: not a notebook (expected a .ipynb file).")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - any parse failure is bad input
        raise BadInput(
            f"{path}: not a readable Jupyter notebook ({type(error).__name__})."
        ) from None


def plan(path: Path, course: Course, nb=None) -> Plan:
    """Match a submitted notebook to its shipped exercises (raises BadInput).

    ``nb`` is the notebook when it was read already (by :func:`read_notebook`).
    """
    nb = read_notebook(path) if nb is None else nb
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    calls = [set(CHECK_CALL.findall(source)) for source in code]
    chapter = course.identify(set().union(*calls), path)
    if chapter is None:
        raise BadInput(
            f"{path}: not an exercise notebook of this course (it calls none of the "
            "course's checks and its name is none of the exercise notebooks')."
        )
    # Each shipped check cell goes where the student's cell calling its check is: the
    # unedited copy if there is one, else the last cell calling it.
    placed: dict[int, list[CheckCell]] = {}
    removed, edited = set(), set()
    for check_cell in course.notebooks[chapter]:
        first = check_cell.exercises[0].check
        candidates = [i for i, names in enumerate(calls) if first in names]
        if not candidates:
            removed.update(e.check for e in check_cell.exercises)
            continue
        same = [i for i in candidates if _normal(code[i]) == _normal(check_cell.source)]
        index = (same or candidates)[-1]
        placed.setdefault(index, []).append(check_cell)
        if not same:
            edited.update(e.check for e in check_cell.exercises)
    steps = []
    for index, source in enumerate(code):
        if index in placed:
            shipped = placed[index]
            if len(shipped) > 1:  # one cell of the student's stood for several shipped ones
                edited.update(e.check for c in shipped for e in c.exercises)
            steps += [Step(c.executed_source(), index + 1, c) for c in shipped]
        elif source.strip():
            steps.append(Step(source, index + 1))
    named = next((n for n in course.notebooks if path.name.endswith(n)), None)
    note = None
    if named is not None and named != chapter:
        note = (f"{path} was graded as {chapter}, whose checks it calls, although its "
                f"file name is that of {named}.")
    return Plan(path, chapter, steps, course.exercises(chapter), removed, edited, note)


def collect(arguments: list[Path], course: Course) -> tuple[list[Plan], list[str]]:
    """Plans for the notebooks named (files, or folders searched recursively).

    A file that cannot be graded is bad input; in a folder, notebooks that are not
    exercise notebooks of the course are skipped (returned as notes).
    """
    plans: list[Plan] = []
    notes: list[str] = []
    seen: set[Path] = set()
    for argument in arguments:
        if argument.is_dir():
            found = sorted(
                p for p in argument.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
            )
            kept = 0
            for path in found:
                if path.resolve() in seen:
                    continue
                try:
                    plans.append(plan(path, course))
                except BadInput as error:
                    notes.append(f"skipped {error}")
                    continue
                notes += [plans[-1].note] if plans[-1].note else []
                seen.add(path.resolve())
                kept += 1
            if not kept:
                raise BadInput(f"{argument}: no exercise notebook of this course in this folder.")
        elif argument.resolve() not in seen:
            plans.append(plan(argument, course))
            notes += [plans[-1].note] if plans[-1].note else []
            seen.add(argument.resolve())
    return plans, notes


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    exercise: Exercise
    passed: bool
    message: str
    edited: bool = False


@dataclass
class NotebookResult:
    path: Path
    chapter: str
    results: list[Result]
    seconds: float
    stopped: str | None = None  # why execution stopped early (timeout, dead kernel)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)


# ----------------------------------------------------------------------------- execution


def _kernel_spec_manager():
    """A kernel spec manager whose "python3" is the Python running the grader."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class CurrentPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3",
                language="python",
            )

    return CurrentPython()


def error_of(cell) -> tuple[str, str] | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return error_pair(output)
    return None


def error_pair(output) -> tuple[str, str]:
    """(name, value) of an error output or an iopub error message's content."""
    value = ANSI.sub("", str(output.get("evalue", ""))).strip()
    value = re.sub(r" \((?:[^()]*\.py|<[^<>]*>), line (\d+)\)$", r" (line \1)", value)
    return str(output.get("ename", "Error")), value


def sentence(error: tuple[str, str]) -> str:
    name, value = error
    value = value.splitlines()[0] if value else ""
    return f"{name}: {value}".rstrip(": ") if value else name


def where(steps: list[Step], index: int) -> str:
    """Where step ``index`` is, in words a student can find in the notebook."""
    step = steps[index]
    if step.check_cell is not None:
        return f"the check cell of exercise {step.check_cell.exercises[0].number}"
    later = next((s for s in steps[index:] if s.check_cell is not None), None)
    if later is None:
        return "your code after the last exercise"
    return f"your code before exercise {later.check_cell.exercises[0].number}"


class Judge:
    """The judgement of one notebook's run, step by step: shared by the grader and the
    pytest plugin (:mod:`transformer_book.pytest_plugin`), so both say the same thing.

    Feed it each executed step (:meth:`step`) with the error the cell raised and what the
    checks logged during it; :meth:`stop` when execution stopped early; :meth:`results`
    at the end gives one :class:`Result` per shipped exercise.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.results: dict[str, Result] = {}
        for exercise in plan.exercises:
            if exercise.check in plan.removed:
                message = f"the check cell for exercise {exercise.number} was removed."
                self.results[exercise.check] = Result(exercise, False, message, self._edited(exercise))
        self.stopped: str | None = None
        self.first_error: tuple[int, tuple[str, str]] | None = None  # first in the student's code
        self.pending: tuple[int, tuple[str, str]] | None = None  # first since the last check cell

    def _edited(self, exercise: Exercise) -> bool:
        return exercise.check in self.plan.edited

    def step(self, index: int, error: tuple[str, str] | None, records: list[dict]) -> list[Result]:
        """Judge step ``index`` of the plan; the results of the exercises it checks."""
        steps = self.plan.steps
        step = steps[index]
        if step.check_cell is None:
            if error and self.pending is None:
                self.pending = (index, error)
            if error and self.first_error is None:
                self.first_error = (index, error)
            return []
        judged = []
        pending, first_error = self.pending, self.first_error
        for exercise in step.check_cell.exercises:
            record = next((r for r in records if r.get("check") == exercise.check), None)
            if record is not None:
                passed, message = bool(record["passed"]), str(record["message"])
                if not passed and pending is not None and pending[1][0] != "NotImplementedError":
                    message += f" (Note: {where(steps, pending[0])} raised {sentence(pending[1])}.)"
            elif pending is not None:
                passed = False
                if pending[0] == index - 1:
                    place = f"the cell before exercise {exercise.number}"
                else:
                    place = f"cell {steps[pending[0]].cell} (before exercise {exercise.number})"
                message = f"your code in {place} raised {sentence(pending[1])}"
            elif error is not None:
                passed = False
                message = f"the check cell raised {sentence(error)}"
                if first_error is not None:
                    message += (
                        f" (the first error in your notebook: {where(steps, first_error[0])}"
                        f", cell {steps[first_error[0]].cell}, raised {sentence(first_error[1])})"
                    )
                elif error[0] == "NameError":
                    message += ": is the cell that defines it missing, or was it renamed?"
            else:
                passed, message = False, "the check did not report a result."
            if not passed and not message.endswith((".", "?")):
                message += "."
            result = Result(exercise, passed, message, self._edited(exercise))
            self.results[exercise.check] = result
            judged.append(result)
        self.pending = None
        return judged

    def stop(self, index: int, why: str, timeout: float | None = None) -> str:
        """Execution stopped at step ``index``: ``why`` is "timeout" or "dead"."""
        step, place = self.plan.steps[index], where(self.plan.steps, index)
        if why == "timeout":
            self.stopped = f"cell {step.cell} ({place}) ran longer than {timeout:g} s"
        else:
            self.stopped = (
                f"the kernel died while running cell {step.cell} ({place}): "
                "os._exit, a crash in compiled code or running out of memory"
            )
        return self.stopped

    def not_graded(self, exercise: Exercise) -> Result:
        why = self.stopped or "the check cell did not run"
        return Result(exercise, False, f"not graded: {why}.", self._edited(exercise))

    def result(self, exercise: Exercise) -> Result:
        return self.results.get(exercise.check) or self.not_graded(exercise)

    def ordered(self) -> list[Result]:
        return [self.result(e) for e in self.plan.exercises]


class CheckLog:
    """The records the checks append to the grade log (one JSON line per check run)."""

    def __init__(self, path: Path):
        self.path, self.read = path, 0

    def new(self) -> list[dict]:
        """The records written since the last call."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines[self.read:] if line.strip()]
        self.read = len(lines)
        return records


async def _grade(plan: Plan, timeout: float, env: dict[str, str], workdir: Path) -> NotebookResult:
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    start = time.monotonic()
    log = CheckLog(workdir / "checks.jsonl")
    judge = Judge(plan)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(step.source) for step in plan.steps]
    km = AsyncKernelManager(kernel_spec_manager=_kernel_spec_manager(), kernel_name="python3")
    if os.name == "posix":  # local sockets in our own folder, not TCP ports on localhost
        km.transport, km.ip = "ipc", str(workdir / "kernel")
    kc = None
    try:
        await km.start_kernel(
            env={**env, GRADE_LOG: str(log.path)},
            cwd=str(plan.path.resolve().parent),
            extra_arguments=["--HistoryManager.hist_file=:memory:"],
        )
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - any failure to start is one sentence
        judge.stopped = kernel_did_not_start(error)
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=True)
    client.kc = kc
    for index in range(len(plan.steps)):
        if judge.stopped:
            break
        try:
            cell = await client.async_execute_cell(nb.cells[index], index)
        except CellTimeoutError:
            judge.stop(index, "timeout", timeout)
            break
        except DeadKernelError:
            judge.stop(index, "dead")
            break
        error = error_of(cell)
        cell.outputs = []  # keep memory flat on chatty notebooks
        judge.step(index, error, log.new())  # only check cells' records count
    if kc is not None:
        kc.stop_channels()
    try:
        await km.shutdown_kernel(now=True)
    except Exception:  # noqa: BLE001, S110 - already dead or never started
        pass
    return NotebookResult(plan.path, plan.chapter, judge.ordered(), time.monotonic() - start,
                          judge.stopped)


def kernel_did_not_start(error: BaseException) -> str:
    return f"the kernel did not start ({type(error).__name__}: {error})"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def kernel_environment(jobs: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every kernel: the grader's, with threads shared among jobs."""
    env = dict(os.environ if base is None else base)
    threads = str(max(1, cores() // max(1, jobs)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run(
    plans: list[Plan],
    *,
    jobs: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    progress: bool = False,
) -> list[NotebookResult]:
    """Grade the planned notebooks, ``jobs`` at a time; results in the order of ``plans``."""
    jobs = max(1, min(jobs or cores(), len(plans) or 1))
    env = kernel_environment(jobs, env)

    async def main() -> list[NotebookResult]:
        gate = asyncio.Semaphore(jobs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plans), unit="notebook", desc="grading", file=sys.stderr)

        async def one(plan: Plan, workdir: Path) -> NotebookResult:
            async with gate:
                try:
                    result = await _grade(plan, timeout, env, workdir)
                except Exception as error:  # noqa: BLE001 - one notebook never stops a batch
                    why = f"the grader failed on this notebook ({type(error).__name__}: {error})"
                    results = [Result(e, False, f"not graded: {why}.") for e in plan.exercises]
                    result = NotebookResult(plan.path, plan.chapter, results, 0.0, why)
            if bar is not None:
                bar.update(1)
            return result

        with tempfile.TemporaryDirectory(prefix="transformer_book_grade_") as tmp:
            folders = [Path(tmp) / str(i) for i in range(len(plans))]
            for folder in folders:
                folder.mkdir()
            try:
                return list(await asyncio.gather(*(one(p, f) for p, f in zip(plans, folders))))
            finally:
                if bar is not None:
                    bar.close()

    return asyncio.run(main())
