"""Transformers, block by block: the companion package.

The model modules are generated from the chapters (``python tools/generate.py``); the
checks and the grader are written by hand.
"""

from .attention import scaled_dot_product_attention

__all__ = ["scaled_dot_product_attention"]
__version__ = "0.1.0"
