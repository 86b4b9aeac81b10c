"""The machinery every exercise check shares.

A check is a function decorated with :func:`exercise`. It receives the student's
function or class, compares it with a reference on several inputs, and either prints
one short line or raises :class:`CheckFailure` (an ``AssertionError``) whose message
says what is wrong and the likely misconception.

When the environment variable ``TRANSFORMER_BOOK_GRADE_LOG`` names a file, every check
appends one JSON line to it (``python -m transformer_book.grade`` reads them).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os

import torch

GRADE_LOG = "TRANSFORMER_BOOK_GRADE_LOG"
REGISTRY: dict[str, Exercise] = {}


class CheckFailure(AssertionError):
    """A check found a mistake; the message says which one."""


class CheckUsageError(TypeError):
    """A check was called with the wrong kind of argument."""


class Exercise:
    def __init__(self, func, number: str, title: str):
        self.func, self.number, self.title = func, number, title
        self.name = func.__name__
        functools.update_wrapper(self, func)

    @property
    def label(self) -> str:
        return f"Exercise {self.number}: {self.title}"

    def __call__(self, *args, **kwargs):
        # The check's own frames say nothing to a student: failures are re-raised from
        # here with their traceback cut, so the message is what the notebook shows.
        __tracebackhide__ = True  # noqa: F841 (read by pytest and IPython)
        try:
            self.func(*args, **kwargs)
        except CheckFailure as failure:
            _log(self, False, str(failure))
            raise failure.with_traceback(None)  # noqa: B904 (the cause, if any, is kept)
        except NotImplementedError as error:
            message = (
                "not done yet: replace `raise NotImplementedError()` with your code, "
                "then run this cell again."
            )
            _log(self, False, message)
            raise CheckFailure(message) from error
        except CheckUsageError as error:
            _log(self, False, str(error))
            raise error.with_traceback(None)  # noqa: B904
        _log(self, True, "passed")
        print(f"✓ {self.label}: passed")

    def __repr__(self) -> str:
        return f"<check {self.name}: {self.label}>"


def exercise(number: str, title: str):
    """Register a check for exercise ``number`` (e.g. ``"2.1"``) called ``title``."""

    def decorate(func):
        other = REGISTRY.get(func.__name__)
        if other is not None and other.func.__module__ != func.__module__:
            raise RuntimeError(
                f"two checks are called {func.__name__} ({other.func.__module__} and "
                f"{func.__module__}): check names must be unique across chapters."
            )
        check = Exercise(func, number, title)
        REGISTRY[check.name] = check
        return check

    return decorate


def _log(check: Exercise, passed: bool, message: str) -> None:
    path = os.environ.get(GRADE_LOG)
    if not path:
        return
    record = {"check": check.name, "exercise": check.label, "passed": passed, "message": message}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- helpers


def expect_callable(obj, what: str, example: str) -> None:
    """Fail with one sentence when a check is handed something that is not callable."""
    if not callable(obj):
        raise CheckUsageError(
            f"This check expects {what}, e.g. {example}; it got a {type(obj).__name__}."
        )


def expect_class(obj, base, what: str, example: str) -> None:
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise CheckUsageError(
            f"This check expects {what} (a subclass of {base.__name__}), e.g. {example}; "
            f"it got {obj!r:.60}."
        )


def call(fn, *args, what: str = "your function", **kwargs):
    """Call student code; turn an unexpected crash into a one-sentence failure."""
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailure, CheckUsageError):
        raise
    except Exception as error:  # noqa: BLE001 - any crash in student code is a failed check
        shapes = ", ".join(
            str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args
        )
        raise CheckFailure(
            f"{what} raised {type(error).__name__}: {error} (inputs: {shapes})."
        ) from error


def fail(message: str):
    raise CheckFailure(message)


def expect_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail(f"{what} should be a torch.Tensor, but it is a {type(value).__name__}.")
    return value


def expect_shape(value, shape, what: str) -> torch.Tensor:
    value = expect_tensor(value, what)
    if tuple(value.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
    return value


def expect_close(actual, expected, message: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail with ``message`` (plus the largest difference) unless the tensors agree."""
    actual = expect_tensor(actual, "your result")
    if actual.shape != expected.shape:
        fail(f"{message} (shape {tuple(actual.shape)}, expected {tuple(expected.shape)})")
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        fail(f"{message} (your result contains NaN)")
    if not torch.allclose(actual.to(expected.dtype), expected, atol=atol, rtol=rtol):
        worst = (actual.to(expected.dtype) - expected).abs().max().item()
        fail(f"{message} (largest difference {worst:.3g})")


def same(actual, expected, atol: float = 1e-5, rtol: float = 1e-4, equal_nan: bool = False) -> bool:
    """Whether ``actual`` is a tensor of ``expected``'s shape, equal to it within tolerance."""
    if expected is None or not isinstance(actual, torch.Tensor):
        return False
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    actual = actual.detach().to(expected.dtype)
    return bool(torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan))


def attempt(compute):
    """The value of a would-be wrong answer, or None when its shapes do not fit this case."""
    try:
        return compute()
    except RuntimeError:
        return None


def diagnose(actual, candidates, general: str | None = None, **tolerance) -> None:
    """Name the mistake: fail with the message of the first candidate ``actual`` matches.

    ``candidates`` holds (wrong answer, message) pairs; a wrong answer is a tensor, None
    (skipped), or a function computing it (skipped when its shapes do not fit). When
    nothing matches and ``general`` is given, fail with ``general``.
    """
    for wrong, message in candidates:
        if callable(wrong):
            wrong = attempt(wrong)
        if same(actual, wrong, **tolerance):
            fail(message)
    if general is not None:
        fail(general)


def expect_unchanged(before: torch.Tensor, after: torch.Tensor, name: str) -> None:
    """Fail when student code modified its input ``name`` in place."""
    if not torch.equal(before, after):
        fail(
            f"your code changed its input `{name}` in place (e.g. `x -= ...` or "
            "`x.sub_(...)`): compute a new tensor instead (`x - ...`)."
        )


@contextlib.contextmanager
def forbidden(targets, message: str):
    """While active, each existing (owner, attribute) in ``targets`` raises CheckFailure(message).

    Used to make sure an exercise is written from scratch, not with the built-in it
    is compared with. The originals are always restored.
    """

    def refuse(*args, **kwargs):
        raise CheckFailure(message)

    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
