"""What the chapter 2 tables cannot express: the refused calls are restored afterwards.

Every mistake of the tables in transformer_book/checks/ch02.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformer_book
from transformer_book.attention import scaled_dot_product_attention
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch02 import (
    _band,
    _local_variant,
    _softmax_variant,
    check_local_attention,
    check_stable_softmax,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_stable_softmax(_softmax_variant)
    check_local_attention(_band, _local_variant)
    assert capsys.readouterr().out.count("passed") == 2


def test_builtin_softmax_is_restored_after_the_check():
    originals = torch.softmax, torch.ops.aten._softmax
    with pytest.raises(CheckFailure, match="calls PyTorch's softmax"):
        check_stable_softmax(lambda x, dim=-1: torch.softmax(x, dim=dim))
    assert (torch.softmax, torch.ops.aten._softmax) == originals
    assert torch.Tensor.softmax(torch.zeros(2), 0).tolist() == [0.5, 0.5]


def test_local_attention_must_not_call_a_ready_made_attention():
    """A call of the book's function imported by name, by module or PyTorch's is refused."""

    from transformer_book.attention import scaled_dot_product_attention as sdpa

    def book(query, key, value, window):  # a closure variable
        return sdpa(query, key, value, _band(query.size(-2), window))

    def book_global(query, key, value, window):  # a global of this module
        return scaled_dot_product_attention(query, key, value, _band(query.size(-2), window))

    def book_by_module(query, key, value, window):
        mask = _band(query.size(-2), window)
        return transformer_book.scaled_dot_product_attention(query, key, value, mask)

    def pytorch(query, key, value, window):
        mask = _band(query.size(-2), window)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return output, _local_variant(query, key, value, window)[1]

    aten = torch.ops.aten.scaled_dot_product_attention
    for wrong in (book, book_global, book_by_module, pytorch):
        with pytest.raises(CheckFailure, match="write the attention step yourself"):
            check_local_attention(_band, wrong)
    # everything is restored afterwards
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert transformer_book.scaled_dot_product_attention is scaled_dot_product_attention
    assert torch.ops.aten.scaled_dot_product_attention is aten
    assert globals()["scaled_dot_product_attention"] is sdpa
    contents = [cell.cell_contents for cell in book.__closure__]
    assert any(c is scaled_dot_product_attention for c in contents)
