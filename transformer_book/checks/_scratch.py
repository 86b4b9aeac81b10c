"""Make sure an exercise is written from scratch, not as a call of the function it copies.

``_core.forbidden`` patches attributes such as ``torch.softmax``, which student code looks
up when it runs. That does not reach a function the notebook imported by name
(``from transformer_book.attention import scaled_dot_product_attention``): the
notebook's global then still holds the original. :func:`refused_calls` patches both the
attributes and every global (or closure variable) of the student's code that is bound to
one of the functions.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from ._core import CheckFailure


def attention_functions() -> list[tuple[object, str]]:
    """(owner, attribute) of every ready-made attention function an exercise may forbid."""
    import transformer_book
    import transformer_book.attention
    import transformer_book.multihead

    return [
        (transformer_book, "scaled_dot_product_attention"),
        (transformer_book.attention, "scaled_dot_product_attention"),
        (transformer_book.multihead, "scaled_dot_product_attention"),
        (F, "scaled_dot_product_attention"),
        (torch._C._nn, "scaled_dot_product_attention"),
        (F, "multi_head_attention_forward"),
    ]


def _student_functions(student) -> list:
    """The plain functions behind the student's function or class methods."""
    functions = []
    if inspect.isclass(student):
        for klass in student.__mro__:  # the student's classes, not torch's or object
            if klass.__module__.split(".")[0] in ("torch", "builtins"):
                continue
            for value in vars(klass).values():
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isfunction(value):
                    functions.append(value)
    elif inspect.isfunction(student) or inspect.ismethod(student):
        functions.append(getattr(student, "__func__", student))
    return functions


@contextlib.contextmanager
def refused_calls(students, targets, message: str):
    """While active, calling any (owner, attribute) in ``targets`` raises CheckFailure(message).

    ``students`` are the student's functions or classes: names in their global namespace
    (and variables of their closures) bound to one of the targets are refused too. Everything is restored on exit.
    """

    def refuse(*args, **kwargs):
        raise CheckFailure(message)

    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    originals = {id(original) for _, _, original in saved}
    functions = [f for student in students for f in _student_functions(student)]
    rebound, scopes, cells = [], {}, []
    for function in functions:
        scopes[id(function.__globals__)] = function.__globals__
        for cell in function.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if id(cell.cell_contents) in originals:
                    cells.append((cell, cell.cell_contents))
    for scope in scopes.values():
        for name, value in list(scope.items()):
            if id(value) in originals:
                rebound.append((scope, name, value))
    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse)
        for scope, name, _ in rebound:
            scope[name] = refuse
        for cell, _ in cells:
            cell.cell_contents = refuse
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        for scope, name, original in rebound:
            scope[name] = original
        for cell, original in cells:
            cell.cell_contents = original
