"""Grade exercise notebooks.

    python -m transformer_book.grade exercises/02_scaled_dot_product_attention.ipynb
    python -m transformer_book.grade exercises/*.ipynb --json

Each notebook is executed top to bottom by pytest + nbval (``--nbval-lax``: every
cell must run without error; outputs are not compared). Every check cell is one
exercise. One line is printed per exercise, then the score.

Exit status: 0 when every check passes, 1 when any fails, 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

CHECK_CALL = re.compile(r"^\s*(check_\w+)\s*\(", re.MULTILINE)
ERROR_LINE = re.compile(r"^(\w*(?:Error|Exception|Failure|Interrupt)\w*): ?(.*)$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BadInput(Exception):
    """The command line names something that cannot be graded."""


def _load(path: Path):
    import nbformat

    if not path.exists():
        raise BadInput(f"{path}: no such file.")
    if path.suffix != ".ipynb":
        raise BadInput(f"{path}: not a notebook (expected a .ipynb file).")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - any parse failure is bad input
        raise BadInput(f"{path}: not a readable Jupyter notebook ({type(error).__name__}).") from None
    return nb


def exercises_in(nb, path: Path) -> list[dict]:
    """The check cells of a notebook, in order: one exercise each."""
    from .checks import REGISTRY

    found = []
    code_index = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code_index += 1
        for name in CHECK_CALL.findall(cell.source):
            check = REGISTRY.get(name)
            label = check.label if check else name
            found.append({"check": name, "exercise": label, "cell": code_index})
    if not found:
        raise BadInput(f"{path}: not an exercise notebook (it has no cell that calls a check).")
    return found


class _Collector:
    """pytest plugin: remember the error text of each notebook cell that failed."""

    def __init__(self):
        self.failures: dict[tuple[str, int], str] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when != "call" and not (report.when == "setup" and report.failed):
            return
        match = re.fullmatch(r"Cell (\d+)", item.name)
        if match:
            # nbval numbers code cells from 0; exercises_in numbers them from 1
            key = (item.path.name, int(match.group(1)) + 1)
            if report.failed:
                self.failures[key] = ANSI.sub("", report.longreprtext or "")


def _error_sentence(text: str) -> str:
    errors = ERROR_LINE.findall(text)
    if not errors:
        return "the cell failed to run."
    name, message = errors[-1]
    return f"{name}: {message}".strip()


def plan(paths: list[Path]) -> list[tuple[Path, list[dict]]]:
    """Validate the notebooks and list their exercises (raises BadInput)."""
    return [(path, exercises_in(_load(path), path)) for path in paths]


def run(plans: list[tuple[Path, list[dict]]]) -> list[dict]:
    """Execute the planned notebooks; return one result per exercise."""
    from .checks._core import GRADE_LOG  # the variable the checks log their results to

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "checks.jsonl"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        collector = _Collector()
        previous = os.environ.get(GRADE_LOG)
        os.environ[GRADE_LOG] = str(log)
        try:
            args = ["-q", "-c", str(ini), "--rootdir", tmp, "-p", "no:cacheprovider",
                    "--nbval-lax", "--nbval-current-env", "-o", "addopts=",
                    *[str(p.resolve()) for p, _ in plans]]
            # pytest's own report would garble ours (and the --json document): keep it quiet
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                pytest.main(args, plugins=[collector])
        finally:
            if previous is None:
                os.environ.pop(GRADE_LOG, None)
            else:
                os.environ[GRADE_LOG] = previous
        logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    results = []
    for path, exercises in plans:
        for exercise in exercises:
            record = next((r for r in logged if r["check"] == exercise["check"]), None)
            if record is not None:
                logged.remove(record)
                passed, message = record["passed"], record["message"]
            else:
                passed = False
                text = collector.failures.get((path.name, exercise["cell"]), "")
                if not text:
                    message = "the check cell did not run."
                else:
                    message = f"the check cell failed before checking: {_error_sentence(text)}"
            results.append(
                {
                    "notebook": str(path),
                    "exercise": exercise["exercise"],
                    "check": exercise["check"],
                    "passed": passed,
                    "message": message,
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_book.grade",
        description="Run exercise notebooks and report which checks pass.",
    )
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    args = parser.parse_args(argv)
    try:
        plans = plan(args.notebooks)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"Running {len(plans)} notebook(s)...", file=sys.stderr, flush=True)
    results = run(plans)
    passed = sum(r["passed"] for r in results)
    total = len(results)
    if args.json:
        report = {
            "notebooks": [str(p) for p in args.notebooks],
            "exercises": results,
            "passed": passed,
            "total": total,
            "score": passed / total,
        }
        print(json.dumps(report, indent=2))
    else:
        print()
        for r in results:
            mark = "PASS" if r["passed"] else "FAIL"
            detail = "" if r["passed"] else f": {r['message']}"
            print(f"{mark}  {r['exercise']}{detail}")
        print(f"Score: {passed}/{total}")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
