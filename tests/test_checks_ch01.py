"""The chapter 1 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transformer_book.checks import CheckFailure
from transformer_book.checks.ch01 import (
    check_additive_attention,
    check_cross_attention,
    check_self_attention,
)

# ------------------------------------------------------------------ 1.1 additive attention


def additive(
    query,
    key,
    value,
    w_q,
    w_k,
    w_s,
    *,
    tanh=True,
    transpose=True,
    dot=True,
    dim=-1,
    tanh_last=False,
    average=None,
    swap=False,
    pair=False,
):
    """The solution with one knob per misconception."""
    wq, wk = (w_q.T, w_k.T) if transpose else (w_q, w_k)
    q, k = query @ wq, key @ wk  # (..., Lq, d_h), (..., Lk, d_h)
    if pair:  # query i meets key i only
        hidden = torch.tanh(q + k)  # (..., L, d_h)
        weights = torch.softmax(hidden @ w_s, dim=-1)  # (..., L)
        return weights.unsqueeze(-1) * value, weights
    hidden = q.unsqueeze(-2) + k.unsqueeze(-3)  # (..., Lq, Lk, d_h)
    if tanh and not tanh_last:
        hidden = torch.tanh(hidden)
    scores = hidden @ w_s if dot else hidden.sum(-1)  # (..., Lq, Lk)
    if tanh_last:
        scores = torch.tanh(scores)
    weights = torch.softmax(scores, dim=dim)
    mixed = {None: value, "keys": key}[average]
    output = weights @ mixed
    return (weights, output) if swap else (output, weights)


def knob(fn, **options):
    return lambda *args: fn(*args, **options)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (knob(additive, tanh=False), "without the tanh"),
        (knob(additive, tanh_last=True), "tanh applied after the dot product"),
        (knob(additive, dot=False), "summing the hidden units"),
        (knob(additive, transpose=False), "without the transpose"),
        (knob(additive, dim=-2), r"softmax over the queries \(dim=-2\)"),
        (knob(additive, average="keys"), "weighted mean of the keys"),
        (knob(additive, swap=True), r"returned \(weights, output\)"),
        (knob(additive, pair=True), "pair query i\\s+with key i only"),
        (lambda *args: additive(*args)[0], "should return a pair"),
    ],
)
def test_additive_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_additive_attention(wrong)


def test_additive_generic_message_for_an_unknown_mistake():
    def off_by_a_bit(query, key, value, w_q, w_k, w_s):
        output, weights = additive(query, key, value, w_q, w_k, w_s)
        return output, (weights + 0.01) / (1 + 0.01 * weights.shape[-1])

    with pytest.raises(CheckFailure, match="differ from the reference weights"):
        check_additive_attention(off_by_a_bit)


def test_additive_reference_is_the_loop_formula():
    from transformer_book.checks.ch01 import _additive_reference, _additive_scores

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    query, key, value = randn(2, 3, 4), randn(2, 5, 6), randn(2, 5, 7)
    w_q, w_k, w_s = randn(8, 4), randn(8, 6), randn(8)
    out, weights = _additive_reference(query, key, value, w_q, w_k, w_s)
    vectorised = torch.softmax(_additive_scores(query, key, w_q, w_k, w_s), dim=-1)
    assert torch.allclose(weights, vectorised, atol=1e-12)
    assert torch.allclose(out, vectorised @ value, atol=1e-12)


# --------------------------------------------------------------------- 1.2 self-attention


def plain(
    q, k, v, *, scale=1.0, dim=-1, swap_qk=False, transpose_weights=False, transpose_output=False
):
    """Unscaled attention, with one knob per misconception."""
    scores = (k @ q.transpose(-2, -1)) if swap_qk else (q @ k.transpose(-2, -1))
    weights = torch.softmax(scores * scale, dim=dim)  # (..., Lq, Lk)
    output = (weights.transpose(-2, -1) if transpose_output else weights) @ v
    return output, (weights.transpose(-2, -1) if transpose_weights else weights)


def self_attn(x, w_q, w_k, w_v, *, transpose=True, values="v", causal=False, raw=False, **opts):
    p = (lambda m: m.T) if transpose else (lambda m: m)
    q, k, v = x @ p(w_q), x @ p(w_k), x @ p(w_v)
    if raw:
        q, k = x, x
    if causal:  # a mask that belongs to chapter 4, not to plain self-attention
        length = x.shape[-2]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-2, -1)).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ v, weights
    output, weights = plain(q, k, v, **opts)
    if values != "v":
        output = weights @ {"x": x, "k": k}[values]
    return output, weights


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (
            lambda x, a, b, c: self_attn(x, a, b, c, scale=1 / math.sqrt(a.shape[0])),
            r"divided by sqrt\(d_k\).*chapter 2",
        ),
        (lambda x, a, b, c: self_attn(x, a, b, c, scale=1 / a.shape[0]), "divided by d_k"),
        (knob(self_attn, dim=-2), r"softmax over the queries \(dim=-2\)"),
        (knob(self_attn, swap_qk=True), r"softmax\(K Q\^T\)"),
        (knob(self_attn, transpose_weights=True), "right weights transposed"),
        (knob(self_attn, transpose=False), "without the transpose"),
        (knob(self_attn, raw=True), "without the projections w_q and w_k"),
        (knob(self_attn, values="x"), "averages x itself"),
        (knob(self_attn, values="k"), "averages the keys"),
        (knob(self_attn, transpose_output=True), "output uses them transposed"),
        (knob(self_attn, causal=True), "depends on token positions"),
        (lambda x, a, b, c: self_attn(x, a, b, c)[::-1], r"returned \(weights, output\)"),
    ],
)
def test_self_attention_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_self_attention(wrong)


def test_self_attention_without_softmax():
    def no_softmax(x, w_q, w_k, w_v):
        scores = (x @ w_q.T) @ (x @ w_k.T).transpose(-2, -1)  # (..., L, L), not normalised
        return scores @ (x @ w_v.T), scores

    with pytest.raises(CheckFailure, match="do not sum to 1 over the keys"):
        check_self_attention(no_softmax)


def test_self_attention_position_term_breaks_equivariance():
    def with_positions(x, w_q, w_k, w_v):
        position = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] / 10  # (L, 1)
        return self_attn(x + position, w_q, w_k, w_v)

    with pytest.raises(CheckFailure, match="permutation-equivariant"):
        check_self_attention(with_positions)


def test_self_attention_reference_is_pytorchs():
    from transformer_book.checks.ch01 import _self_reference

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    w_q, w_k = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w_v = torch.randn(3, 6, dtype=torch.float64)
    out, weights = _self_reference(x, w_q, w_k, w_v)
    layer = torch.nn.MultiheadAttention(6, 1, bias=False, batch_first=True, dtype=torch.float64)
    # nn.MultiheadAttention scales by 1/sqrt(d_head): undo it by scaling the queries up.
    d_head = 6
    with torch.no_grad():
        pad = torch.zeros(2, 6, dtype=torch.float64)
        layer.in_proj_weight.copy_(
            torch.cat(
                [
                    torch.cat([w_q, pad]) * math.sqrt(d_head),
                    torch.cat([w_k, pad]),
                    torch.cat([w_v, torch.zeros(3, 6, dtype=torch.float64)]),
                ]
            )
        )
        layer.out_proj.weight.copy_(torch.eye(6, dtype=torch.float64))
        expected, expected_weights = layer(x, x, x)
    assert torch.allclose(weights, expected_weights, atol=1e-10)
    assert torch.allclose(out, expected[..., :3], atol=1e-10)


# -------------------------------------------------------------------- 1.3 cross-attention


def cross(
    x,
    memory,
    w_q,
    w_k,
    w_v,
    *,
    q_from="x",
    k_from="memory",
    v_from="memory",
    transpose=True,
    **opts,
):
    p = (lambda m: m.T) if transpose else (lambda m: m)
    source = {"x": x, "memory": memory}
    q, k = source[q_from] @ p(w_q), source[k_from] @ p(w_k)
    v = source[v_from] @ p(w_v)
    return plain(q, k, v, **opts)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (knob(cross, k_from="x", v_from="x"), "does not change when memory changes"),
        (knob(cross, q_from="memory"), "does not change when x changes"),
        (knob(cross, k_from="x"), "queries and keys both computed from x"),
        (knob(cross, v_from="x"), "values come from x"),
        (knob(cross, q_from="memory", k_from="x", v_from="x"), "sequences swapped"),
        (knob(cross, transpose=False), "without the transpose"),
        (knob(cross, dim=-2), r"softmax over the queries \(dim=-2\)"),
        (knob(cross, transpose_weights=True), "right weights transposed"),
        (knob(cross, transpose_output=True), "output uses them transposed"),
        (lambda *a: cross(*a, scale=1 / math.sqrt(a[2].shape[0])), r"divided by sqrt\(d_k\)"),
        (
            lambda x, m, a, b, c: F.scaled_dot_product_attention(
                x @ a.T, m @ b.T, m @ c.T, scale=1.0
            ),
            "should return a pair",
        ),
    ],
)
def test_cross_attention_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_cross_attention(wrong)


def test_cross_attention_shape_messages_when_lengths_differ():
    """Where Lq != Lk, the sequence mix-ups already show in the shapes."""
    from transformer_book.checks.ch01 import _cross_case, _cross_cases

    cases = list(_cross_cases(torch.Generator().manual_seed(14)))
    unequal = cases[1]
    assert unequal["x"].shape[-2] != unequal["memory"].shape[-2]
    with pytest.raises(CheckFailure, match="one column per token of x"):
        _cross_case(knob(cross, k_from="x", v_from="x"), unequal, torch.float32)
    with pytest.raises(CheckFailure, match="queries were computed from memory"):
        _cross_case(knob(cross, q_from="memory"), unequal, torch.float32)
    with pytest.raises(CheckFailure, match="they are transposed"):
        _cross_case(knob(cross, transpose_weights=True), unequal, torch.float32)
