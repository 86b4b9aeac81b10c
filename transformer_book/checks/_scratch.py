"""Kept for the chapters whose checks still import from here: the one refusal mechanism
is :func:`transformer_book.checks._core.refused` (``refused_calls`` is its old name)."""

from ._core import attention_functions, refused

refused_calls = refused

__all__ = ["attention_functions", "refused_calls"]
