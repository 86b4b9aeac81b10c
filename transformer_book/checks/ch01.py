"""Checks for chapter 1, attention and self-attention.

Every check computes its reference in float64 from the same inputs it hands to your
function. When your answer differs, the check first recomputes the answers that the
usual mistakes would give (softmax over the wrong axis, a missing tanh, a weight matrix
used without its transpose, the wrong sequence for the keys ...) and names the one that
matches; only if none does it fall back to a general message.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._core import (
    call,
    diagnose,
    exercise,
    expect_callable,
    expect_shape,
    expect_tensor,
    fail,
    same,
)

ATOL, RTOL = 1e-5, 1e-4

# --------------------------------------------------------------------------- helpers


def _close(actual, expected) -> bool:
    return same(actual, expected, atol=ATOL, rtol=RTOL)


def _random(*shape, generator, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _weight(d_out, d_in, generator):
    """A weight in nn.Linear's layout (out_features, in_features), scaled like its init."""
    return _random(d_out, d_in, generator=generator, scale=1 / math.sqrt(d_in))


def _derangement(length: int) -> torch.Tensor:
    """A permutation that moves every position (a rotation by one)."""
    return torch.roll(torch.arange(length), 1)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _unpack(result, what: str, out_shape=None, weights_shape=None):
    """Split the returned pair, with a specific message for the usual slips."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        kind = type(result).__name__
        if isinstance(result, torch.Tensor):
            kind = f"one tensor of shape {_fmt(result.shape)}"
        fail(f"{what} should return a pair (output, weights), but it returned {kind}.")
    output, weights = result
    expect_tensor(output, f"the first thing {what} returns (the output)")
    expect_tensor(weights, f"the second thing {what} returns (the attention weights)")
    if (
        out_shape is not None
        and tuple(out_shape) != tuple(weights_shape)
        and tuple(output.shape) == tuple(weights_shape)
        and tuple(weights.shape) == tuple(out_shape)
    ):
        fail(f"{what} returned (weights, output): return them in the order (output, weights).")
    return output, weights


def _check_weights_shape(weights, expected, lq: int, lk: int, what: str, extra: str = "") -> None:
    expected = tuple(expected)
    got = tuple(weights.shape)
    batch = expected[:-2]
    if got == expected:
        return
    if lq != lk and got == batch + (lk, lq):
        fail(
            f"The attention weights have shape {_fmt(got)}, expected {_fmt(expected)}: they are "
            "transposed. Rows belong to the queries (Lq) and columns to the keys (Lk), "
            "so scores = queries @ keys.transpose(-2, -1)."
        )
    if got == batch + (lq,) or got == batch + (lk,):
        fail(
            f"The attention weights have shape {_fmt(got)}, expected {_fmt(expected)}: one score "
            "per query, where there must be one per (query, key) pair. Did you pair query i "
            f"with key i only?{extra}"
        )
    expect_shape(weights, expected, f"The attention weights returned by {what}")


def _diagnose(actual, reference, wrong_answers, general: str) -> None:
    """Fail with the message of the first wrong answer ``actual`` matches, else ``general``."""
    if not _close(actual, reference):
        diagnose(actual, wrong_answers, general, atol=ATOL, rtol=RTOL)


def _rows_sum_message(weights: torch.Tensor) -> str | None:
    sums = weights.detach().double().sum(dim=-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        columns = weights.detach().double().sum(dim=-2)
        if torch.allclose(columns, torch.ones_like(columns), atol=1e-4):
            return (
                "The attention weights sum to 1 down each column (over the queries), not along "
                "each row (over the keys): softmax over dim=-2 instead of dim=-1?"
            )
        return (
            "The attention weights do not sum to 1 over the keys (the last axis): is the softmax "
            "missing, or taken over the wrong dim?"
        )
    return None


def _plain_attention(q, k, v, scale=1.0, dim=-1):
    weights = torch.softmax(scale * q @ k.transpose(-2, -1), dim=dim)
    return weights @ v, weights


def _reference_attention(q, k, v):
    """PyTorch's own attention with the 1/sqrt(d_k) scale switched off (scale=1)."""
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (..., Lq, Lk)
    output = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (..., Lq, d_v)
    return output, weights


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


