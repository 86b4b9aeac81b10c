"""The machinery every exercise check shares.

A check is a function decorated with :func:`exercise`. It receives the student's
function or class, compares it with a reference on several inputs, and either prints
one short line or raises :class:`CheckFailure` (an ``AssertionError``) whose message
says what is wrong and the likely misconception.

Every check is written in one form: its cases (inputs), its reference, and tables of
:class:`Mistake` (each a wrong implementation with the student's signature and the
message that names it, tried in table order), :class:`Hint` (a crash of the student's
code and what it usually means), the common properties (``expect_shape``,
``expect_unchanged``, ``expect_dtype``, ``expect_gradient``, ``refused``) and, for what
is not an output match, a short list of named probes. The tables are registered with
the check (``@exercise(..., mistakes={parameter: table})``); tests/test_checks_all.py
hands every wrong implementation of every table to its check and expects its message.

When the environment variable ``TRANSFORMER_BOOK_GRADE_LOG`` names a file, every check
appends one JSON line to it (``python -m transformer_book.grade`` reads them).

In Jupyter and Colab a failed check shows as its message under a ✗ and the exercise's
label, not as a traceback through this module: IPython renders an exception that has a
``_render_traceback_`` method with it. When the student's own code crashed, the frames
of the student's code are shown below the message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
import sysconfig
import traceback
from collections.abc import Callable
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
    def __init__(self, func, number: str, title: str, mistakes=None):
        self.func, self.number, self.title = func, number, title
        # parameter name -> the Mistake and Caught entries of the student's code in it
        self.mistakes: dict[str, list] = dict(mistakes or {})
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


def exercise(number: str, title: str, mistakes=None):
    """Register a check for exercise ``number`` (e.g. ``"2.1"``) called ``title``.

    ``mistakes`` maps a parameter of the check (the student's function or class) to its
    table of :class:`Mistake` and :class:`Caught` entries, from which the tests are made.
    """

    def decorate(func):
        other = REGISTRY.get(func.__name__)
        if other is not None and other.func.__module__ != func.__module__:
            raise RuntimeError(
                f"two checks are called {func.__name__} ({other.func.__module__} and "
                f"{func.__module__}): check names must be unique across chapters."
            )
        check = Exercise(func, number, title, mistakes)
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


@dataclasses.dataclass(frozen=True)
class Hint:
    """A crash of the student's code and what it usually means.

    When the student's code raises ``error`` (a type) whose text contains ``text``,
    ``message`` is added to the one-sentence failure.
    """

    error: type
    text: str
    message: str


def call(fn, *args, what: str = "your function", hints=(), **kwargs):
    """Call student code; turn an unexpected crash into a one-sentence failure.

    ``hints`` (:class:`Hint`) add what a known crash usually means.
    """
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailure, CheckUsageError):
        raise
    except Exception as error:  # noqa: BLE001 - any crash in student code is a failed check
        shapes = ", ".join(
            str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args
        )
        message = f"{what} raised {type(error).__name__}: {error} (inputs: {shapes})."
        for hint in hints:
            if isinstance(error, hint.error) and hint.text in str(error):
                message += " " + hint.message
        raise CheckFailure(message) from error


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
    """Whether ``actual`` is a tensor of ``expected``'s shape, equal to it within tolerance
    (a Python number counts as a 0-d float64 tensor)."""
    actual, expected = (torch.tensor(float(v), dtype=torch.float64)
                        if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                        for v in (actual, expected))
    if expected is None or not isinstance(actual, torch.Tensor):
        return False
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    actual = actual.detach().to(expected.dtype)
    return bool(torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan))


def expect_unchanged(before: torch.Tensor, after: torch.Tensor, name: str) -> None:
    """Fail when student code modified its input ``name`` in place."""
    if not torch.equal(before, after):
        fail(
            f"your code changed its input `{name}` in place (e.g. `x -= ...` or "
            "`x.sub_(...)`): compute a new tensor instead (`x - ...`)."
        )


def expect_dtype(value: torch.Tensor, dtype, message: str) -> None:
    """Fail with ``message`` unless ``value`` has ``dtype``."""
    if value.dtype != dtype:
        fail(message)


def expect_gradient(value: torch.Tensor, message: str) -> None:
    """Fail with ``message`` when ``value`` carries no gradient (no_grad, detach, .data)."""
    if not value.requires_grad:
        fail(message)


def expect_finite(value: torch.Tensor, what: str, hint: str) -> None:
    """Fail with "{what} contains NaN/inf: {hint}" unless every entry is finite."""
    if not torch.isfinite(value).all():
        bad = "NaN" if torch.isnan(value).any() else "inf"
        fail(f"{what} contains {bad}: {hint}")


def randn(*shape, seed: int, scale=1.0, shift=0.0, dtype=torch.float32) -> torch.Tensor:
    """A standard normal draw from its own generator (the global one is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    scale, shift = (torch.as_tensor(v, dtype=torch.float64) for v in (scale, shift))
    return (x * scale + shift).to(dtype)


def fmt(shape) -> str:
    """A shape as (2, 3) (and a one-dim shape as (3), as students write it)."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def with_weights_of(module, *inputs, build, state=None, training=False):
    """``run`` for a table of wrong classes (see :func:`name_mistake`): each is built by
    ``build(wrong_class)`` like the student's ``module``, given its weights and buffers (or
    ``state``, a state_dict saved earlier), put in eval mode (train mode with ``training``)
    and applied to ``inputs``."""

    def run(wrong_class):
        twin = build(wrong_class).train(training)
        twin.load_state_dict(module.state_dict() if state is None else state, strict=False)
        with torch.no_grad():
            return twin(*inputs)

    return run


def first_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    """Where two tensors of one shape first differ, in words."""
    where = tuple(int(i) for i in (got != expected).nonzero()[0])
    return f"at index {where} you have {got[where].item()}, expected {expected[where].item()}"


# ----------------------------------------------------------------------- ready-made calls


class _Refused:
    """Stands in for a refused function (and for its overloads, ``aten.softmax.int``)."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise CheckFailure(self.message)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self


def aten(*names: str) -> list[tuple[object, str]]:
    """(owner, attribute) of operators in ``torch.ops.aten`` (absent ones are skipped)."""
    return [(torch.ops.aten, name) for name in names]


def _student_functions(student) -> list:
    """The plain functions behind the student's function or class methods."""
    if not inspect.isclass(student):
        function = getattr(student, "__func__", student)
        return [function] if inspect.isfunction(function) else []
    functions = []
    for klass in student.__mro__:  # the student's classes, not torch's or object
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                functions.append(value)
    return functions


@contextlib.contextmanager
def refused(students, targets, message: str):
    """While active, calling any (owner, attribute) in ``targets`` raises CheckFailure(message).

    The one way an exercise is kept from calling the ready-made function it copies.
    ``students`` are the student's functions or classes: names in their globals (and
    variables of their closures) bound to a target are refused too, so a function the
    notebook imported by name is caught as well as ``torch.softmax``; list operators of
    ``torch.ops.aten`` with :func:`aten`. Everything is restored on exit.
    """
    refuse = _Refused(message)
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    originals = {id(original) for _, _, original in saved}
    functions = [f for student in students for f in _student_functions(student)]
    scopes = {id(f.__globals__): f.__globals__ for f in functions}
    rebound = [
        (scope, name, value)
        for scope in scopes.values()
        for name, value in list(scope.items())
        if id(value) in originals
    ]
    cells = []
    for function in functions:
        for cell in function.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if id(cell.cell_contents) in originals:
                    cells.append((cell, cell.cell_contents))
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


def attention_functions() -> list[tuple[object, str]]:
    """(owner, attribute) of every ready-made attention function an exercise may refuse."""
    import torch.nn.functional as F

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
        (torch, "_native_multi_head_attention"),
        (torch, "_scaled_dot_product_attention_math"),
        *aten(
            "scaled_dot_product_attention",
            "_scaled_dot_product_attention_math",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_native_multi_head_attention",
        ),
    ]


