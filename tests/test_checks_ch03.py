"""What the chapter 3 tables cannot express: usage errors, a ready-made attention imported
into a notebook's globals, modules of another architecture.

Every mistake of the tables in transformer_book/checks/ch03.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformer_book.attention import scaled_dot_product_attention
from transformer_book.checks import CheckFailure, CheckUsageError
from transformer_book.checks.ch03 import (
    _MQA,
    _Fused,
    _merge_reference,
    _split_reference,
    check_fused_mha,
    check_multi_query_attention,
    check_seq_first_heads,
)
from transformer_book.multihead import merge_heads, split_heads


def test_the_variants_pass_with_their_default_options(capsys):
    check_seq_first_heads(_split_reference, _merge_reference)
    check_fused_mha(_Fused)
    check_multi_query_attention(_MQA)
    assert capsys.readouterr().out.count("passed") == 3


def test_usage_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(CheckUsageError, match="split function"):
        check_seq_first_heads(x, merge_heads)
    with pytest.raises(CheckUsageError, match="merge function"):
        check_seq_first_heads(split_heads, x)
    with pytest.raises(CheckUsageError, match="module class"):
        check_fused_mha(nn.Linear(4, 4))
    with pytest.raises(CheckUsageError, match="module class"):
        check_multi_query_attention(torch.randn(3))


NOTEBOOK_CELL = """
import torch.nn as nn
import torch.nn.functional as F

from transformer_book.attention import scaled_dot_product_attention
from transformer_book.multihead import merge_heads, split_heads


def book(q, k, v, mask):
    return scaled_dot_product_attention(q, k, v, mask)


def pytorch(q, k, v, mask):
    weights = book(q, k, v, mask)[1].detach()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), weights


class Fused(nn.Module):
    def __init__(self, d_model, num_heads, bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x, mask=None):
        q, k, v = (split_heads(t, self.num_heads) for t in self.w_qkv(x).chunk(3, dim=-1))
        heads, self.attention_weights = ATTEND(q, k, v, mask)
        return self.w_o(merge_heads(heads))
"""


@pytest.mark.parametrize("attend", ["book", "pytorch", "scaled_dot_product_attention"])
def test_fused_check_refuses_a_ready_made_attention_imported_in_a_notebook(attend):
    """As in a notebook: the function is imported by name into the cell's globals."""
    import torch.nn.functional as F

    scope = {"__name__": "__notebook__"}
    exec(NOTEBOOK_CELL.replace("ATTEND", attend), scope)
    with pytest.raises(CheckFailure, match="write the attention step yourself"):
        check_fused_mha(scope["Fused"])
    assert scope["scaled_dot_product_attention"] is scaled_dot_product_attention
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_fused_check_wants_the_fused_layer():
    class Separate(nn.Module):
        def __init__(self, d_model, num_heads, bias=True):
            super().__init__()
            self.w_q = nn.Linear(d_model, d_model, bias=bias)
            self.w_k = nn.Linear(d_model, d_model, bias=bias)
            self.w_v = nn.Linear(d_model, d_model, bias=bias)
            self.w_o = nn.Linear(d_model, d_model, bias=bias)

    with pytest.raises(CheckFailure, match="no nn.Linear called w_qkv"):
        check_fused_mha(Separate)


def test_fused_check_reports_a_crash_in_forward_in_one_sentence():
    class Crashes(_Fused):
        def forward(self, x, mask=None):
            return x @ torch.ones(3, 3)

    with pytest.raises(CheckFailure, match="raised RuntimeError"):
        check_fused_mha(Crashes)


def test_mqa_check_rejects_full_multi_head_attention():
    from transformer_book.multihead import MultiHeadAttention

    with pytest.raises(CheckFailure, match="single head of d_head"):
        check_multi_query_attention(MultiHeadAttention)