def _additive_cases(generator):
    # (batch, Lq, Lk, d_q, d_k, d_v, d_h). The first case has Lq = Lk, square weights and
    # d_k = d_v, so that every wrong answer below can be computed and recognised.
    shapes = [
        ((2,), 4, 4, 5, 5, 5, 5),
        ((2,), 3, 5, 4, 4, 4, 4),
        ((), 4, 7, 3, 6, 2, 5),
        ((2, 3), 5, 1, 4, 4, 3, 6),
        ((3,), 1, 6, 2, 7, 4, 3),
    ]
    for batch, lq, lk, d_q, d_k, d_v, d_h in shapes:
        yield dict(
            query=_random(*batch, lq, d_q, generator=generator),
            key=_random(*batch, lk, d_k, generator=generator),
            value=_random(*batch, lk, d_v, generator=generator),
            w_q=_weight(d_h, d_q, generator),
            w_k=_weight(d_h, d_k, generator),
            w_s=_random(d_h, generator=generator, scale=2.0),
        )


@exercise("1.1", "Additive (Bahdanau) attention")
def check_additive_attention(additive_attention):
    expect_callable(
        additive_attention,
        "your additive attention function",
        "check_additive_attention(additive_attention)",
    )
    generator = torch.Generator().manual_seed(11)
    for number, case in enumerate(_additive_cases(generator)):
        _additive_case(additive_attention, case, torch.float64 if number == 3 else torch.float32)


def _additive_case(additive_attention, case, dtype):
    what = "additive_attention"
    query, key, value = case["query"], case["key"], case["value"]
    w_q, w_k, w_s = case["w_q"], case["w_k"], case["w_s"]
    inputs = [case[n].to(dtype) for n in ("query", "key", "value", "w_q", "w_k", "w_s")]
    result = call(additive_attention, *inputs, what=what)
    lq, lk = query.shape[-2], key.shape[-2]
    batch = tuple(query.shape[:-2])
    out_shape, w_shape = batch + (lq, value.shape[-1]), batch + (lq, lk)
    output, weights = _unpack(result, what, out_shape, w_shape)
    _check_weights_shape(
        weights,
        w_shape,
        lq,
        lk,
        what,
        " Broadcast instead: (..., Lq, 1, d_h) + (..., 1, Lk, d_h) gives every pair.",
    )
    ref_out, ref_w = _additive_reference(query, key, value, w_q, w_k, w_s)

    def weights_of(**options):
        return torch.softmax(_additive_scores(query, key, w_q, w_k, w_s, **options), dim=-1)

    wrong_weights = [
        (
            lambda: weights_of(tanh=False),
            "Your weights match additive attention without the tanh. Without it the score "
            "splits into w_s.(W_q q_i) + w_s.(W_k k_j); the query part is the same for every "
            "key and cancels in the softmax, so every query gets the same weights. Apply "
            "tanh to W_q q_i + W_k k_j, then take the dot product with w_s.",
        ),
        (
            lambda: torch.softmax(
                torch.tanh(_additive_scores(query, key, w_q, w_k, w_s, tanh=False)), dim=-1
            ),
            "Your weights match tanh applied after the dot product with w_s. The tanh acts "
            "on each hidden unit of W_q q_i + W_k k_j; w_s then combines the units into "
            "one score.",
        ),
        (
            lambda: weights_of(dot=False),
            "Your weights match summing the hidden units tanh(W_q q_i + W_k k_j) over d_h; "
            "the score is their dot product with the learned vector w_s.",
        ),
        (
            lambda: weights_of(transpose=False),
            "Your weights match x @ w_q and x @ w_k without the transpose. The weights are "
            "stored like nn.Linear's, with shape (out_features, in_features) = (d_h, d_in), "
            "so the projection is x @ w_q.T.",
        ),
        (
            lambda: torch.softmax(_additive_scores(query, key, w_q, w_k, w_s), dim=-2),
            "Your weights match a softmax over the queries (dim=-2): each key's column sums "
            "to 1. The softmax runs over the keys (dim=-1), so each query's row sums to 1.",
        ),
    ]
    row_sums = _rows_sum_message(weights)
    general = row_sums or (
        "Your attention weights differ from the reference weights "
        "softmax_j(w_s . tanh(W_q q_i + W_k k_j))."
    )
    _diagnose(weights, ref_w, wrong_weights, general)

    wrong_outputs = [
        (
            lambda: ref_w @ key,
            "Your weights are right but the output matches the weighted mean of the keys: "
            "the keys only decide the weights; the output averages the values.",
        ),
        (
            lambda: ref_w.transpose(-2, -1) @ value,
            "Your weights are right but the output uses them transposed: "
            "output = weights @ value, one row per query.",
        ),
    ]
    _diagnose(
        output,
        ref_out,
        wrong_outputs,
        "Your weights are right but the output differs from weights @ value.",
    )


