"""CI runs exactly the README's two commands (nothing weaker)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    sections = re.findall(
        r"\*\*(Set up and build the book|Run all tests)\*\*.*?```bash\n(.+?)\n```", text, re.S
    )
    return [command.strip() for _, command in sections]


def test_readme_gives_the_two_commands():
    setup, tests = readme_commands()
    assert "pip install" in setup and "requirements.txt" in setup
    assert "jupyter-book build . -W -n --keep-going" in setup
    assert tests.endswith("pytest")


def test_ci_runs_the_readme_commands_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in readme_commands():
        assert command in ci_lines, f".ci/run does not run the README's command: {command}"


def test_pytest_does_not_collect_build_outputs_or_stubs():
    config = (ROOT / "pyproject.toml").read_text()
    for folder in ("_build", ".venv", "exercises"):
        assert f'"{folder}"' in config.split("norecursedirs", 1)[1].split("\n", 1)[0]
