"""Transformers, block by block: the companion package.

The model modules are generated from the chapters (``python tools/generate.py``); the
checks and the grader are written by hand.
"""

from .attention import scaled_dot_product_attention
from .masking import causal_mask, padding_mask
from .multihead import MultiHeadAttention
from .norm import AddNorm, LayerNorm, PreNormResidual
from .residual import Residual

__all__ = [
    "scaled_dot_product_attention",  # chapter 2
    "MultiHeadAttention",  # chapter 3
    "causal_mask",  # chapter 4
    "padding_mask",
    "Residual",  # chapter 5
    "LayerNorm",  # chapter 6
    "AddNorm",
    "PreNormResidual",
]
__version__ = "0.1.0"
