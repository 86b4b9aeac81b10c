"""A tiny course for the grader's tests: one notebook, three exercises (fixtures/).

``COURSE`` is what the generated manifest holds for a real chapter; ``notebook()``
writes a student's notebook of it, with any cell replaced; ``ENV`` is the kernels'
environment, which can import the fixture checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat

from transformer_book.grading import Course

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "99_fixture.ipynb"
MODULE = "grading_fixture"
EXERCISES = [("99.1", "Add one", "add_one"), ("99.2", "Double", "double"),
             ("99.3", "Square", "square")]
COURSE = Course(
    {
        NAME: [
            {
                "source": f"check_{name}({name})",
                "exercises": [{"check": f"check_{name}", "module": MODULE,
                               "number": number, "title": title}],
            }
            for number, title, name in EXERCISES
        ]
    }
)
SETUP = f"import torch\nfrom {MODULE} import check_add_one, check_double, check_square"
SOLUTIONS = {
    "add_one": "def add_one(x):\n    return x + 1",
    "double": "def double(x):\n    return 2 * x",
    "square": "def square(x):\n    return x * x",
}
STUB = "def {name}(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(HERE / "fixtures"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
}


def cells(solved=("add_one", "double", "square"), **replace: str | None) -> list[str]:
    """The notebook's code cells; ``replace`` maps "setup", a function name or
    "check_<name>" to new source (None deletes the cell)."""
    sources = {"setup": SETUP}
    order = ["setup"]
    for _, _, name in EXERCISES:
        sources[name] = SOLUTIONS[name] if name in solved else STUB.format(name=name)
        sources[f"check_{name}"] = f"check_{name}({name})"
        order += [name, f"check_{name}"]
    sources.update(replace)
    return [sources[key] for key in order if sources[key] is not None]


def notebook(path: Path, code: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Exercises 99: fixtures")]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in code]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
