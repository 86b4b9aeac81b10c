"""Checks for chapter 1, attention and self-attention.

Every check computes its reference in float64 from the same inputs it hands to your
function. When your answer differs, the check runs the usual mistakes on the same inputs
(softmax over the wrong axis, a missing tanh, a weight matrix used without its transpose,
mean pooling, the inverse permutation ...), each written once as a wrong implementation in
a table, and names the first one that matches; only if none does it fall back to a
general message.
"""

from __future__ import annotations

import math
from functools import partial
from operator import itemgetter

import torch
import torch.nn.functional as F

from ._core import (
    Caught,
    Hint,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_dtype,
    expect_finite,
    expect_shape,
    expect_tensor,
    fail,
    fmt,
    name_mistake,
    same,
)

# --------------------------------------------------------------------------- helpers


def _random(*shape, generator, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _weight(d_out, d_in, generator):
    """A weight in nn.Linear's layout (out_features, in_features), scaled like its init."""
    return _random(d_out, d_in, generator=generator, scale=1 / math.sqrt(d_in))


def _derangement(length: int) -> torch.Tensor:
    """A permutation that moves every position (a rotation by one)."""
    return torch.roll(torch.arange(length), 1)


def _unpack(result, what: str, out_shape=None, weights_shape=None):
    """Split the returned pair, with a specific message for the usual slips."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        kind = type(result).__name__
        if isinstance(result, torch.Tensor):
            kind = f"one tensor of shape {fmt(result.shape)}"
        fail(f"{what} should return a pair (output, weights), but it returned {kind}.")
    output, weights = result
    expect_tensor(output, f"the first thing {what} returns (the output)")
    expect_tensor(weights, f"the second thing {what} returns (the attention weights)")
    if out_shape is not None and tuple(out_shape) != tuple(weights_shape) and (
            tuple(output.shape), tuple(weights.shape)) == (tuple(weights_shape), tuple(out_shape)):
        fail(f"{what} returned (weights, output): return them in the order (output, weights).")
    return output, weights


def _check_weights_shape(weights, expected, lq: int, lk: int, what: str, extra: str = "") -> None:
    expected, got = tuple(expected), tuple(weights.shape)
    batch = expected[:-2]
    if got == expected:
        return
    if lq != lk and got == batch + (lk, lq):
        fail(f"The attention weights have shape {fmt(got)}, expected {fmt(expected)}: they are "
             "transposed. Rows belong to the queries (Lq) and columns to the keys (Lk), "
             "so scores = queries @ keys.transpose(-2, -1).")
    if got == batch + (lq,) or got == batch + (lk,):
        fail(f"The attention weights have shape {fmt(got)}, expected {fmt(expected)}: one score "
             "per query, where there must be one per (query, key) pair. Did you pair query i "
             f"with key i only?{extra}")
    expect_shape(weights, expected, f"The attention weights returned by {what}")


def _diagnose(actual, reference, table, args, general: str, pick) -> None:
    """Unless ``actual`` is the reference: the first mistake of ``table`` it matches, else
    ``general``."""
    if not same(actual, reference):
        name_mistake(actual, table, *args, pick=pick, general=general)


def _rows_sum_message(weights: torch.Tensor) -> str | None:
    sums = weights.detach().double().sum(dim=-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        columns = weights.detach().double().sum(dim=-2)
        if torch.allclose(columns, torch.ones_like(columns), atol=1e-4):
            return ("The attention weights sum to 1 down each column (over the queries), not "
                    "along each row (over the keys): softmax over dim=-2 instead of dim=-1?")
        return ("The attention weights do not sum to 1 over the keys (the last axis): is the "
                "softmax missing, or taken over the wrong dim?")
    return None


_OUTPUT, _WEIGHTS = itemgetter(0), itemgetter(1)  # the parts of an (output, weights) pair
_OVERFLOW = ("with scores in the hundreds, exp overflows to inf and inf / inf is NaN: use "
             "torch.softmax, which subtracts each row's max before exp.")


def _naive_softmax(scores, dim=-1):  # exp / sum without the shift: overflows for big scores
    return scores.exp() / scores.exp().sum(dim=dim, keepdim=True)


# ------------------------------------------------------------- exercise 1.1: additive


def _additive_reference(query, key, value, w_q, w_k, w_s):
    """e_ij = w_s . tanh(W_q q_i + W_k k_j), one (i, j) pair at a time: a loop, on purpose."""
    lq, lk = query.shape[-2], key.shape[-2]
    scores = torch.empty(*query.shape[:-2], lq, lk, dtype=torch.float64)
    for i in range(lq):
        for j in range(lk):
            hidden = torch.tanh(query[..., i, :] @ w_q.T + key[..., j, :] @ w_k.T)
            scores[..., i, j] = hidden @ w_s
    weights = torch.softmax(scores, dim=-1)
    return weights @ value, weights


def _additive_scores(query, key, w_q, w_k, w_s, tanh=True, transpose=True, dot=True):
    wq, wk = (w_q.T, w_k.T) if transpose else (w_q, w_k)
    hidden = query.unsqueeze(-2) @ wq + (key @ wk).unsqueeze(-3)  # (..., Lq, Lk, d_h)
    if tanh:
        hidden = torch.tanh(hidden)
    return hidden @ w_s if dot else hidden.sum(-1)  # (..., Lq, Lk)


def _additive_variant(query, key, value, w_q, w_k, w_s, *, tanh=True, transpose=True, dot=True,
                      tanh_last=False, dim=-1, average="values", swap=False, pair=False,
                      softmax=torch.softmax):
    """additive_attention with one option per mistake (the defaults give the right answer)."""
    if pair:  # query i meets key i only
        weights = softmax(torch.tanh(query @ w_q.T + key @ w_k.T) @ w_s, dim=-1)  # (..., L)
        return weights.unsqueeze(-1) * value, weights
    scores = _additive_scores(query, key, w_q, w_k, w_s, tanh and not tanh_last, transpose, dot)
    weights = softmax(torch.tanh(scores) if tanh_last else scores, dim=dim)
    output = {"values": lambda: weights @ value, "keys": lambda: weights @ key,
              "transposed": lambda: weights.transpose(-2, -1) @ value}[average]()
    return (weights, output) if swap else (output, weights)


_ADDITIVE_WEIGHTS = [
    Mistake("Your weights match additive attention without the tanh. Without it the score "
            "splits into w_s.(W_q q_i) + w_s.(W_k k_j); the query part is the same for every "
            "key and cancels in the softmax, so every query gets the same weights. Apply "
            "tanh to W_q q_i + W_k k_j, then take the dot product with w_s.",
            partial(_additive_variant, tanh=False)),
    Mistake("Your weights match tanh applied after the dot product with w_s. The tanh acts "
            "on each hidden unit of W_q q_i + W_k k_j; w_s then combines the units into "
            "one score.", partial(_additive_variant, tanh_last=True)),
    Mistake("Your weights match summing the hidden units tanh(W_q q_i + W_k k_j) over d_h; "
            "the score is their dot product with the learned vector w_s.",
            partial(_additive_variant, dot=False)),
    Mistake("Your weights match x @ w_q and x @ w_k without the transpose. The weights are "
            "stored like nn.Linear's, with shape (out_features, in_features) = (d_h, d_in), "
            "so the projection is x @ w_q.T.", partial(_additive_variant, transpose=False)),
    Mistake("Your weights match a softmax over the queries (dim=-2): each key's column sums "
            "to 1. The softmax runs over the keys (dim=-1), so each query's row sums to 1.",
            partial(_additive_variant, dim=-2), expect=r"softmax over the queries \(dim=-2\)"),
]
_ADDITIVE_OUTPUT = [
    Mistake("Your weights are right but the output matches the weighted mean of the keys: "
            "the keys only decide the weights; the output averages the values.",
            partial(_additive_variant, average="keys")),
    Mistake("Your weights are right but the output uses them transposed: "
            "output = weights @ value, one row per query.",
            partial(_additive_variant, average="transposed")),
]


def _additive_smoothed(*args):  # an unknown mistake: the general message
    output, weights = _additive_variant(*args)
    return output, (weights + 0.01) / (1 + 0.01 * weights.shape[-1])


_ADDITIVE_CAUGHT = [
    Caught(partial(_additive_variant, swap=True), r"returned \(weights, output\)"),
    Caught(partial(_additive_variant, pair=True), "pair query i\\s+with key i only"),
    Caught(lambda *args: _additive_variant(*args)[0], "should return a pair"),
    Caught(_additive_smoothed, "differ from the reference weights"),
    Caught(partial(_additive_variant, softmax=_naive_softmax), "exp overflows"),
    Caught(lambda *args: _additive_variant(*(a.float() for a in args)),
           "returns torch.float32 for float64 inputs"),
]


def _additive_cases(generator):
    # (batch, Lq, Lk, d_q, d_k, d_v, d_h, scale of w_s). The first case has Lq = Lk, square
    # weights and d_k = d_v, so that every wrong answer below can be computed and
    # recognised; the last has scores in the hundreds, where exp without a shift overflows.
    shapes = [
        ((2,), 4, 4, 5, 5, 5, 5, 2.0),
        ((2,), 3, 5, 4, 4, 4, 4, 2.0),
        ((), 4, 7, 3, 6, 2, 5, 2.0),
        ((2, 3), 5, 1, 4, 4, 3, 6, 2.0),
        ((3,), 1, 6, 2, 7, 4, 3, 2.0),
        ((2,), 3, 4, 3, 5, 2, 6, 150.0),
    ]
    for batch, lq, lk, d_q, d_k, d_v, d_h, scale in shapes:
        yield dict(query=_random(*batch, lq, d_q, generator=generator),
                   key=_random(*batch, lk, d_k, generator=generator),
                   value=_random(*batch, lk, d_v, generator=generator),
                   w_q=_weight(d_h, d_q, generator),
                   w_k=_weight(d_h, d_k, generator),
                   w_s=_random(d_h, generator=generator, scale=scale))


@exercise("1.1", "Additive (Bahdanau) attention", mistakes={
    "additive_attention": _ADDITIVE_WEIGHTS + _ADDITIVE_OUTPUT + _ADDITIVE_CAUGHT})
def check_additive_attention(additive_attention):
    expect_callable(additive_attention, "your additive attention function",
                    "check_additive_attention(additive_attention)")
    generator = torch.Generator().manual_seed(11)
    for number, case in enumerate(_additive_cases(generator)):
        _additive_case(additive_attention, case, torch.float64 if number == 3 else torch.float32)


def _additive_case(additive_attention, case, dtype):
    what = "additive_attention"
    args = tuple(case[n] for n in ("query", "key", "value", "w_q", "w_k", "w_s"))
    result = call(additive_attention, *(a.to(dtype) for a in args), what=what)
    query, key, value = args[:3]
    lq, lk, batch = query.shape[-2], key.shape[-2], tuple(query.shape[:-2])
    out_shape, w_shape = batch + (lq, value.shape[-1]), batch + (lq, lk)
    output, weights = _unpack(result, what, out_shape, w_shape)
    _check_weights_shape(weights, w_shape, lq, lk, what, " Broadcast instead: (..., Lq, 1, d_h) "
                         "+ (..., 1, Lk, d_h) gives every pair.")
    if dtype == torch.float64:
        expect_dtype(output, dtype, f"{what} returns {output.dtype} for float64 inputs: keep "
                     "the inputs' dtype.")
    expect_finite(weights, "your attention weights", _OVERFLOW)
    ref_out, ref_w = _additive_reference(*args)
    general = _rows_sum_message(weights) or (
        "Your attention weights differ from the reference weights "
        "softmax_j(w_s . tanh(W_q q_i + W_k k_j)).")
    _diagnose(weights, ref_w, _ADDITIVE_WEIGHTS, args, general, _WEIGHTS)
    _diagnose(output, ref_out, _ADDITIVE_OUTPUT, args,
              "Your weights are right but the output differs from weights @ value.", _OUTPUT)


# ------------------------------------------------------ exercise 1.2: attention pooling


def _pool_cases(generator):
    # (batch, L, d_model, d_k, d_v, scale of x). The first case is square (d_model = d_k =
    # d_v) so that answers that skip a projection or its transpose can be computed and
    # recognised; the last has scores in the hundreds, where exp without a shift overflows.
    shapes = [
        ((3,), 5, 6, 6, 6, 1.0),
        ((2,), 4, 8, 5, 3, 1.0),
        ((), 7, 6, 4, 2, 1.0),
        ((2,), 1, 5, 3, 4, 1.0),
        ((2, 3), 6, 10, 7, 5, 1.0),
        ((2,), 5, 6, 9, 3, 40.0),
    ]
    for batch, length, d_model, d_k, d_v, scale in shapes:
        yield dict(x=_random(*batch, length, d_model, generator=generator, scale=scale),
                   query=_random(d_k, generator=generator),
                   w_k=_weight(d_k, d_model, generator),
                   w_v=_weight(d_v, d_model, generator))


def _pool_reference(x, query, w_k, w_v):
    """PyTorch's attention with one query per sequence and no scale: (pooled, weights)."""
    keys, values = x @ w_k.T, x @ w_v.T  # (..., L, d_k), (..., L, d_v)
    queries = query.expand(*x.shape[:-2], 1, query.shape[-1])  # (..., 1, d_k)
    pooled = F.scaled_dot_product_attention(queries, keys, values, scale=1.0)  # (..., 1, d_v)
    weights = torch.softmax(keys @ query, dim=-1)  # (..., L)
    return pooled.squeeze(-2), weights


def _pool_variant(x, query, w_k, w_v, *, t_k=True, t_v=True, project_keys=True, scaled=False,
                  dim=-1, values="v", uniform=False, reduce="weighted", keep_axis=False,
                  position_bias=False, softmax=torch.softmax):
    """attention_pool with one option per mistake (the defaults give the right answer)."""
    keys = (x @ (w_k.T if t_k else w_k)) if project_keys else x
    v = {"v": x @ (w_v.T if t_v else w_v), "x": x, "k": keys}[values]
    scores = keys @ query / (math.sqrt(query.shape[-1]) if scaled else 1)  # (..., L)
    if position_bias:  # a term that depends on where a token sits
        scores = scores + torch.arange(x.shape[-2], dtype=x.dtype)
    weights = softmax(scores, dim=dim)
    if uniform:
        weights = torch.full_like(weights, 1 / x.shape[-2])
    pooled = {"weighted": lambda: (weights.unsqueeze(-1) * v).sum(dim=-2),
              "mean": lambda: v.mean(dim=-2), "max": lambda: v.amax(dim=-2)}[reduce]()
    if keep_axis:
        return pooled.unsqueeze(-2), weights.unsqueeze(-2)
    return pooled, weights


_POOL_WEIGHTS = [
    Mistake("Your weights are 1/L for every token: that is mean pooling. The weights come "
            "from the scores query . k_j, through a softmax over the tokens.",
            partial(_pool_variant, uniform=True)),
    Mistake("Your weights match scores divided by sqrt(d_k): that is chapter 2's scaled "
            "attention. This exercise uses the plain dot products of chapter 1 (no scale).",
            partial(_pool_variant, scaled=True)),
    Mistake("Your weights match softmax(x . query): the query was compared with x itself, "
            "without projecting the keys first (K = x @ w_k.T).",
            partial(_pool_variant, project_keys=False)),
    Mistake("Your weights match x @ w_k without the transpose. The weights are stored like "
            "nn.Linear's, (out_features, in_features), so the keys are x @ w_k.T.",
            partial(_pool_variant, t_k=False, t_v=False)),
    Mistake("Your weights sum to 1 over the batch (dim 0), not over the tokens of each "
            "sequence: take the softmax over the last dim (dim=-1), the tokens.",
            partial(_pool_variant, dim=0), when=lambda x, *_: x.dim() > 2,
            expect=r"sum to 1 over the batch \(dim 0\)"),
]
_POOL_OUTPUT = [
    Mistake("Your weights are right but the pooled vector averages x itself: project the "
            "values first, V = x @ w_v.T, then pool sum_j weights_j v_j.",
            partial(_pool_variant, values="x")),
    Mistake("Your weights are right but the pooled vector averages the keys: the keys decide "
            "the weights, the values (x @ w_v.T) are averaged.",
            partial(_pool_variant, values="k")),
    Mistake("Your weights are right but the values are x @ w_v without the transpose; w_v has "
            "nn.Linear's shape (d_v, d_model), so V = x @ w_v.T.",
            partial(_pool_variant, t_v=False)),
    Mistake("Your weights are right but the pooled vector is the plain mean of the values: "
            "weight each value by its attention weight, sum_j weights_j v_j.",
            partial(_pool_variant, reduce="mean")),
    Mistake("Your pooled vector is the largest value in each feature (max pooling): attention "
            "pooling is the weighted mean sum_j weights_j v_j.",
            partial(_pool_variant, reduce="max")),
]


def _pool_without_softmax(x, query, w_k, w_v):
    scores = (x @ w_k.T) @ query  # (..., L), not normalised
    return (scores.unsqueeze(-1) * (x @ w_v.T)).sum(-2), scores


def _pool_in_place(x, query, w_k, w_v):
    x -= x.mean(dim=-2, keepdim=True)
    return _pool_variant(x, query, w_k, w_v)


_POOL_CAUGHT = [
    Caught(partial(_pool_variant, keep_axis=True), "keeps an axis of length 1"),
    Caught(partial(_pool_variant, position_bias=True), "position-dependent"),
    Caught(lambda *args: _pool_variant(*args)[::-1], r"returned \(weights, output\)"),
    Caught(lambda *args: _pool_variant(*args)[0], "should return a pair"),
    Caught(_pool_without_softmax, "do not sum to 1 over the tokens"),
    Caught(_pool_in_place, "changed its input `x` in place"),
    Caught(partial(_pool_variant, softmax=_naive_softmax), "exp overflows"),
]


@exercise("1.2", "Attention pooling",
          mistakes={"attention_pool": _POOL_WEIGHTS + _POOL_OUTPUT + _POOL_CAUGHT})
def check_attention_pool(attention_pool):
    expect_callable(attention_pool, "your attention pooling function",
                    "check_attention_pool(attention_pool)")
    generator = torch.Generator().manual_seed(12)
    for number, case in enumerate(_pool_cases(generator)):
        _pool_case(attention_pool, case, torch.float64 if number == 4 else torch.float32)

    # The pooled vector is a weighted mean over the tokens: reordering them changes nothing.
    case = next(_pool_cases(torch.Generator().manual_seed(13)))
    _pool_invariance(attention_pool, [case[n].float() for n in ("x", "query", "w_k", "w_v")])


def _pool_invariance(attention_pool, inputs):
    """Probe: reordering the tokens leaves the pooled vector and moves the weights."""
    what = "attention_pool"
    x, *rest = inputs
    pooled, weights = _unpack(call(attention_pool, x, *rest, what=what), what)
    perm = _derangement(x.shape[-2])
    moved, moved_w = _unpack(call(attention_pool, x[..., perm, :], *rest, what=what), what)
    if moved.shape != pooled.shape or moved_w.shape != weights.shape:
        return
    if not (same(moved, pooled) and same(moved_w, weights[..., perm])):
        fail("Reordering the tokens of x changes your pooled vector (or does not move the "
             "weights with the tokens): attention pooling is a weighted mean over the tokens, "
             "so it must not depend on their order. Is a position-dependent term involved?")


def _pool_shapes(pooled, weights, what, x, out_shape, w_shape) -> None:
    for got, expected, name in ((pooled, out_shape, "pooled vector"), (weights, w_shape, "weights")):
        if tuple(got.shape) == expected[:-1] + (1,) + expected[-1:]:
            fail(f"The {name} has shape {fmt(got.shape)}, expected {fmt(expected)}: it keeps an "
                 "axis of length 1 for the single query. Drop it (.squeeze(-2)): there is one "
                 "pooled vector per sequence and one weight per token.")
    expect_shape(weights, w_shape, f"the weights returned by {what} for x of shape {fmt(x.shape)}")
    expect_shape(pooled, out_shape, f"the pooled vector returned by {what}")


def _pool_case(attention_pool, case, dtype):
    what = "attention_pool"
    args = tuple(case[n] for n in ("x", "query", "w_k", "w_v"))
    inputs = [t.to(dtype) for t in args]
    before = [t.clone() for t in inputs]
    result = call(attention_pool, *inputs, what=what)
    for name, old, new in zip(("x", "query", "w_k", "w_v"), before, inputs):
        if not torch.equal(old, new):
            fail(f"{what} changed its input `{name}` in place: compute new tensors instead.")
    x, w_v = args[0], args[3]
    batch, length = tuple(x.shape[:-2]), x.shape[-2]
    out_shape, w_shape = batch + (w_v.shape[0],), batch + (length,)
    pooled, weights = _unpack(result, what, out_shape, w_shape)
    _pool_shapes(pooled, weights, what, x, out_shape, w_shape)
    if dtype == torch.float64:
        expect_dtype(pooled, dtype, f"{what} returns {pooled.dtype} for float64 inputs: keep "
                     "the inputs' dtype.")
    expect_finite(weights, "your attention weights", _OVERFLOW)
    ref_pooled, ref_w = _pool_reference(*args)
    if length > 1 and not (same(weights, ref_w) and same(pooled, ref_pooled)):
        _pool_invariance(attention_pool, inputs)
    sums = weights.detach().double().sum(dim=-1)
    general = (
        "Your weights differ from softmax_j(query . k_j) with k_j = x_j @ w_k.T."
        if torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
        else "Your weights do not sum to 1 over the tokens (the last axis): is the softmax "
        "missing, or taken over the wrong dim?"
    )
    _diagnose(weights, ref_w, _POOL_WEIGHTS, args, general, _WEIGHTS)
    _diagnose(pooled, ref_pooled, _POOL_OUTPUT, args, "Your weights are right but the pooled "
              "vector differs from sum_j weights_j v_j with v_j = x_j @ w_v.T.", _OUTPUT)


# ------------------------------------------ exercise 1.3: positions break the symmetry


def _self_attention_layer(w_q, w_k, w_v):
    """Chapter 1's plain self-attention as a function of x only."""

    def layer(x):
        q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # (..., L, d_v)

    return layer


def _as_number(result, what: str) -> float:
    if isinstance(result, torch.Tensor):
        if result.numel() != 1:
            fail(f"{what} returned a tensor of shape {fmt(result.shape)}: return one number, "
                 "the largest absolute difference (e.g. `.abs().max().item()`).")
        return result.item()
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return float(result)
    fail(f"{what} should return one number (a float); it returned a {type(result).__name__}.")


def _positions_variant(x, table, *, rows="first", op="add"):
    """add_positions with one option per mistake (the defaults give the right answer)."""
    length = x.shape[-2]
    chosen = {"all": table, "last": table[-length:], "first": table[:length]}[rows]
    if op == "cat":
        return torch.cat([x, chosen.expand(*x.shape[:-1], -1)], dim=-1)
    if op == "in place":
        x += chosen
        return x
    return {"add": lambda: x + chosen, "mul": lambda: x * chosen,
            "detach": lambda: x + chosen.detach(),
            "alone": lambda: chosen.expand(x.shape).clone()}[op]()


_ADD = [
    Mistake("Your result adds the last L rows of the table: token j gets position vector j, "
            "the first L rows (table[:L]).", partial(_positions_variant, rows="last")),
    Mistake("Your result multiplies x by the position vectors: add them.",
            partial(_positions_variant, op="mul")),
    Mistake("Your result is the position vectors alone: add them to x.",
            partial(_positions_variant, op="alone")),
    Caught(partial(_positions_variant, rows="all"), r"add only its first L rows, table\[:L\]"),
    Caught(partial(_positions_variant, op="cat"), "concatenates the positions"),
    Caught(partial(_positions_variant, op="detach"), "No gradient"),
    Caught(partial(_positions_variant, op="in place"), "in place"),
]


def _check_add_positions(add_positions, batch, length, d_model, max_length, dtype, generator):
    what = "add_positions"
    x = _random(*batch, length, d_model, generator=generator).to(dtype)
    table = _random(max_length, d_model, generator=generator).to(dtype).requires_grad_()
    before_x, before_table = x.clone(), table.detach().clone()
    hints = [Hint(RuntimeError, "", f"add_positions crashed for x of shape {fmt(x.shape)} and a "
                  f"table of {max_length} positions: the table has more rows than the sequence "
                  "has tokens; add only its first L rows, table[:L] with L = x.shape[-2].")]
    out = call(add_positions, x, table, what=what, hints=hints if max_length != length else ())
    if not torch.equal(x, before_x) or not torch.equal(table.detach(), before_table):
        fail("add_positions changed x or the table in place (x += ...): return a new tensor, "
             "x + table[:L].")
    expect_tensor(out, "what add_positions returns")
    if tuple(out.shape) == tuple(x.shape[:-1]) + (2 * d_model,):
        fail(f"add_positions returned shape {fmt(out.shape)}: it concatenates the positions to "
             "the features. They are added, so that the width stays d_model: x + table[:L].")
    expect_shape(out, x.shape, f"add_positions(x, table) for x of shape {fmt(x.shape)}")
    if not same(out, x + table.detach()[:length], atol=1e-6, rtol=1e-5):
        name_mistake(out, _ADD, x, table.detach(), atol=1e-6, rtol=1e-5, general="add_positions"
                     "(x, table) differs from x + table[:L], where token j gets row j.")
    grad = None
    if out.requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), table, allow_unused=True)
    expected_grad = torch.zeros_like(before_table)
    expected_grad[:length] = torch.tensor(batch).prod() if batch else 1
    if grad is None or not torch.allclose(grad, expected_grad):
        fail("No gradient (or the wrong one) reaches the table through add_positions: the "
             "position vectors are learned, so use the table itself (no .detach(), .data or "
             "torch.tensor(...) copy).")