# ----------------------------------------------------------------------- the mistakes table


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A realistic wrong answer, written once, and the message that names it.

    ``wrong`` has the student's signature (often a small change of the reference,
    ``functools.partial(variant, option=...)``). On a case, :func:`name_mistake` runs it
    on the case's arguments and fails with ``message`` (a string, or a function of the
    arguments) when the student's output equals its output; ``when`` (of the arguments)
    limits the cases where it is tried, and ``symptom(actual, *args)`` replaces the
    comparison where the mistake shows in a property of the output. The generated test
    hands ``wrong`` to the check and expects ``expect`` (a regex; by default the message).
    """

    message: str | Callable[..., str]
    wrong: Callable
    when: Callable[..., bool] | None = None
    symptom: Callable[..., bool] | None = None
    expect: str | None = None

    def says(self, *args, **kwargs) -> str:
        return self.message(*args, **kwargs) if callable(self.message) else self.message

    @property
    def pattern(self) -> str:
        return self.expect if self.expect is not None else _escape(self.message)


@dataclasses.dataclass(frozen=True)
class Caught:
    """A realistic wrong answer caught by a property, crash hint, refusal or probe.

    Only the generated test uses it: it hands ``wrong`` to the check and expects ``expect``.
    """

    wrong: Callable
    expect: str

    @property
    def pattern(self) -> str:
        return self.expect


def _escape(message) -> str:
    return re.escape(message)


def name_mistake(actual, table, *args, pick=None, general=None, prefix="", atol=1e-5, rtol=1e-4,
                 run=None, equal_nan=False, **kwargs) -> None:
    """Fail with the message of the first :class:`Mistake` in ``table`` that ``actual`` matches.

    Each mistake's wrong implementation runs on ``args``/``kwargs`` (skipped when it does
    not fit them), or through ``run(wrong)`` when given (a wrong class: build it with the
    student's weights and call it); ``pick`` selects the compared part of a result (e.g.
    the weights of an (output, weights) pair). When none matches and ``general`` is
    given, fail with it.
    """
    for mistake in table:
        if not isinstance(mistake, Mistake) or (mistake.when and not mistake.when(*args, **kwargs)):
            continue
        if mistake.symptom is not None:
            hit = mistake.symptom(actual, *args, **kwargs)
        else:
            with torch.no_grad():
                wrong = _attempt_wrong(mistake, args, kwargs, run)
            if wrong is not None and pick is not None:
                wrong = pick(wrong)
            hit = same(actual, wrong, atol=atol, rtol=rtol, equal_nan=equal_nan)
        if hit:
            fail(prefix + mistake.says(*args, **kwargs))
    if general is not None:
        fail(general)


def _attempt_wrong(mistake: Mistake, args, kwargs, run=None):
    """The wrong implementation's result on this case, or None when it does not fit it."""
    try:
        return run(mistake.wrong) if run is not None else mistake.wrong(*args, **kwargs)
    except (RuntimeError, IndexError, ValueError, TypeError):
        return None
