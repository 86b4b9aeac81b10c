"""What the chapter 8 tables cannot express (every mistake of every table: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book import MultiHeadAttention
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch08 import (
    _calls_the_chapter,
    check_chunk_step,
    check_cross_attention_step,
)
from transformer_book.multihead import merge_heads, split_heads


def test_check_leaves_the_chapters_module_working():
    forward, keys_values = MultiHeadAttention.forward, MultiHeadAttention._keys_values
    with pytest.raises(CheckFailure, match="not with the chapter's"):
        check_chunk_step(_calls_the_chapter)
    assert MultiHeadAttention.forward is forward
    assert MultiHeadAttention._keys_values is keys_values
    module = MultiHeadAttention(8, 2)
    assert module(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)).shape == (1, 3, 8)


def test_cross_attention_step_accepts_the_projections_as_functional_calls(capsys):
    """The same weights through F.linear are right: the memory is projected once."""

    def cross_attention_step(mha, x, memory, cache):
        if "k" not in cache:
            cache["k"], cache["v"] = (
                split_heads(F.linear(memory, w.weight, w.bias), mha.num_heads)
                for w in (mha.w_k, mha.w_v)
            )
        q = split_heads(F.linear(x, mha.w_q.weight, mha.w_q.bias), mha.num_heads)
        heads = F.scaled_dot_product_attention(q, cache["k"], cache["v"])
        return mha.w_o(merge_heads(heads))

    check_cross_attention_step(cross_attention_step)
    assert "passed" in capsys.readouterr().out
