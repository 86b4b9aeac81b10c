"""The chapter 3 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transformer_book.attention import scaled_dot_product_attention
from transformer_book.checks import CheckFailure, CheckUsageError
from transformer_book.checks.ch03 import (
    check_fused_mha,
    check_multi_query_attention,
    check_seq_first_heads,
)
from transformer_book.multihead import merge_heads, split_heads

# ------------------------------------------------------------------ solutions and stubs


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


# --------------------------------------------------------------- exercise 3.1: wrong answers


def good_split(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(length, batch, num_heads, d_model // num_heads).permute(1, 2, 0, 3)


def good_merge(x):
    batch, num_heads, length, d_head = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, num_heads * d_head)


def split_no_transpose(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(batch, num_heads, length, d_model // num_heads)


def split_batch_first_then_reshape(x, num_heads):
    length, batch, d_model = x.shape
    return x.transpose(0, 1).reshape(batch, num_heads, length, d_model // num_heads)


def split_reads_as_batch_first(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(batch, length, num_heads, d_model // num_heads).transpose(1, 2)


def split_interleaved(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(length, batch, d_model // num_heads, num_heads).permute(1, 3, 0, 2)


def split_sequence_first(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(length, batch, num_heads, d_model // num_heads).transpose(1, 2)


def merge_no_transpose(x):
    batch, num_heads, length, d_head = x.shape
    return x.reshape(length, batch, num_heads * d_head)


def merge_reshape_batch_first(x):
    batch, num_heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(length, batch, num_heads * d_head)


def merge_interleaved(x):
    batch, num_heads, length, d_head = x.shape
    return x.permute(2, 0, 3, 1).reshape(length, batch, num_heads * d_head)


def merge_batch_first(x):
    return merge_heads(x)  # the chapter's merge: (batch, L, d_model)


def merge_with_view(x):
    batch, num_heads, length, d_head = x.shape
    return x.permute(2, 0, 1, 3).view(length, batch, num_heads * d_head)


@pytest.mark.parametrize(
    "split,merge,message",
    [
        (split_no_transpose, good_merge, "without moving any axis"),
        (split_batch_first_then_reshape, good_merge, "reshape-without-transpose bug"),
        (split_reads_as_batch_first, good_merge, "as if it were \\(batch, L, d_model\\)"),
        (split_interleaved, good_merge, "head i holds features i, i \\+ num_heads"),
        (split_sequence_first, good_merge, "sequence axis is still first"),
        (good_split, merge_no_transpose, "reshapes straight to \\(L, batch, d_model\\)"),
        (good_split, merge_reshape_batch_first, "builds the batch-first"),
        (good_split, merge_interleaved, "interleaves the heads"),
        (good_split, merge_batch_first, "that is batch-first"),
        (good_split, merge_with_view, "`.view` cannot regroup its axes"),
    ],
)
def test_seq_first_heads_names_the_mistake(split, merge, message):
    with pytest.raises(CheckFailure, match=message):
        check_seq_first_heads(split, merge)


# ------------------------------------------------------- a configurable wrong fused module


def make_fused(
    out_proj=True,
    scale="head",
    softmax_dim=-1,
    split_bug=False,
    merge_bug=False,
    order=(0, 1, 2),
    mask_mode="ok",
    store="heads",
    detach_output=False,
    ignore_bias=False,
    extra_parameter=False,
    check_divisible=True,
    dropout=0.0,
    store_after_dropout=False,
    attend_with=None,
    per_head_layout=False,
):
    """FusedMultiHeadAttention with the mistakes switched on by the arguments."""

    class Fused(nn.Module):
        def __init__(self, d_model, num_heads, bias=True):
            super().__init__()
            if check_divisible and d_model % num_heads:
                raise ValueError("d_model must be divisible by num_heads")
            self.num_heads, self.d_head = num_heads, d_model // num_heads
            bias = True if ignore_bias else bias
            self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
            self.w_o = nn.Linear(d_model, d_model, bias=bias)
            if extra_parameter:
                self.gain = nn.Parameter(torch.ones(d_model))
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, mask=None):
            batch, length, d_model = x.shape
            parts = self.w_qkv(x).chunk(3, dim=-1)
            if per_head_layout:  # (B, L, heads, 3, d_head): q, k, v interleaved per head
                qkv = self.w_qkv(x).reshape(batch, length, self.num_heads, 3, self.d_head)
                parts = [t.reshape(batch, length, d_model) for t in qkv.unbind(dim=3)]
            if attend_with is not None:  # a ready-made attention function
                q, k, v = (split_heads(t, self.num_heads) for t in parts)
                heads, self.attention_weights = attend_with(q, k, v, mask)
                return self.w_o(merge_heads(heads))
            q, k, v = (parts[i] for i in order)
            if split_bug:
                q, k, v = (t.reshape(batch, self.num_heads, length, self.d_head) for t in (q, k, v))
            else:
                q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
            scores = q @ k.transpose(-2, -1)
            if scale == "head":
                scores = scores / math.sqrt(self.d_head)
            elif scale == "model":
                scores = scores / math.sqrt(d_model)
            if mask is not None and mask_mode == "ok":
                scores = scores.masked_fill(~mask, float("-inf"))
            if mask is not None and mask_mode == "inverted":
                scores = scores.masked_fill(mask, float("-inf"))
            weights = torch.softmax(scores, dim=softmax_dim)
            if mask is not None and mask_mode == "after":
                weights = weights * mask
            if store_after_dropout:
                weights = self.dropout(weights)
            if store == "heads":
                self.attention_weights = weights.detach()
            elif store == "mean":
                self.attention_weights = weights.mean(1).detach()
            elif store == "scores":
                self.attention_weights = scores.detach()
            heads = self.dropout(weights) @ v
            if merge_bug:
                merged = heads.reshape(batch, length, d_model)
            else:
                merged = merge_heads(heads)
            out = self.w_o(merged) if out_proj else merged
            return out.detach() if detach_output else out

    return Fused


def test_the_configurable_fused_module_passes_when_correct():
    check_fused_mha(make_fused())


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(out_proj=False), "before the output projection"),
        (dict(scale="none"), "without the 1/sqrt\\(d_head\\) scale"),
        (dict(scale="model"), "divided by sqrt\\(d_model\\)"),
        (dict(softmax_dim=-2), "softmax over the queries"),
        (dict(split_bug=True), "split with a reshape .* and no transpose"),
        (dict(merge_bug=True), "merged with a reshape .* and no transpose"),
        (dict(split_bug=True, merge_bug=True), "split and merged with plain reshapes"),
        (dict(order=(1, 0, 2)), "cut into \\(k, q, v\\)"),
        (dict(order=(2, 1, 0)), "cut into \\(v, k, q\\)"),
        (dict(per_head_layout=True), "interleaved head by head"),
        (dict(mask_mode="inverted"), "mask inverted"),
        (dict(mask_mode="after"), "after the softmax"),
        (dict(mask_mode="ignored"), "without the mask"),
        (dict(store="mean"), "averaged over the heads"),
        (dict(store="none"), "does not keep the weights"),
        (dict(store="scores"), "do not sum to 1"),
        (dict(detach_output=True), "gradients differ"),
        (dict(ignore_bias=True), "has bias although bias=False"),
        (dict(extra_parameter=True), "Remove the extra parameters"),
        (dict(check_divisible=False), "raise ValueError"),
        (dict(dropout=0.1), "differs in training mode"),
        (dict(dropout=0.1, store_after_dropout=True), "stored after a dropout"),
        (dict(attend_with=scaled_dot_product_attention), "write the attention step yourself"),
    ],
)
def test_fused_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailure, match=message):
        check_fused_mha(make_fused(**options))


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


def test_fused_check_reports_a_crash_in_one_sentence():
    class Crashes(make_fused()):
        def forward(self, x, mask=None):
            return x @ torch.ones(3, 3)

    with pytest.raises(CheckFailure, match="raised RuntimeError"):
        check_fused_mha(Crashes)


# ---------------------------------------------------- a configurable wrong multi-query module


def make_mqa(
    kv_width="head",
    unsqueeze=True,
    scale="head",
    out_proj=True,
    merge_bug=False,
    store="heads",
    mask_mode="ok",
    dropout=0.0,
    inputs_from_query=(),
):
    """MultiQueryAttention with the mistakes switched on by the arguments."""

    class MQA(nn.Module):
        def __init__(self, d_model, num_heads, bias=True):
            super().__init__()
            if d_model % num_heads:
                raise ValueError("d_model must be divisible by num_heads")
            self.num_heads, self.d_head = num_heads, d_model // num_heads
            width = self.d_head if kv_width == "head" else d_model
            self.w_q = nn.Linear(d_model, d_model, bias=bias)
            self.w_k = nn.Linear(d_model, width, bias=bias)
            self.w_v = nn.Linear(d_model, width, bias=bias)
            self.w_o = nn.Linear(d_model, d_model, bias=bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, query, key, value, mask=None):
            batch, lq, d_model = query.shape
            key = query if "key" in inputs_from_query else key
            value = query if "value" in inputs_from_query else value
            q = split_heads(self.w_q(query), self.num_heads)
            k, v = self.w_k(key), self.w_v(value)
            if unsqueeze:
                k, v = k.unsqueeze(1), v.unsqueeze(1)
            if scale == "model":
                q = q * math.sqrt(self.d_head / d_model)  # net effect: scores / sqrt(d_model)
            elif scale == "none":
                q = q * math.sqrt(self.d_head)  # cancels the function's 1/sqrt(d_head)
            if mask is not None and mask_mode == "inverted":
                mask = ~mask
            if mask_mode == "ignored":
                mask = None
            heads, weights = scaled_dot_product_attention(q, k, v, mask)
            if store == "heads":
                self.attention_weights = weights.detach()
            elif store == "mean":
                self.attention_weights = weights.mean(1).detach()
            heads = self.dropout(heads)
            if merge_bug:
                merged = heads.reshape(batch, lq, d_model)
            else:
                merged = merge_heads(heads)
            return self.w_o(merged) if out_proj else merged

    return MQA


def test_the_configurable_mqa_module_passes_when_correct():
    check_multi_query_attention(make_mqa())


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(kv_width="model"), "projected once, to a single head"),
        (dict(unsqueeze=False), "head i reads sequence i"),
        (dict(scale="model"), "divided by sqrt\\(d_model\\)"),
        (dict(scale="none"), "without the 1/sqrt\\(d_head\\) scale"),
        (dict(out_proj=False), "before the output projection"),
        (dict(merge_bug=True), "merged with a reshape .* and no transpose"),
        (dict(store="mean"), "averaged over the heads"),
        (dict(store="none"), "does not keep the weights"),
        (dict(mask_mode="inverted"), "mask inverted"),
        (dict(mask_mode="ignored"), "without the mask"),
        (dict(dropout=0.1), "differs in training mode"),
        (dict(inputs_from_query=("key",)), "the keys are computed from `query`"),
        (dict(inputs_from_query=("value",)), "the values are computed from `query`"),
        (dict(inputs_from_query=("key", "value")), "computed from `query`"),
    ],
)
def test_mqa_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailure, match=message):
        check_multi_query_attention(make_mqa(**options))


def test_mqa_check_rejects_full_multi_head_attention():
    from transformer_book.multihead import MultiHeadAttention

    with pytest.raises(CheckFailure, match="single head of d_head"):
        check_multi_query_attention(MultiHeadAttention)
