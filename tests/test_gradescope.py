"""The Gradescope autograder, run the way Gradescope runs it, and the CI workflow's step.

Gradescope unpacks the autograder zip in /autograder/source, runs setup.sh once, then
for each submission puts the student's files in /autograder/submission, runs
run_autograder and reads /autograder/results/results.json. Here /autograder is a
temporary folder (AUTOGRADER_DIR); setup.sh runs with a stand-in Python that records
what it is asked to do (no network here); run_autograder grades for real.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml
from test_grade import CHAPTER, NUMBERS, ROOT, _solved

sys.path.insert(0, str(ROOT / "gradescope"))
import build  # noqa: E402

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$RECORD"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


@pytest.fixture(scope="module")
def autograder(tmp_path_factory) -> Path:
    """/autograder, with the zip unpacked in source/ as Gradescope does."""
    root = tmp_path_factory.mktemp("autograder")
    archive = build.build(root / "autograder.zip")
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert {"setup.sh", "run_autograder", "course/pyproject.toml",
                "course/transformer_book/checks/manifest.py",
                "course/transformer_book/grade.py"} <= set(names)
        for name in ("setup.sh", "run_autograder"):
            assert z.getinfo(name).external_attr >> 16 & stat.S_IXUSR, name
        z.extractall(root / "source")
    for name in ("setup.sh", "run_autograder"):
        (root / "source" / name).chmod(0o755)
    return root


def test_setup_installs_the_course_with_cpu_torch_into_a_venv(autograder, tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    record = tmp_path / "record.txt"
    env = {**os.environ, "AUTOGRADER_DIR": str(autograder), "PYTHON": str(fake),
           "RECORD": str(record)}
    subprocess.run(["bash", str(autograder / "source" / "setup.sh")], env=env, check=True,
                   capture_output=True, text=True, timeout=60)
    calls = record.read_text().splitlines()
    course = autograder / "source" / "course"
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("torch=="))
    assert calls[1] == f"-m venv {autograder / 'venv'}"
    assert calls[2].endswith(f"install --index-url https://download.pytorch.org/whl/cpu {pin}")
    assert calls[3].endswith(f"install --constraint {course / 'requirements.txt'} {course}")


def _run_autograder(autograder: Path, files: dict[str, nbformat.NotebookNode | str]) -> dict:
    submission = autograder / "submission"
    shutil.rmtree(submission, ignore_errors=True)
    submission.mkdir()
    for name, content in files.items():
        if isinstance(content, str):
            (submission / name).write_text(content)
        else:
            nbformat.write(content, submission / name)
    env = {**os.environ, "AUTOGRADER_DIR": str(autograder), "PYTHON": sys.executable,
           "GRADE_TIMEOUT": "60"}
    result = subprocess.run([str(autograder / "source" / "run_autograder")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((autograder / "results" / "results.json").read_text())


def test_a_submission_gets_one_test_per_exercise(autograder):
    results = _run_autograder(autograder, {CHAPTER: _solved(1)[0], "notes.txt": "hi"})
    assert results["score"] == 1.0
    assert [t["number"] for t in results["tests"]] == NUMBERS
    assert [t["score"] for t in results["tests"]] == [1.0] + [0.0] * (len(NUMBERS) - 1)
    for test in results["tests"]:
        assert test["name"].startswith(f"Exercise {test['number']}: ")
        assert test["max_score"] == 1.0 and test["visibility"] == "visible"
    assert results["tests"][1]["output"].startswith("not done yet")
    assert f"{CHAPTER}: score 1/{len(NUMBERS)}" in results["output"]


def test_a_submission_without_a_notebook_gets_zero_and_the_reason(autograder):
    results = _run_autograder(autograder, {"answers.txt": "I did it"})
    assert results["score"] == 0 and results["tests"] == []
    assert "no exercise notebook" in results["output"]


# ----------------------------------------------------------------------------- CI workflow


def test_the_workflows_grading_step_grades_and_summarises(tmp_path):
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "grade.yml").read_text())
    steps = workflow["jobs"]["grade"]["steps"]
    step = next(s for s in steps if s.get("id") == "grade")
    (tmp_path / "exercises").mkdir()
    nbformat.write(_solved()[0], tmp_path / "exercises" / CHAPTER)
    summary = tmp_path / "summary.md"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary), "NOTEBOOKS": "exercises",
           "GRADE_TIMEOUT": "60",  # and `python` is the Python running the tests:
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    result = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "grades" / "grades.csv").exists()
    report = json.loads((tmp_path / "grades" / "grades.json").read_text())
    assert report["passed"] == report["total"] == len(NUMBERS)
    assert f"score {len(NUMBERS)}/{len(NUMBERS)}" in summary.read_text()
