"""A chapter runs the way Colab runs it.

On Colab a notebook arrives alone: no repository beside it, the package installed by
pip (not editable) from the repository URL in _config.yml. Here the package is built
and installed non-editable into an empty folder, the notebook is copied alone into an
empty temporary directory, and it is executed in a kernel that sees that install first.
A first injected cell pretends to be Colab, so the setup cell's install branch runs
too, with pip replaced by a recorder (no network here).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import generate  # noqa: E402

PRETEND_COLAB = """\
import subprocess, sys, types
sys.modules["google"] = types.ModuleType("google")
sys.modules["google.colab"] = types.ModuleType("google.colab")
_pip_calls = []
_real_run = subprocess.run
def _record(command, *args, **kwargs):
    if "pip" in command:
        _pip_calls.append(list(command))
        return subprocess.CompletedProcess(command, 0)
    return _real_run(command, *args, **kwargs)
subprocess.run = _record
"""

REPORT = """\
import transformer_book
import transformer_book.checks
import transformer_book.grade
print("PACKAGE", transformer_book.__file__)
print("CHECKS", transformer_book.checks.__file__)
print("PIP", _pip_calls)
"""


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory):
    target = tmp_path_factory.mktemp("site-packages")
    source = tmp_path_factory.mktemp("source")  # build from a copy: no build/ in the repo
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "transformer_book", source / "transformer_book",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        cwd=target,
    )
    assert (target / "transformer_book" / "__init__.py").exists()
    assert not list(target.glob("__editable__*")), "the install must not be editable"
    return target


def test_chapter_runs_alone_with_a_non_editable_install(site_packages, tmp_path):
    chapter = ROOT / "book" / "02_scaled_dot_product_attention.ipynb"  # imports the package
    work = tmp_path / "colab"
    work.mkdir()
    nb = nbformat.read(chapter, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PRETEND_COLAB))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site_packages), PYTHONNOUSERSITE="1", MPLBACKEND="Agg")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    client.execute(env=env, cwd=str(work))

    report = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    package = Path(report.split("PACKAGE ", 1)[1].splitlines()[0])
    assert package.is_relative_to(site_packages), f"imported {package}, not the installed copy"
    checks = Path(report.split("CHECKS ", 1)[1].splitlines()[0])
    assert checks.is_relative_to(site_packages), "the checks must ship with the package"
    url = generate.repository_url()
    assert f"transformer_book @ git+{url}" in report, report