# --------------------------------------------------------- exercise 1.2: self-attention


def _self_cases(generator):
    # (batch, L, d_model, d_k, d_v). The first case is square (d_model = d_k = d_v) so
    # that every wrong answer below can be computed and recognised.
    shapes = [
        ((2,), 4, 6, 6, 6),
        ((3,), 5, 8, 4, 3),
        ((), 7, 6, 5, 2),
        ((1,), 1, 5, 3, 4),
        ((2, 3), 4, 10, 7, 5),
    ]
    for batch, length, d_model, d_k, d_v in shapes:
        yield dict(
            x=_random(*batch, length, d_model, generator=generator),
            w_q=_weight(d_k, d_model, generator),
            w_k=_weight(d_k, d_model, generator),
            w_v=_weight(d_v, d_model, generator),
        )


def _self_reference(x, w_q, w_k, w_v):
    return _reference_attention(x @ w_q.T, x @ w_k.T, x @ w_v.T)


def _projection_mistakes(q, k, d_k, raw_q, raw_k, what_q="x", what_k="x"):
    """Wrong ways to turn projected queries and keys into weights (all shapes (..., Lq, Lk))."""
    return [
        (
            lambda: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_k), dim=-1),
            "Your weights match scores divided by sqrt(d_k): that is chapter 2's scaled "
            "attention. This exercise asks for the plain dot products of chapter 1 (no scale).",
        ),
        (
            lambda: torch.softmax(q @ k.transpose(-2, -1) / d_k, dim=-1),
            "Your weights match scores divided by d_k. This exercise uses the plain dot "
            "products of chapter 1, with no scale.",
        ),
        (
            lambda: torch.softmax(q @ k.transpose(-2, -1), dim=-2),
            "Your weights match a softmax over the queries (dim=-2): each column sums to 1. "
            "Each query's row must sum to 1: softmax over the keys, dim=-1.",
        ),
        (
            lambda: torch.softmax(q @ k.transpose(-2, -1), dim=-1).transpose(-2, -1),
            "Your weights are the right weights transposed: rows must be queries and columns "
            "keys (weights[..., i, j] is how much query i takes from key j).",
        ),
        (
            lambda: torch.softmax(k @ q.transpose(-2, -1), dim=-1),
            "Your weights match softmax(K Q^T): queries and keys swapped. The scores are "
            "Q K^T, one row per query.",
        ),
        (
            lambda: torch.softmax(raw_q @ raw_k.transpose(-2, -1), dim=-1),
            f"Your weights match softmax({what_q} {what_k}^T): the inputs were used as queries "
            "and keys without the projections w_q and w_k.",
        ),
    ]


@exercise("1.2", "Self-attention from weight matrices")
def check_self_attention(self_attention):
    expect_callable(
        self_attention, "your self-attention function", "check_self_attention(self_attention)"
    )
    generator = torch.Generator().manual_seed(12)
    for number, case in enumerate(_self_cases(generator)):
        _self_case(self_attention, case, torch.float64 if number == 4 else torch.float32)

    # The property the chapter demonstrates, checked on its own: permuting the tokens of x
    # permutes the outputs (and the weights' rows and columns) the same way.
    what = "self_attention"
    case = next(_self_cases(torch.Generator().manual_seed(13)))
    inputs = [case[n].float() for n in ("x", "w_q", "w_k", "w_v")]
    output, weights = _unpack(call(self_attention, *inputs, what=what), what)
    _equivariance(self_attention, inputs, output, weights, what)


