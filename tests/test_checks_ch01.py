"""The chapter 1 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_book.checks import CheckFailure
from transformer_book.checks.ch01 import (
    check_additive_attention,
    check_attention_pool,
    check_positions,
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


# --------------------------------------------------------------------- 1.2 attention pooling


def pool(
    x,
    query,
    w_k,
    w_v,
    *,
    transpose=True,
    project_keys=True,
    scale=1.0,
    dim=-1,
    values="v",
    uniform=False,
    keep_axis=False,
    reduce="weighted",
    position_bias=False,
):
    """The solution with one knob per misconception."""
    p = (lambda m: m.T) if transpose else (lambda m: m)
    keys = x @ p(w_k) if project_keys else x
    v = {"v": x @ p(w_v), "x": x, "k": keys}[values]
    scores = keys @ query * scale  # (..., L)
    if position_bias:  # a term that depends on where a token sits
        scores = scores + torch.arange(x.shape[-2], dtype=x.dtype)
    weights = torch.softmax(scores, dim=dim)
    if uniform:
        weights = torch.full_like(weights, 1 / x.shape[-2])
    if reduce == "mean":
        pooled = v.mean(dim=-2)
    elif reduce == "max":
        pooled = v.amax(dim=-2)
    else:
        pooled = (weights.unsqueeze(-1) * v).sum(dim=-2)
    if keep_axis:
        return pooled.unsqueeze(-2), weights.unsqueeze(-2)
    return pooled, weights


def test_the_configurable_pool_passes_when_correct(capsys):
    check_attention_pool(pool)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (knob(pool, uniform=True), "that is mean pooling"),
        (knob(pool, reduce="mean"), "plain mean of the values"),
        (knob(pool, reduce="max"), "max pooling"),
        (knob(pool, dim=0), r"sum to 1 over the batch \(dim 0\)"),
        (knob(pool, transpose=False), "without the transpose"),
        (knob(pool, project_keys=False), "without projecting the keys"),
        (lambda x, q, a, b: pool(x, q, a, b, scale=1 / math.sqrt(q.shape[0])), "chapter 2"),
        (knob(pool, values="x"), "averages x itself"),
        (knob(pool, values="k"), "averages the keys"),
        (knob(pool, keep_axis=True), "keeps an axis of length 1"),
        (knob(pool, position_bias=True), "position-dependent"),
        (lambda *args: pool(*args)[::-1], r"returned \(weights, output\)"),
        (lambda *args: pool(*args)[0], "should return a pair"),
    ],
)
def test_pool_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_attention_pool(wrong)


def test_pool_without_softmax():
    def no_softmax(x, query, w_k, w_v):
        scores = (x @ w_k.T) @ query  # (..., L), not normalised
        return (scores.unsqueeze(-1) * (x @ w_v.T)).sum(-2), scores

    with pytest.raises(CheckFailure, match="do not sum to 1 over the tokens"):
        check_attention_pool(no_softmax)


def test_pool_in_place():
    def in_place(x, query, w_k, w_v):
        x -= x.mean(dim=-2, keepdim=True)
        return pool(x, query, w_k, w_v)

    with pytest.raises(CheckFailure, match="changed its input `x` in place"):
        check_attention_pool(in_place)


# --------------------------------------------------------------------- 1.3 positions


def gap(layer, x, perm, *, compare="equivariant", reduce="max", absolute=True):
    """permutation_gap with one knob per misconception."""
    inverse = torch.argsort(perm)
    moved = layer(x[..., inverse if compare == "inverse input" else perm, :])
    if compare == "equivariant" or compare == "inverse input":
        expected = layer(x)[..., perm, :]
    elif compare == "invariant":
        expected = layer(x)
    elif compare == "inverse output":
        expected = layer(x)[..., inverse, :]
    diff = moved - expected
    if absolute:
        diff = diff.abs()
    return (diff.mean() if reduce == "mean" else diff.max()).item()


def positions(x, table, *, rows="first", op="add"):
    """add_positions with one knob per misconception."""
    length = x.shape[-2]
    if rows == "all":
        chosen = table
    elif rows == "last":
        chosen = table[-length:]
    else:
        chosen = table[:length]
    if op == "cat":
        return torch.cat([x, chosen.expand(*x.shape[:-1], -1)], dim=-1)
    if op == "mul":
        return x * chosen
    if op == "detach":
        return x + chosen.detach()
    if op == "in place":
        x += chosen
        return x
    if op == "alone":
        return chosen.expand(x.shape).clone()
    return x + chosen


def test_the_configurable_positions_pass_when_correct(capsys):
    check_positions(gap, positions)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("permutation_gap", "add_positions", "message"),
    [
        (knob(gap, compare="invariant"), positions, "that tests invariance"),
        (knob(gap, compare="inverse output"), positions, "inverse permutation on one side"),
        (knob(gap, compare="inverse input"), positions, "inverse permutation on one side"),
        (knob(gap, absolute=False), positions, "largest signed difference"),
        (knob(gap, reduce="mean"), positions, "mean absolute difference"),
        (lambda *a: torch.tensor([gap(*a)] * 2), positions, "return one number"),
        (gap, knob(positions, rows="all"), r"add only its first L rows, table\[:L\]"),
        (gap, knob(positions, rows="last"), "last L rows"),
        (gap, knob(positions, op="cat"), "concatenates the positions"),
        (gap, knob(positions, op="mul"), "multiplies x by the position vectors"),
        (gap, knob(positions, op="alone"), "position vectors alone"),
        (gap, knob(positions, op="detach"), "No gradient"),
        (gap, knob(positions, op="in place"), "in place"),
    ],
)
def test_positions_names_the_mistake(permutation_gap, add_positions, message):
    with pytest.raises(CheckFailure, match=message):
        check_positions(permutation_gap, add_positions)
