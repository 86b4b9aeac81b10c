"""add_to_class: how a later chapter adds to a class that an earlier chapter built.

In a chapter, ``@add_to_class(MultiHeadAttention)`` above a ``def`` sets that function
as a method of the class (a new method, or one that replaces the earlier chapter's),
so the chapter shows only the code it adds. In an exported cell (``#| export MODULE``),
``tools/generate.py`` writes the method into the class's body in the generated module,
so the package holds one class with everything the chapters added.
"""


def add_to_class(cls):
    """Decorator: make the decorated function a method of ``cls`` (d2l's pattern)."""

    def register(function):
        setattr(cls, function.__name__, function)
        return function

    return register