def _self_case(self_attention, case, dtype):
    what = "self_attention"
    x, w_q, w_k, w_v = case["x"], case["w_q"], case["w_k"], case["w_v"]
    inputs = [t.to(dtype) for t in (x, w_q, w_k, w_v)]
    result = call(self_attention, *inputs, what=what)
    length, d_k, d_v = x.shape[-2], w_q.shape[0], w_v.shape[0]
    batch = tuple(x.shape[:-2])
    output, weights = _unpack(result, what, batch + (length, d_v), batch + (length, length))
    _check_weights_shape(weights, batch + (length, length), length, length, what)
    expect_shape(output, batch + (length, d_v), f"the output returned by {what}")
    ref_out, ref_w = _self_reference(x, w_q, w_k, w_v)
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T

    if not (_close(weights, ref_w) and _close(output, ref_out)):
        _equivariance(self_attention, inputs, output, weights, what)

    wrong_weights = _projection_mistakes(q, k, d_k, x, x) + [
        (
            lambda: torch.softmax((x @ w_q) @ (x @ w_k).transpose(-2, -1), dim=-1),
            "Your weights match x @ w_q and x @ w_k without the transpose. The weights are "
            "stored like nn.Linear's, with shape (out_features, in_features), so the "
            "projection is x @ w_q.T.",
        ),
    ]
    general = _rows_sum_message(weights) or (
        "Your attention weights differ from softmax(Q K^T) with Q = x @ w_q.T and K = x @ w_k.T."
    )
    _diagnose(weights, ref_w, wrong_weights, general)

    wrong_outputs = [
        (
            lambda: ref_w @ x,
            "Your weights are right but the output averages x itself: project the values "
            "first, V = x @ w_v.T, then output = weights @ V.",
        ),
        (
            lambda: ref_w @ k,
            "Your weights are right but the output averages the keys: the output is "
            "weights @ V with V = x @ w_v.T.",
        ),
        (
            lambda: ref_w @ (x @ w_v),
            "Your weights are right but the values are x @ w_v without the transpose; "
            "w_v has nn.Linear's shape (d_v, d_model), so V = x @ w_v.T.",
        ),
        (
            lambda: ref_w.transpose(-2, -1) @ v,
            "Your weights are right but the output uses them transposed: output = weights @ V.",
        ),
    ]
    _diagnose(
        output,
        ref_out,
        wrong_outputs,
        "Your weights are right but the output differs from weights @ (x @ w_v.T).",
    )


def _equivariance(self_attention, inputs, output, weights, what):
    x, *rest = inputs
    perm = _derangement(x.shape[-2])
    if len(perm) < 2:
        return
    moved_out, moved_w = _unpack(call(self_attention, x[..., perm, :], *rest, what=what), what)
    if moved_out.shape != output.shape or moved_w.shape != weights.shape:
        return
    same_out = torch.allclose(moved_out, output[..., perm, :], atol=1e-4, rtol=1e-3)
    same_w = torch.allclose(moved_w, weights[..., perm, :][..., perm], atol=1e-4, rtol=1e-3)
    if not (same_out and same_w):
        fail(
            "Permuting the tokens of x does not permute your output the same way, so your "
            "function depends on token positions (a causal mask? a position-dependent term?). "
            "Plain self-attention has no notion of position: it is permutation-equivariant."
        )


# -------------------------------------------------------- exercise 1.3: cross-attention


def _cross_cases(generator):
    # (batch, Lq, Lk, d_model, d_memory, d_k, d_v). The first case has Lq = Lk and one width
    # everywhere, so that every mix-up of the two sequences can be computed and recognised;
    # the second keeps the widths equal but makes Lq != Lk, so mix-ups show in the shapes.
    shapes = [
        ((2,), 4, 4, 6, 6, 6, 6),
        ((2,), 3, 5, 6, 6, 6, 6),
        ((), 2, 7, 8, 5, 4, 3),
        ((3,), 6, 1, 4, 6, 5, 2),
        ((2, 2), 1, 5, 3, 9, 6, 4),
    ]
    for batch, lq, lk, d_model, d_memory, d_k, d_v in shapes:
        yield dict(
            x=_random(*batch, lq, d_model, generator=generator),
            memory=_random(*batch, lk, d_memory, generator=generator),
            w_q=_weight(d_k, d_model, generator),
            w_k=_weight(d_k, d_memory, generator),
            w_v=_weight(d_v, d_memory, generator),
        )


@exercise("1.3", "Cross-attention")
def check_cross_attention(cross_attention):
    expect_callable(
        cross_attention, "your cross-attention function", "check_cross_attention(cross_attention)"
    )
    generator = torch.Generator().manual_seed(14)
    for number, case in enumerate(_cross_cases(generator)):
        _cross_case(cross_attention, case, torch.float64 if number == 4 else torch.float32)


