"""Grade exercise notebooks.

    python -m transformer_book.grade exercises/02_scaled_dot_product_attention.ipynb
    python -m transformer_book.grade submissions/            # every notebook in a folder
    python -m transformer_book.grade submissions/*/*.ipynb --jobs 4 --csv grades.csv
    python -m transformer_book.grade submission/ --gradescope results/results.json
    python -m transformer_book.grade submissions/ --report class.html   # what the class got wrong

Each notebook is executed top to bottom in its own Jupyter kernel and held to the
exercises shipped with the package: every shipped check cell is run as shipped, a
missing one is a failed exercise, and the total is always the chapter's number of
exercises (see :mod:`transformer_book.grading`). One line per exercise, each naming its
notebook, then the notebook's score.

Exit status: 0 when every exercise passes, 1 when any fails, 2 for bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from . import class_report
from .grading import (  # noqa: F401 (CHECK_CALL: kept importable from here)
    CHECK_CALL,
    DEFAULT_TIMEOUT,
    BadInput,
    Course,
    NotebookResult,
    collect,
    cores,
    run,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, not the usage text
        print(f"error: {message}.", file=sys.stderr)
        raise SystemExit(2)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m transformer_book.grade",
        description="Run exercise notebooks and report which exercises pass.",
    )
    p.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK",
                   help="exercise notebooks, or folders to search for them")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--jobs", type=_positive(int), default=None, metavar="N",
                   help=f"notebooks graded at the same time (default: the cores, {cores()})")
    p.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds a cell may run (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--csv", type=Path, metavar="PATH",
                   help="write one row per notebook: path, one column per exercise, score")
    p.add_argument("--gradescope", type=Path, metavar="PATH",
                   help="write Gradescope's results.json")
    p.add_argument("--report", type=Path, metavar="PATH",
                   help="write a class report (.html or .md): per exercise, the pass rate "
                        "and the most frequent failure messages, with a bar chart")
    return p


# ----------------------------------------------------------------------------- reports


def text_lines(results: list[NotebookResult]) -> list[str]:
    lines = []
    for notebook in results:
        for r in notebook.results:
            mark = "PASS" if r.passed else "FAIL"
            detail = "" if r.passed else f": {r.message}"
            if r.edited:
                detail += " [check cell edited: it was run as shipped]"
            lines.append(f"{notebook.path}: {mark}  {r.exercise.label}{detail}")
        lines.append(f"{notebook.path}: score {notebook.passed}/{notebook.total}")
    if len(results) > 1:
        complete = sum(n.passed == n.total for n in results)
        lines.append(f"{len(results)} notebooks graded, {complete} with every exercise passed.")
    return lines


def json_report(results: list[NotebookResult]) -> dict:
    def exercise(notebook: NotebookResult, r) -> dict:
        return {
            "notebook": str(notebook.path),
            "exercise": r.exercise.label,
            "number": r.exercise.number,
            "check": r.exercise.check,
            "passed": r.passed,
            "message": r.message,
            "edited": r.edited,
        }

    passed = sum(n.passed for n in results)
    total = sum(n.total for n in results)
    return {
        "notebooks": [
            {
                "notebook": str(n.path),
                "chapter": n.chapter,
                "passed": n.passed,
                "total": n.total,
                "seconds": round(n.seconds, 2),
                "stopped": n.stopped,
                "exercises": [exercise(n, r) for r in n.results],
            }
            for n in results
        ],
        "exercises": [exercise(n, r) for n in results for r in n.results],
        "passed": passed,
        "total": total,
        "score": passed / total if total else 0.0,
    }


def write_csv(path: Path, results: list[NotebookResult]) -> None:
    numbers: list[str] = []
    for notebook in results:
        for r in notebook.results:
            if r.exercise.number not in numbers:
                numbers.append(r.exercise.number)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["notebook", *numbers, "score", "max_score"])
        for notebook in results:
            marks = {r.exercise.number: int(r.passed) for r in notebook.results}
            writer.writerow(
                [str(notebook.path), *(marks.get(n, "") for n in numbers),
                 notebook.passed, notebook.total]
            )


def gradescope_report(results: list[NotebookResult], seconds: float, notes: list[str]) -> dict:
    """Gradescope's results.json: one test per exercise, worth one point."""
    several = len(results) > 1
    tests = []
    for notebook in results:
        for r in notebook.results:
            tests.append(
                {
                    "name": f"{notebook.path.name}: {r.exercise.label}" if several
                    else r.exercise.label,
                    "number": r.exercise.number,
                    "score": 1.0 if r.passed else 0.0,
                    "max_score": 1.0,
                    "status": "passed" if r.passed else "failed",
                    "output": r.message
                    + (" (Your check cell was edited; it was run as shipped.)" if r.edited else ""),
                    "visibility": "visible",
                }
            )
    # A chapter counts once: when it was submitted twice, its better notebook counts.
    best: dict[str, int] = {}
    for notebook in results:
        best[notebook.chapter] = max(best.get(notebook.chapter, 0), notebook.passed)
    output = [line for line in text_lines(results) if ": PASS  " not in line]
    if len(best) < len(results):
        output.append("A chapter was submitted more than once: its best notebook counts.")
    return {
        "score": float(sum(best.values())),
        "execution_time": round(seconds),
        "output": "\n".join([*notes, *output]),
        "visibility": "visible",
        "tests": tests,
    }


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_writable(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a folder; give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"{option} {path}: cannot create its folder ({error.strerror}).") from None


def main(argv: list[str] | None = None, course: Course | None = None,
         env: dict[str, str] | None = None) -> int:
    """The command line. ``course`` and ``env`` (the kernels' environment) are for tests."""
    args = parser().parse_args(argv)
    start = time.monotonic()
    try:
        _check_writable(args.csv, "--csv")
        _check_writable(args.gradescope, "--gradescope")
        _check_writable(args.report, "--report")
        if args.report is not None:
            class_report.report_format(args.report)
        plans, notes = collect(args.notebooks, course or Course.shipped())
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        if args.gradescope is not None and args.gradescope.parent.is_dir():
            _write_json(args.gradescope, {"score": 0.0, "execution_time": 0,
                                          "output": str(error), "tests": []})
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if len(plans) == 1 and not args.json:
        print(f"Grading {plans[0].path}...", file=sys.stderr, flush=True)
    results = run(plans, jobs=args.jobs, timeout=args.timeout, env=env, progress=len(plans) > 1)
    if args.json:
        print(json.dumps(json_report(results), indent=2, ensure_ascii=False))
    else:
        print("\n".join(text_lines(results)))
    if args.csv is not None:
        write_csv(args.csv, results)
    if args.gradescope is not None:
        _write_json(args.gradescope, gradescope_report(results, time.monotonic() - start, notes))
    if args.report is not None:
        made = time.monotonic()
        class_report.write(args.report, results)
        print(f"Class report written to {args.report} in {time.monotonic() - made:.1f} s.",
              file=sys.stderr)
    everything = all(n.passed == n.total for n in results)
    return 0 if everything else 1


if __name__ == "__main__":
    sys.exit(main())
