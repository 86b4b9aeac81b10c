"""The machinery every exercise check shares.

A check is a function decorated with :func:`exercise`. It receives the student's
function or class, compares it with a reference on several inputs, and either prints
one short line or raises :class:`CheckFailure` (an ``AssertionError``) whose message
says what is wrong and the likely misconception.

When the environment variable ``TRANSFORMER_BOOK_GRADE_LOG`` names a file, every check
appends one JSON line to it (``python -m transformer_book.grade`` reads them).

In Jupyter and Colab a failed check shows as its message under a ✗ and the exercise's
label, not as a traceback through this module: IPython renders an exception that has a
``_render_traceback_`` method with it. When the student's own code crashed, the frames
of the student's code are shown below the message.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sysconfig
import traceback
from pathlib import Path

import torch

GRADE_LOG = "TRANSFORMER_BOOK_GRADE_LOG"
REGISTRY: dict[str, Exercise] = {}


_PACKAGE = Path(__file__).resolve().parents[1]  # transformer_book/
_LIBRARIES = {
    str(Path(p).resolve())
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
}
_RED, _BOLD, _RESET = "\x1b[31m", "\x1b[1m", "\x1b[0m"


class _ShownAsMessage:
    """Mixin: IPython shows the exception as its message, under the exercise's label."""

    exercise: str | None = None  # set by the check that raised it

    def _render_traceback_(self) -> list[str]:
        head = f"✗ {self.exercise}" if self.exercise else "✗ check failed"
        lines = [f"{_RED}{_BOLD}{head}{_RESET}", *str(self).splitlines()]
        cause = self.__cause__
        if cause is not None and not isinstance(cause, NotImplementedError):
            frames = _student_traceback(cause)
            if frames:
                lines += ["", "Where your code raised it:", *frames]
        return lines


class CheckFailure(_ShownAsMessage, AssertionError):
    """A check found a mistake; the message says which one."""


class CheckUsageError(_ShownAsMessage, TypeError):
    """A check was called with the wrong kind of argument."""


def _is_library(filename: str) -> bool:
    """Whether a frame's file belongs to Python, an installed package or this package."""
    if filename.startswith("<frozen"):
        return True
    path = str(Path(filename).resolve())
    return path.startswith(str(_PACKAGE)) or any(path.startswith(lib) for lib in _LIBRARIES)


def _student_traceback(error: BaseException) -> list[str]:
    """The lines of ``error``'s traceback from the first frame of the student's code on."""
    tb = error.__traceback__
    while tb is not None and _is_library(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    if tb is None:
        return []  # no frame of the student's code: nothing of theirs to show
    try:  # in IPython: its own formatting ("Cell In[3], line 4"), colours included
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return list(shell.InteractiveTB.structured_traceback(type(error), error, tb))
    except Exception:  # noqa: BLE001, S110 - fall back to the plain format below
        pass
    return [
        line.rstrip("\n")
        for line in traceback.format_exception(type(error), error, tb, chain=False)
    ]


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
            # Building the student's modules draws from the global generator: fork it, so
            # that running a check leaves the notebook's seeded random stream untouched.
            with torch.random.fork_rng(devices=[]):
                self.func(*args, **kwargs)
        except (CheckFailure, CheckUsageError) as failure:
            failure.exercise = self.label
            _log(self, False, str(failure))
            raise failure.with_traceback(None)  # noqa: B904 (the cause, if any, is kept)
        except NotImplementedError as error:
            message = (
                "not done yet: replace `raise NotImplementedError()` with your code, "
                "then run this cell again."
            )
            raise self._failure(message) from error
        except Exception as error:  # noqa: BLE001 - the check's own computation crashed
            raise self._failure(_crash_message(error)) from error
        _log(self, True, "passed")
        print(f"✓ {self.label}: passed")

    def _failure(self, message: str) -> CheckFailure:
        _log(self, False, message)
        failure = CheckFailure(message)
        failure.exercise = self.label
        return failure

    def __repr__(self) -> str:
        return f"<check {self.name}: {self.label}>"


def _crash_message(error: Exception) -> str:
    """The finding when a check's own computation (not the student's call) crashed.

    This happens when the student's result breaks what the check does with it next,
    typically autograd after the student's code changed a tensor in place.
    """
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" Hint: ")[0]  # autograd's hint is about debugging tools, not the fix
    message = f"checking your result raised {type(error).__name__}: {text}".rstrip(": ")
    if "inplace operation" in text or "in-place operation" in text:
        message += (
            " Your code changes in place a tensor that autograd still needs (e.g. "
            "`y /= ...`, `y.exp_()`, `y[...] = ...` after computing y): compute a new "
            "tensor instead (`y = y / ...`)."
        )
    return message if message.endswith(".") else message + "."


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