def _cross_case(cross_attention, case, dtype):
    what = "cross_attention"
    x, memory = case["x"], case["memory"]
    w_q, w_k, w_v = case["w_q"], case["w_k"], case["w_v"]
    inputs = [t.to(dtype) for t in (x, memory, w_q, w_k, w_v)]
    result = call(cross_attention, *inputs, what=what)
    lq, lk, d_k, d_v = x.shape[-2], memory.shape[-2], w_q.shape[0], w_v.shape[0]
    batch = tuple(x.shape[:-2])
    out_shape, w_shape = batch + (lq, d_v), batch + (lq, lk)
    output, weights = _unpack(result, what, out_shape, w_shape)
    if lq != lk:
        got_w, got_out = tuple(weights.shape), tuple(output.shape)
        if got_w == batch + (lq, lq):
            fail(
                f"The attention weights have shape {_fmt(got_w)}, one column per token of x: "
                "the keys were computed from x. In cross-attention the queries come from x "
                "and the keys and values from memory, so weights are (..., Lq, Lk)."
            )
        if got_w == batch + (lk, lk) or got_out == batch + (lk, d_v):
            fail(
                f"Your output has shape {_fmt(got_out)} and weights {_fmt(got_w)}: one row per memory "
                "token, so the queries were computed from memory. Queries come from x (the "
                "sequence that asks); keys and values from memory."
            )
    _check_weights_shape(weights, w_shape, lq, lk, what)
    expect_shape(output, out_shape, f"the output returned by {what}")

    ref_out, ref_w = _reference_attention(x @ w_q.T, memory @ w_k.T, memory @ w_v.T)
    q, k, v = x @ w_q.T, memory @ w_k.T, memory @ w_v.T
    # the same projections applied to the other sequence (only where the widths allow)

    def q_self():
        return memory @ w_q.T

    def k_self():
        return x @ w_k.T

    def v_self():
        return x @ w_v.T

    if not (_close(weights, ref_w) and _close(output, ref_out)):
        _sources(cross_attention, inputs, output, what)

    wrong_weights = [
        (
            lambda: torch.softmax(q @ k_self().transpose(-2, -1), dim=-1),
            "Your weights match queries and keys both computed from x: that is "
            "self-attention. In cross-attention the keys come from memory: K = memory @ w_k.T.",
        ),
        (
            lambda: torch.softmax(q_self() @ k.transpose(-2, -1), dim=-1),
            "Your weights match queries and keys both computed from memory. The queries "
            "come from x: Q = x @ w_q.T.",
        ),
        (
            lambda: torch.softmax(q_self() @ k_self().transpose(-2, -1), dim=-1),
            "Your weights match the two sequences swapped: queries from memory and keys "
            "from x. Queries come from x, keys and values from memory.",
        ),
        (
            lambda: torch.softmax((x @ w_q) @ (memory @ w_k).transpose(-2, -1), dim=-1),
            "Your weights match x @ w_q and memory @ w_k without the transpose. The weights "
            "are stored like nn.Linear's, (out_features, in_features), so Q = x @ w_q.T.",
        ),
    ] + _projection_mistakes(q, k, d_k, x, memory, "x", "memory")
    general = _rows_sum_message(weights) or (
        "Your attention weights differ from softmax(Q K^T) with Q = x @ w_q.T and "
        "K = memory @ w_k.T."
    )
    _diagnose(weights, ref_w, wrong_weights, general)

    wrong_outputs = [
        (
            lambda: ref_w @ v_self(),
            "Your weights are right but the values come from x. Keys and values both come "
            "from memory: V = memory @ w_v.T.",
        ),
        (
            lambda: ref_w @ memory,
            "Your weights are right but the output averages memory itself: project it "
            "first, V = memory @ w_v.T.",
        ),
        (
            lambda: ref_w @ k,
            "Your weights are right but the output averages the keys; it averages the "
            "values V = memory @ w_v.T.",
        ),
        (
            lambda: ref_w.transpose(-2, -1) @ v,
            "Your weights are right but the output uses them transposed: output = weights @ V.",
        ),
    ]
    _diagnose(
        output,
        ref_out,
        wrong_outputs,
        "Your weights are right but the output differs from weights @ (memory @ w_v.T).",
    )


def _sources(cross_attention, inputs, output, what):
    """Does the output depend on memory at all, and on x at all? Each must matter."""
    x, memory, *weights = inputs
    new_memory = memory.flip(-1) + 1.0
    out_memory, _ = _unpack(call(cross_attention, x, new_memory, *weights, what=what), what)
    if out_memory.shape == output.shape and torch.allclose(out_memory, output, atol=1e-6):
        fail(
            "Your output does not change when memory changes: the keys and values were computed "
            "from x, which makes it self-attention. Take K and V from memory."
        )
    if x.shape[-2] > 1:
        new_x = x.flip(-1) + 1.0
        out_x, _ = _unpack(call(cross_attention, new_x, memory, *weights, what=what), what)
        if out_x.shape == output.shape and torch.allclose(out_x, output, atol=1e-6):
            fail(
                "Your output does not change when x changes: the queries were computed from "
                "memory. Take Q from x."
            )