def _gap_variant(layer, x, perm, *, compare="equivariant", reduce="max", absolute=True):
    """permutation_gap with one option per mistake (the defaults give the right answer)."""
    inverse = torch.argsort(perm)
    moved = layer(x[..., inverse if compare == "inverse input" else perm, :])
    expected = {"equivariant": lambda: layer(x)[..., perm, :], "invariant": lambda: layer(x),
                "inverse input": lambda: layer(x)[..., perm, :],
                "inverse output": lambda: layer(x)[..., inverse, :]}[compare]()
    diff = (moved - expected).abs() if absolute else moved - expected
    return (diff.mean() if reduce == "mean" else diff.max()).item()


_INVERSE = ("applies the inverse permutation on one side: reorder the input and the output "
            "the same way, layer(x[..., perm, :]) against layer(x)[..., perm, :].")
_GAP = [
    Mistake("compares layer(permuted x) with layer(x) itself: that tests invariance, and "
            "self-attention is not invariant, since its output rows move with the tokens. Permute "
            "layer(x) too: layer(x)[..., perm, :].", partial(_gap_variant, compare="invariant")),
    Mistake(_INVERSE, partial(_gap_variant, compare="inverse output")),
    Mistake(_INVERSE, partial(_gap_variant, compare="inverse input")),
    Mistake("returns the largest signed difference: take the absolute value first (.abs().max()), "
            "since the outputs can differ in either direction.",
            partial(_gap_variant, absolute=False)),
    Mistake("returns the mean absolute difference: the task asks for the largest, .max().",
            partial(_gap_variant, reduce="mean")),
    Caught(lambda *args: torch.tensor([_gap_variant(*args)] * 2), "return one number"),
    Caught(lambda layer, x, perm: (layer(x[:, perm]) - layer(x)[:, perm]).abs().max().item(),
           r"raised RuntimeError.*\(5, 6\)"),  # dim 1 holds the tokens only when x is 3-d
]


