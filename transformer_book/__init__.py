"""Transformers, block by block: the companion package.

The model modules are generated from the chapters (``python tools/generate.py``); the
checks and the grader are written by hand.
"""

from .attention import scaled_dot_product_attention
from .decoding import cache_nbytes, use_fused_attention
from .gpt import GPT, BytePairEncoding, decoder_block, filter_probs, generate, sample
from .masking import causal_mask, padding_mask
from .model import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    PositionalEncoding,
    Transformer,
    copy_torch_transformer_weights,
    greedy_decode,
    sinusoidal_positions,
)
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
    "sinusoidal_positions",  # chapter 7
    "PositionalEncoding",
    "FeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "Encoder",
    "Decoder",
    "Transformer",
    "copy_torch_transformer_weights",
    "greedy_decode",  # chapters 7 and 8 (use_cache=True)
    "use_fused_attention",
    "cache_nbytes",
    "BytePairEncoding",  # chapter 9
    "GPT",
    "decoder_block",
    "filter_probs",
    "sample",
    "generate",
]
__version__ = "0.1.0"
