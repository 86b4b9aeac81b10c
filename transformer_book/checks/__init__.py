"""Exercise checks, one module per chapter (``transformer_book.checks.ch02`` ...).

Each check takes your function or class, compares it with a reference on several
inputs and edge cases, prints one line when it passes and raises ``CheckFailure``
(an ``AssertionError``) naming the likely mistake when it does not.
"""

from . import ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09  # noqa: F401  (registers the checks)
from ._core import REGISTRY, CheckFailure, CheckUsageError

__all__ = [
    "REGISTRY",
    "CheckFailure",
    "CheckUsageError",
    "ch01",
    "ch02",
    "ch03",
    "ch04",
    "ch05",
    "ch06",
    "ch07",
    "ch08",
    "ch09",
]