def _check_gap(permutation_gap, layer, x, perm, label):
    what = "permutation_gap(layer, x, perm)"
    before = x.clone()
    got = _as_number(call(permutation_gap, layer, x, perm, what=what), what)
    if not torch.equal(x, before):
        fail("permutation_gap changed x in place: permute into a new tensor (x[..., perm, :]).")
    expected = _gap_variant(layer, x, perm)
    if abs(got - expected) <= 1e-6 + 1e-4 * expected:
        return expected
    name_mistake(got, _GAP, layer, x, perm, prefix=f"On {label}, your permutation_gap ",
                 atol=1e-6)
    fail(f"On {label}, your permutation_gap returned {got:.4g}; the largest absolute difference "
         f"between layer(x[..., perm, :]) and layer(x)[..., perm, :] is {expected:.4g}.")


@exercise("1.3", "Positions break permutation-equivariance",
          mistakes={"permutation_gap": _GAP, "add_positions": _ADD})
def check_positions(permutation_gap, add_positions):
    example = "check_positions(permutation_gap, add_positions)"
    expect_callable(permutation_gap, "your permutation_gap function first", example)
    expect_callable(add_positions, "your add_positions function second", example)
    generator = torch.Generator().manual_seed(15)
    # add_positions: (batch, L, d_model, rows in the table, dtype)
    for batch, length, d_model, max_length, dtype in [
        ((2,), 5, 6, 9, torch.float32),
        ((), 4, 4, 4, torch.float32),
        ((2, 3), 1, 5, 8, torch.float32),
        ((3,), 6, 7, 10, torch.float64),
    ]:
        _check_add_positions(add_positions, batch, length, d_model, max_length, dtype, generator)
    # permutation_gap: a rotation (not its own inverse) on layers with a known gap.
    d_model, length = 6, 5
    attend = _self_attention_layer(*(_weight(d_model, d_model, generator) for _ in range(3)))
    table = _random(8, d_model, generator=generator)
    x = _random(2, length, d_model, generator=generator)
    perm = torch.roll(torch.arange(length), 2)  # [3, 4, 0, 1, 2]
    plain = _check_gap(permutation_gap, attend, x, perm, "plain self-attention")
    positioned = _check_gap(permutation_gap, lambda x: attend(x + table[: x.shape[-2]]), x, perm,
                            "self-attention with positions added")
    # the signed differences of these two are opposite: one of them tells max from abs max
    _check_gap(permutation_gap, lambda x: x.flip(-2), x, perm, "a layer that reverses the tokens")
    _check_gap(permutation_gap, lambda x: -x.flip(-2), x, perm, "a layer that reverses and negates")
    assert plain < 1e-9 < 1e-3 < positioned  # the check's own layers behave as described
    # x of any leading dims: (L, d) and (2, 3, L, d), the token axis is always -2
    for shape in [(length, d_model), (2, 3, length, d_model)]:
        _check_gap(permutation_gap, lambda x: attend(x + table[: x.shape[-2]]),
                   _random(*shape, generator=generator), perm,
                   f"self-attention with positions added, x of shape {fmt(shape)}")
    _check_together(permutation_gap, add_positions, attend, table, x, perm, positioned)


def _check_together(permutation_gap, add_positions, attend, table, x, perm, positioned):
    """Both functions together: positions added by the student's code break the symmetry."""
    gap = _as_number(call(permutation_gap, lambda x: attend(add_positions(x, table)), x, perm,
                          what="permutation_gap on self-attention after your add_positions"),
                     "permutation_gap")
    if abs(gap - positioned) > 1e-6 + 1e-4 * positioned:
        fail("Each function passed on its own, but permutation_gap(layer, x, perm) with "
             "layer(x) = attention(add_positions(x, table)) gives another gap than expected: "
             "does add_positions depend on anything but x.shape[-2] and the table?")
