"""Execute the book's notebooks two at a time into the build's cache, before the build.

`jupyter-book build` (Jupyter Book 1, ``execute_notebooks: cache``) executes the
notebooks one after another, and the chapters that take longest pin PyTorch to one
thread, so one of a 2-core machine's cores would sit idle for most of the build. This
script runs the notebooks the build executes (``book/`` and ``solutions/``; the exercise
notebooks are rendered unexecuted), ``--jobs`` at a time, each in a fresh kernel in its
own folder, longest first, and stores every successful run in ``_build/.jupyter_cache``
exactly as the build would. The build then finds each notebook there ("Using cached
notebook") and only renders. A notebook that is already cached with its current code is
not run again; one that fails is not cached, is reported in one line, and makes the
script exit with status 1 (the build would stop on it too).

    python tools/execute_book.py [--jobs N] [--only PREFIX ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
from portability import describe_failure  # tools/ is on the path, as for any script here

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
FOLDERS = ("book", "solutions")
LONGEST = ("07_", "09_", "06_", "08_", "05_")  # started first, so that none finishes last


def timeout() -> int:
    """The build's cell timeout, from _config.yml (execute: timeout)."""
    for line in (ROOT / "_config.yml").read_text().splitlines():
        if line.strip().startswith("timeout:"):
            return int(line.split(":", 1)[1].split("#")[0])
    return 300


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = [p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.ipynb"))]
    if only:
        found = [p for p in found if p.name.startswith(tuple(only))]

    def rank(path: Path) -> tuple[int, str]:
        first = next((i for i, p in enumerate(LONGEST) if path.name.startswith(p)), None)
        book = path.parent.name == "book"
        return (first if first is not None and book else len(LONGEST), str(path))

    return sorted(found, key=rank)


def run(nb, folder: str, limit: int):
    """Execute one notebook in its folder; (executed notebook, seconds, error or None)."""
    from jupyter_cache.executors.utils import single_nb_execution

    result = single_nb_execution(nb, cwd=folder, timeout=limit,
                                 allow_errors=False, meta_override=True)
    error = None if result.err is None else describe_failure(result.err, nb)
    return nb, result.time, error and error[:600]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="notebooks run at once (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 07 08")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}.")

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    CACHE.parent.mkdir(exist_ok=True)
    cache = get_cache(str(CACHE))
    todo = {}  # path -> notebook, for those not cached with their current code
    for path in notebooks(args.only):
        nb = nbformat.read(path, as_version=4)
        try:
            cache.match_cache_notebook(nb)
        except KeyError:
            todo[path] = nb
    if not todo:
        print("execute_book: every notebook is cached with its current code")
        return 0
    print(f"execute_book: running {len(todo)} notebooks, {args.jobs} at a time", flush=True)
    start, failed = time.perf_counter(), []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        limit = timeout()
        futures = {pool.submit(run, nb, str(p.parent), limit): p for p, nb in todo.items()}
        for future in as_completed(futures):
            path = futures[future]
            name = path.relative_to(ROOT).as_posix()
            nb, seconds, error = future.result()
            if error is not None:
                failed.append(name)
                print(f"  FAILED {name} after {seconds:.1f} s: {error}", flush=True)
                continue
            cache.cache_notebook_bundle(
                CacheBundleIn(nb, str(path), data={"execution_seconds": seconds}),
                check_validity=False, overwrite=True,
            )
            print(f"  {seconds:6.1f} s  {name}", flush=True)
    print(f"execute_book: {len(todo) - len(failed)} of {len(todo)} notebooks ran in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
