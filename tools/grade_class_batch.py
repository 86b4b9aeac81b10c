"""Grade a class-sized batch and check every grade: the grader's end-to-end trial.

    python tools/grade_class_batch.py                      # 30 students x every chapter
    python tools/grade_class_batch.py --students 10 --jobs 2 --timeout 15
    python tools/grade_class_batch.py --report class.html   # and the class report

Builds ``submissions/student_NN/<chapter>.ipynb`` in a temporary folder from the course's
solutions/ and exercises/, one kind of submission per notebook in rotation: correct,
unfinished, wrong (the first solution raises an error of the student's), a syntax error,
deleted check cells, an edited check cell, a hung cell, a dead kernel. Then it runs
``python -m transformer_book.grade submissions --jobs N --csv ... --json`` once, checks
each notebook's result against what its kind must get, and prints the wall time and the
time per notebook. Exit status 0 when every grade is right.

Not part of the test suite (it takes minutes); tests/test_grade.py grades a small batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import generate  # noqa: E402

sys.path.insert(0, str(ROOT))
from transformer_book.checks.manifest import NOTEBOOKS  # noqa: E402

KINDS = ["correct", "unfinished", "wrong", "syntax", "deleted", "correct", "edited", "hung",
         "correct", "dead"]


def submission(chapter: str, kind: str):
    """A student's notebook of ``chapter`` of the given kind."""
    solution = nbformat.read(ROOT / "solutions" / chapter, as_version=4)
    student = nbformat.read(ROOT / "exercises" / chapter, as_version=4)
    regions = [i for i, c in enumerate(solution.cells) if generate.BEGIN in c.source]
    checks = [cell["source"] for cell in NOTEBOOKS[chapter]]
    check_cells = [i for i, c in enumerate(student.cells) if c.source.strip() in checks]
    nb = copy.deepcopy(solution if kind in ("correct", "wrong", "syntax", "deleted") else student)
    first = nb.cells[regions[0]]
    if kind == "wrong":  # the student's first function fails when the check calls it
        first.source = generate.exercise_from_solution(solution, Path(chapter)).cells[
            regions[0]].source.replace("raise NotImplementedError()", 'raise ValueError("my bug")')
    elif kind == "syntax":
        first.source = "def broken(:\n    pass\n"
    elif kind == "deleted":
        nb.cells = [c for i, c in enumerate(nb.cells) if i not in check_cells[1:]]
    elif kind == "edited":  # the first check cell is handed a working solution of its own
        cell = nb.cells[check_cells[0]]
        cell.source = solution.cells[regions[0]].source + "\n\n\n" + cell.source
    elif kind == "hung":
        first.source = "while True:\n    pass"
    elif kind == "dead":
        first.source = "import os\nos._exit(1)"
    return nb


def judge(kind: str, result: dict, timeout: float) -> str | None:
    """Why ``result`` is the wrong grade for a submission of ``kind`` (None: it is right)."""
    exercises = result["exercises"]
    passed = [e["passed"] for e in exercises]
    messages = [e["message"] for e in exercises]
    n = len(exercises)
    expected_total = sum(len(c["exercises"]) for c in NOTEBOOKS[result["chapter"]])
    if n != expected_total:
        return f"total {n}, expected {expected_total}"
    rules = {
        "correct": all(passed),
        "unfinished": not any(passed) and all(m.startswith("not done yet") for m in messages),
        # a later exercise may build on the first (5.2 stacks 5.1's block): it then fails
        # with the same error, which is right
        "wrong": not passed[0] and "raised ValueError: my bug" in messages[0]
        and all(p or "my bug" in m for p, m in zip(passed[1:], messages[1:])),
        "syntax": not passed[0] and " raised SyntaxError: " in messages[0]
        and all(p or "NameError" in m for p, m in zip(passed[1:], messages[1:])),
        "deleted": passed[0] and all(m.endswith("was removed.") for m in messages[1:]),
        "edited": not passed[0] and exercises[0]["edited"]
        and messages[0].startswith("not done yet"),
        "hung": not any(passed) and all(m.endswith(f"ran longer than {timeout:g} s.")
                                        for m in messages),
        "dead": not any(passed) and all("the kernel died while running cell" in m
                                        for m in messages),
    }
    return None if rules[kind] else f"got {list(zip(passed, messages))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--report", type=Path, metavar="PATH",
                        help="also write the grader's class report (.html or .md) there")
    args = parser.parse_args(argv)
    chapters = sorted(NOTEBOOKS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "submissions"
        kinds: dict[str, str] = {}
        for student in range(args.students):
            for c, chapter in enumerate(chapters):
                kind = KINDS[(student + c) % len(KINDS)]
                path = folder / f"student_{student:02d}" / chapter
                path.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(submission(chapter, kind), path)
                kinds[str(path)] = kind
        start = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "transformer_book.grade", str(folder), "--json",
             "--jobs", str(args.jobs), "--timeout", str(args.timeout),
             "--csv", str(Path(tmp) / "grades.csv"),
             *(["--report", str(args.report.resolve())] if args.report else [])],
            capture_output=True, text=True, cwd=tmp,
        )
        wall = time.monotonic() - start
        if run.returncode not in (0, 1):
            print(run.stderr, file=sys.stderr)
            return 1
        report = json.loads(run.stdout)
        rows = len((Path(tmp) / "grades.csv").read_text().splitlines()) - 1
    results = {n["notebook"]: n for n in report["notebooks"]}
    wrong = []
    for path, kind in kinds.items():
        problem = judge(kind, results[path], args.timeout) if path in results else "not graded"
        if problem:
            wrong.append(f"{path} ({kind}): {problem}")
    count = len(kinds)
    seconds = {k: [results[p]["seconds"] for p, kk in kinds.items() if kk == k and p in results]
               for k in dict.fromkeys(kinds.values())}
    print(f"{count} notebooks ({args.students} students x {len(chapters)} chapters), "
          f"--jobs {args.jobs}, --timeout {args.timeout:g}: wall time {wall:.0f} s, "
          f"{wall / count:.2f} s per notebook; CSV rows: {rows}")
    for kind, times in seconds.items():
        print(f"  {kind:<10} {len(times):4d} notebooks, {sum(times) / len(times):6.2f} s each "
              "in its kernel")
    if args.report:
        print(next((line for line in run.stderr.splitlines()
                    if line.startswith("Class report written")), "no class report written"))
    for line in wrong:
        print("WRONG GRADE:", line)
    print("every grade is right" if not wrong and rows == count else f"{len(wrong)} wrong grades")
    return 0 if not wrong and rows == count else 1


if __name__ == "__main__":
    sys.exit(main())
