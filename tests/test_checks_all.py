"""What every exercise check must do, for every check cell of every solutions notebook.

Each check passes the notebook's own solution (leaving the global random state as it
found it), fails the generated stub with a
CheckFailure caused by the stub's NotImplementedError, refuses a tensor in place of
the student's code with one sentence, and turns a crash of the student's code into one
sentence. Every wrong implementation in a check's tables of mistakes gets the message
that names it. The chapter files (test_checks_chNN.py) keep what the tables cannot
express.
"""

from __future__ import annotations

import ast
import inspect
from functools import cache
from pathlib import Path

import nbformat
import pytest
import torch
from notebook_code import namespace

from transformer_book.checks import REGISTRY, CheckFailure, CheckUsageError
from transformer_book.checks._core import Caught, Mistake

ROOT = Path(__file__).resolve().parents[1]


def check_calls() -> list[tuple[str, str, tuple[str, ...]]]:
    """(notebook, check name, names of the arguments) for every check cell."""
    calls = []
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id.startswith("check_")
                ):
                    args = tuple(a.id for a in node.args if isinstance(a, ast.Name))
                    calls.append((path.name, node.func.id, args))
    return calls


CALLS = check_calls()
IDS = [f"{notebook[:2]}-{check}" for notebook, check, _ in CALLS]


@cache
def loaded(folder: str, notebook: str) -> dict:
    return namespace(f"{folder}/{notebook}")


def test_every_registered_check_is_used_by_a_solution_notebook():
    assert len(CALLS) >= 12
    assert sorted(REGISTRY) == sorted(check for _, check, _ in CALLS)


@pytest.mark.parametrize("notebook, check, args", CALLS, ids=IDS)
def test_passes_the_solution_and_leaves_the_random_state_alone(notebook, check, args, capsys):
    scope = loaded("solutions", notebook)
    state = torch.get_rng_state()
    REGISTRY[check](*(scope[a] for a in args))
    assert "passed" in capsys.readouterr().out
    # a check draws its inputs from its own generator: the notebook's seed stays in force
    assert torch.equal(torch.get_rng_state(), state), "the check changed the global RNG"


@pytest.mark.parametrize("notebook, check, args", CALLS, ids=IDS)
def test_fails_the_stub_because_it_is_not_implemented(notebook, check, args):
    scope = loaded("exercises", notebook)
    with pytest.raises(CheckFailure, match="^not done yet") as info:
        REGISTRY[check](*(scope[a] for a in args))
    assert isinstance(info.value.__cause__, NotImplementedError)


@pytest.mark.parametrize("notebook, check, args", CALLS, ids=IDS)
def test_refuses_a_tensor_with_one_sentence(notebook, check, args):
    with pytest.raises(CheckUsageError, match=r"^This check expects [^\n]*\.$"):
        REGISTRY[check](*(torch.zeros(3) for _ in args))


@pytest.mark.parametrize("notebook, check, args", CALLS, ids=IDS)
def test_a_crash_in_student_code_becomes_one_sentence(notebook, check, args):
    def crashes(*_args, **_kwargs):
        raise ValueError("boom")

    class Crashes(torch.nn.Module):
        def __init__(self, *_args, **_kwargs):
            raise ValueError("boom")

    scope = loaded("solutions", notebook)
    stand_ins = [Crashes if isinstance(scope[a], type) else crashes for a in args]
    with pytest.raises(CheckFailure, match=r"raised ValueError: boom") as info:
        REGISTRY[check](*stand_ins)
    assert "\n" not in str(info.value)


def table_entries() -> list[tuple[str, str, tuple[str, ...], str, object]]:
    """(notebook, check, arguments, parameter, entry) for every entry of every table."""
    entries = []
    for notebook, check, args in CALLS:
        for parameter, table in REGISTRY[check].mistakes.items():
            entries += [(notebook, check, args, parameter, entry) for entry in table]
    return entries


ENTRIES = table_entries()


def test_every_table_belongs_to_a_parameter_of_its_check():
    for check in REGISTRY.values():
        parameters = list(inspect.signature(check.func).parameters)
        for parameter, table in check.mistakes.items():
            assert parameter in parameters, (check.name, parameter)
            assert all(isinstance(entry, (Mistake, Caught)) for entry in table), check.name


@pytest.mark.parametrize(
    "notebook, check, args, parameter, entry", ENTRIES,
    ids=[f"{e[1]}-{i}" for i, e in enumerate(ENTRIES)],
)
def test_names_every_mistake_of_its_tables(notebook, check, args, parameter, entry):
    """Each wrong implementation in place of the solution gets the message that names it."""
    scope = loaded("solutions", notebook)
    parameters = list(inspect.signature(REGISTRY[check].func).parameters)
    students = [
        entry.wrong if name == parameter else scope[a] for name, a in zip(parameters, args)
    ]
    with pytest.raises(CheckFailure, match=entry.pattern):
        REGISTRY[check](*students)
