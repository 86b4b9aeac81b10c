"""Checks for the exercises of chapter 2, scaled dot-product attention.

Each check compares the student's code with a reference (PyTorch's own where one
exists) and, when they differ, first compares it with what the usual mistakes would
produce, so that the failure names the likely misconception.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._core import (
    CheckFailure,
    call,
    diagnose,
    exercise,
    expect_callable,
    expect_close,
    expect_shape,
    expect_tensor,
    expect_unchanged,
    fail,
    forbidden,
    same,
)
from ._scratch import attention_functions, refused_calls

# PyTorch's softmax, kept before any patching (exercise 2.1 forbids it to the student).
_softmax = torch.softmax


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _random_mask(*shape, seed: int, p: float = 0.6) -> torch.Tensor:
    """A boolean mask of ``shape`` with at least one True in every row (and some False)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) < p
    if shape[-1] > 1:
        mask[..., -1] = False
    mask[..., 0] = True
    return mask


def _reference_masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the allowed entries; rows with none allowed are 0."""
    filled = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.where(mask, _softmax(filled, dim=-1), 0.0)


def _reject_nonfinite(tensor: torch.Tensor, what: str, hint: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = "NaN" if torch.isnan(tensor).any() else "inf"
        fail(f"{what} contains {bad}: {hint}")


# ----------------------------------------------------------------------------- exercise 2.1

_BUILTIN_SOFTMAXES = [
    (torch, "softmax"),
    (torch, "log_softmax"),
    (torch.Tensor, "softmax"),
    (torch.Tensor, "log_softmax"),
    (F, "softmax"),
    (F, "log_softmax"),
    (torch.special, "softmax"),
    (torch.special, "log_softmax"),
]


_BUILTIN_SOFTMAX_MESSAGE = (
    "your stable_softmax calls PyTorch's softmax (torch.softmax, F.softmax, "
    "Tensor.softmax or a log_softmax): the exercise is to write it yourself with "
    "exp, amax and sum."
)


def _call_softmax(softmax, x: torch.Tensor, dim: int) -> torch.Tensor:
    before = x.detach().clone()
    with forbidden(_BUILTIN_SOFTMAXES, _BUILTIN_SOFTMAX_MESSAGE):
        try:
            y = call(softmax, x, dim=dim, what=f"stable_softmax(x, dim={dim})")
        except CheckFailure as failure:
            if isinstance(failure.__cause__, TypeError) and "return_types" in str(
                failure.__cause__
            ):
                fail(
                    f"{failure} x.max(dim=...) returns a pair (values, indices), not a "
                    "tensor: use x.amax(dim=dim, keepdim=True) or x.max(dim=dim, "
                    "keepdim=True).values."
                )
            if isinstance(failure.__cause__, RuntimeError) and "size of tensor" in str(
                failure.__cause__
            ):
                fail(
                    f"{failure} The shapes did not line up: a reduction such as "
                    "x.amax(dim=dim) or .sum(dim=dim) without keepdim=True drops the dim, "
                    "so it no longer broadcasts against x."
                )
            raise
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"stable_softmax(x, dim={dim}) for x of shape {tuple(x.shape)}")


def _softmax_with_max_over(x: torch.Tensor, dim: int, max_dim: int) -> torch.Tensor:
    exps = (x - x.amax(dim=max_dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


@exercise("2.1", "Numerically stable softmax")
def check_stable_softmax(softmax):
    """Compare ``softmax(x, dim=...)`` with ``torch.softmax`` on shapes, dims and extremes."""
    expect_callable(softmax, "your softmax function", "check_stable_softmax(stable_softmax)")

    # 1. A plain (4, 6) input over the last dim.
    x = _randn(4, 6, seed=0)
    y = _call_softmax(softmax, x, -1)
    expected = _softmax(x, dim=-1)
    if not same(y, expected):
        _reject_nonfinite(y, "stable_softmax(x) for ordinary x of shape (4, 6)", "check the formula.")
        if torch.allclose(y.sum(), torch.tensor(1.0)):
            fail("the whole tensor sums to 1, not each row: the sum runs over every entry; sum "
                 "along `dim` only (.sum(dim=dim, keepdim=True)).")
        diagnose(
            y,
            [
                (_softmax(x, dim=0), "each column sums to 1 instead of each row: you normalized "
                 "over dim 0, not over the `dim` argument (-1)."),
                (_softmax_with_max_over(x, -1, 0), "the max you subtract is taken along another "
                 "dim than the sum: a shift that varies along `dim` changes the softmax; use "
                 "x.amax(dim=dim, keepdim=True)."),
            ],
        )
        expect_close(y, expected, "stable_softmax(x, dim=-1) differs from torch.softmax on a "
                     "(4, 6) input: softmax(x)_i = exp(x_i) / sum_j exp(x_j) along dim")

    # 2. A square input: a reduction without keepdim broadcasts silently along the wrong axis.
    x = _randn(5, 5, seed=1)
    y = _call_softmax(softmax, x, -1)
    expected = _softmax(x, dim=-1)
    if not same(y, expected):
        m, m_flat = x.amax(dim=-1, keepdim=True), x.amax(dim=-1)
        e = (x - m).exp()
        e_flat = (x - m_flat).exp()
        keepdim = (
            "on a square (5, 5) input your result is wrong although it has the right shape: "
            "a reduction without keepdim=True (x.sum(dim=-1) has shape (5,)) lines up with "
            "the last dim, not with the rows; pass keepdim=True to amax and sum."
        )
        diagnose(
            y,
            [
                (e / e.sum(dim=-1), keepdim),
                (e_flat / e_flat.sum(dim=-1, keepdim=True), keepdim),
                (e_flat / e_flat.sum(dim=-1), keepdim),
            ],
        )
        expect_close(y, expected, "stable_softmax(x, dim=-1) differs from torch.softmax on a "
                     "(5, 5) input")

    # 3. The dim argument, on a 3-d input.
    x = _randn(2, 3, 4, seed=2)
    for dim in (0, 1, 2, -2, -3):
        y = _call_softmax(softmax, x, dim)
        expected = _softmax(x, dim=dim)
        if same(y, expected):
            continue
        if same(y, _softmax(x, dim=-1)):
            fail(f"stable_softmax(x, dim={dim}) normalizes over the last dim: your function "
                 "ignores its `dim` argument.")
        for other in range(x.dim()):
            if same(y, _softmax(x, dim=other)):
                fail(f"stable_softmax(x, dim={dim}) on a (2, 3, 4) input normalizes over dim "
                     f"{other}: use `dim` in every reduction (amax and sum).")
        for other in range(x.dim()):
            if same(y, _softmax_with_max_over(x, dim, other)):
                fail(f"stable_softmax(x, dim={dim}) on a (2, 3, 4) input subtracts the max "
                     f"along dim {other} but sums along dim {dim}: the shift must be the same "
                     "for every entry along `dim`, or it changes the softmax; use "
                     "x.amax(dim=dim, keepdim=True) with the same `dim` as the sum.")
        expect_close(y, expected, f"stable_softmax(x, dim={dim}) differs from torch.softmax on a "
                     "(2, 3, 4) input")

    # 4. Extremes: exp(1000) overflows to inf, exp(-1000) underflows to 0.
    extremes = [
        (torch.tensor([[1000.0, 999.0, 998.0, 0.0], [1000.0, -1000.0, 500.0, 1000.0]]),
         "with entries near 1000, exp overflows to inf and inf / inf is NaN"),
        (torch.tensor([[-1000.0, -1001.0, -1002.0]]),
         "with entries near -1000, exp underflows to 0 and 0 / 0 is NaN"),
        (torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, 2.0]]),
         "an entry of -inf (a masked score) must get weight 0"),
        (torch.tensor([[3.0], [-7.0]]),
         "along a dim of length 1 every weight is 1"),
        (torch.tensor([[0.0, 1.0, 2.0], [-200.0, -201.0, -199.0]]),
         "rows of very different scale each need their own shift"),
    ]
    for x, problem in extremes:
        y = _call_softmax(softmax, x, -1)
        expected = _softmax(x, dim=-1)
        global_shift = (x - x.max()).exp()
        global_shift = global_shift / global_shift.sum(dim=-1, keepdim=True)
        if not same(y, expected) and same(y, global_shift, equal_nan=True):
            fail(f"stable_softmax(x) for x = {x.tolist()} gives NaN in a row far below the "
                 "others: you subtract one maximum for the whole tensor (x.max()), so every "
                 "exp in that row underflows to 0 and the row is 0 / 0; subtract the max of "
                 "each row along dim, x.amax(dim=dim, keepdim=True).")
        _reject_nonfinite(
            y,
            f"stable_softmax(x) for x = {x.tolist()}",
            f"{problem}: subtract the max along dim before exp "
            "(softmax(x) = softmax(x - c) for any c constant along dim).",
        )
        expect_close(y, expected, f"stable_softmax(x) for x = {x.tolist()} differs from "
                     f"torch.softmax ({problem})")

    # 5. float64 stays float64, to float64 precision.
    x = 10 * _randn(3, 7, seed=3, dtype=torch.float64)
    y = _call_softmax(softmax, x, -1)
    if y.dtype != torch.float64:
        fail(f"stable_softmax returns {y.dtype} for a float64 input: keep the input's dtype "
             "(no .float() or torch.tensor(..., dtype=...) inside).")
    expect_close(y, _softmax(x, dim=-1), "stable_softmax differs from torch.softmax in "
                 "float64", atol=1e-12, rtol=1e-10)

    # 6. Gradients flow like torch.softmax's.
    x = _randn(3, 5, seed=4).requires_grad_()
    g = _randn(3, 5, seed=5)
    y = _call_softmax(softmax, x, -1)
    if not y.requires_grad:
        fail("the result of stable_softmax carries no gradient: is it computed under "
             "torch.no_grad(), from x.detach()/x.data, or through .item()/.tolist()?")
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad((_softmax(x_ref, dim=-1) * g).sum(), x_ref)
    expect_close(grad, grad_ref, "the gradient of stable_softmax differs from torch.softmax's: "
                 "is part of it computed from x.detach() or x.data?")


# ----------------------------------------------------------------------------- exercise 2.2

_INVERTED = (
    "the weights are nonzero exactly where the mask is False: True means the key may be "
    "attended to (the convention of torch.nn.functional.scaled_dot_product_attention); you "
    "treated True as blocked."
)
_AFTER = (
    "the rows no longer sum to 1: the mask was applied after the softmax, which zeroes the "
    "hidden weights but leaves the others too small; mask the scores before normalizing."
)
_FROM_SCRATCH = (
    "your local_attention calls a ready-made attention function (the book's "
    "scaled_dot_product_attention or PyTorch's F.scaled_dot_product_attention): the exercise "
    "is to write the attention step yourself (scores, scale, mask, softmax, weighted sum)."
)


def _window_reference(length: int, window: int) -> torch.Tensor:
    """(L, L) bool, True where |i - j| <= window."""
    positions = torch.arange(length)
    return (positions[:, None] - positions[None, :]).abs() <= window


def _window_mistakes(length: int, window: int):
    """(wrong (L, L) mask, what it shows) for the usual ways to build the band wrongly."""
    positions = torch.arange(length)
    offset = positions[:, None] - positions[None, :]  # i - j
    band = offset.abs() <= window
    return [
        (~band, "it is True outside the window and False inside: in this course True means "
         "'may attend', so the band |i - j| <= window is True."),
        ((offset >= 0) & (offset <= window), "it only looks back (keys i - window ... i, a "
         "causal window): the window is two-sided, |i - j| <= window."),
        ((offset <= 0) & (offset >= -window), "it only looks ahead (keys i ... i + window): "
         "the window is two-sided, |i - j| <= window."),
        (offset.abs() < window, "it uses |i - j| < window, which leaves out the edges of the "
         "window: a query sees `window` keys on each side, |i - j| <= window."),
        (offset.abs() <= window + 1, "it lets one key too many in on each side: "
         "|i - j| <= window, not window + 1."),
        (torch.ones(length, length, dtype=torch.bool), "it is True everywhere: the window "
         "has no effect."),
        (torch.eye(length, dtype=torch.bool), "only the diagonal is True: each query sees "
         "itself alone, whatever the window."),
    ]


def _check_window_mask(local_window_mask, length: int, window: int) -> None:
    what = f"local_window_mask({length}, {window})"
    got = expect_tensor(call(local_window_mask, length, window, what=what), what)
    expect_shape(got, (length, length), f"the mask returned by {what}")
    expected = _window_reference(length, window)
    if got.dtype != torch.bool:
        if torch.equal(got.detach().to(torch.float64), expected.to(torch.float64)):
            fail(
                f"{what} returns dtype {got.dtype}: return a bool tensor (e.g. a comparison "
                "such as `<=`). PyTorch adds a float mask to the scores instead of hiding keys."
            )
        fail(f"{what} returns dtype {got.dtype}; expected a bool tensor, True = may attend.")
    if torch.equal(got, expected):
        return
    for wrong, message in _window_mistakes(length, window):
        if torch.equal(got, wrong):
            fail(f"{what}: {message}")
    fail(f"{what} differs from the band |i - j| <= window (True = query i may attend to key j).")


def _call_local(local_attention, query, key, value, window):
    what = f"local_attention(query, key, value, window={window})"
    before = [t.detach().clone() for t in (query, key, value)]
    with refused_calls([local_attention], attention_functions(), _FROM_SCRATCH):
        result = call(local_attention, query, key, value, window, what=what)
    for name, old, new in zip(["query", "key", "value"], before, (query, key, value)):
        expect_unchanged(old, new.detach(), name)
    if not (isinstance(result, tuple) and len(result) == 2):
        fail("local_attention should return a tuple (output, weights), like "
             f"scaled_dot_product_attention; it returned a {type(result).__name__}.")
    output, weights = (expect_tensor(t, name) for t, name in zip(result, ["output", "weights"]))
    length = query.shape[-2]
    out_shape = (*query.shape[:-2], length, value.shape[-1])
    weights_shape = (*query.shape[:-2], length, length)
    if tuple(output.shape) == weights_shape and tuple(weights.shape) == out_shape != weights_shape:
        fail("the two results are in the wrong order: return (output, weights).")
    expect_shape(weights, weights_shape, f"the weights of {what}")
    expect_shape(output, out_shape, f"the output of {what}")
    return output, weights


def _local_weights_candidates(query, key, window):
    """(wrong weights, message) for the usual scaling, axis and mask mistakes."""
    d_k, length = query.shape[-1], query.shape[-2]
    raw = query @ key.transpose(-2, -1)  # (..., L, L)
    band = _window_reference(length, window)
    right = raw / d_k**0.5

    def masked(scores, allowed=band):
        return _reference_masked_softmax(scores, allowed)

    candidates = [
        (masked(raw), f"the weights match softmax(QK^T) without the 1/sqrt(d_k) scale: divide "
         f"the scores by sqrt(d_k) (here sqrt({d_k}))."),
        (masked(raw / d_k), f"the weights match the scores divided by d_k: the scale is "
         f"1/sqrt(d_k), not 1/d_k (here 1/sqrt({d_k}), not 1/{d_k})."),
        (masked(raw * d_k**0.5), "the weights match the scores multiplied by sqrt(d_k): "
         "divide by sqrt(d_k) instead."),
        (masked(right.mT, band.mT).mT, "the weights sum to 1 over the queries (dim -2), not "
         "over the keys: take the softmax over the last dim."),
        (masked(right, ~band), _INVERTED),
        (_softmax(right, dim=-1) * band, _AFTER),
        (_softmax(right, dim=-1), "the window has no effect: keys outside |i - j| <= window "
         "still get weight. Hide their scores before the softmax."),
    ]
    for wrong, message in _window_mistakes(length, window)[1:5]:
        candidates.append((masked(right, wrong), "your attention uses the wrong window: " + message))
    return candidates


def _local_case(local_attention, lead, length, d_k, d_v, window, seed, dtype=torch.float32):
    label = (f"with query {(*lead, length, d_k)}, value {(*lead, length, d_v)} and "
             f"window {window}")
    query = _randn(*lead, length, d_k, seed=seed, dtype=dtype).requires_grad_()
    key = _randn(*lead, length, d_k, seed=seed + 1, dtype=dtype)
    value = _randn(*lead, length, d_v, seed=seed + 2, dtype=dtype)
    output, weights = _call_local(local_attention, query, key, value, window)
    band = _window_reference(length, window)
    with torch.no_grad():
        scores = query @ key.transpose(-2, -1) / d_k**0.5
        expected_weights = _reference_masked_softmax(scores, band)
        expected_output = F.scaled_dot_product_attention(query, key, value, attn_mask=band)
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-4)
    if torch.isnan(weights).any() or torch.isnan(output).any():
        if not (~band).any(dim=-1).all():  # an inverted band leaves some query no key
            diagnose(torch.nan_to_num(weights.detach()), [(
                _reference_masked_softmax(scores, ~band), _INVERTED)])
        fail(f"{label}: your result contains NaN.")
    if not same(weights, expected_weights, atol, rtol):
        diagnose(weights, _local_weights_candidates(query.detach(), key, window))
        expect_close(weights, expected_weights, f"{label}: the weights differ from "
                     "softmax(QK^T / sqrt(d_k)) over the keys with |i - j| <= window", atol, rtol)
    if not same(output, expected_output, atol, rtol):
        diagnose(output, [(expected_weights @ key if d_k == d_v else None,
                           "the weights are right but the output averages the keys: "
                           "output = weights @ value.")])
        expect_close(output, expected_output, f"{label}: the weights are right but the output "
                     "is not weights @ value", atol, rtol)
    if output.dtype != dtype:
        fail(f"local_attention returns {output.dtype} for {dtype} inputs: keep their dtype.")
    if not output.requires_grad:
        fail("the output of local_attention carries no gradient: is it computed under "
             "torch.no_grad(), or from .detach()/.data?")
    (grad,) = torch.autograd.grad(output.sum(), query)
    _reject_nonfinite(grad, "the gradient with respect to `query`", "is a score filled with "
                      "-inf in a row that has no allowed key?")


@exercise("2.2", "A local-window mask")
def check_local_attention(local_window_mask, local_attention):
    """The band mask, then attention with it, compared with F.scaled_dot_product_attention."""
    example = "check_local_attention(local_window_mask, local_attention)"
    expect_callable(local_window_mask, "your mask function first", example)
    expect_callable(local_attention, "your attention function second", example)
    for length, window in [(7, 2), (6, 1), (5, 0), (4, 10), (1, 0), (8, 3)]:
        _check_window_mask(local_window_mask, length, window)

    cases = [  # (leading dims, L, d_k, d_v, window)
        ((2, 3), 7, 5, 5, 2),
        ((2,), 6, 8, 3, 1),
        ((), 5, 4, 2, 0),
        ((3,), 4, 16, 8, 10),
        ((1,), 1, 3, 2, 0),
        ((2,), 9, 12, 4, 3),
    ]
    for seed, (lead, length, d_k, d_v, window) in enumerate(cases):
        _local_case(local_attention, lead, length, d_k, d_v, window, seed=100 + 10 * seed)
    _local_case(local_attention, (2,), 6, 6, 3, 2, seed=200, dtype=torch.float64)


# ----------------------------------------------------------------------------- exercise 2.3


def _softmax_jacobian_autograd(scores: torch.Tensor) -> torch.Tensor:
    """d softmax(s)_j / d s_l for every row of ``scores`` (..., L), by autograd: (..., L, L)."""
    rows = scores.reshape(-1, scores.shape[-1])  # (rows, L)
    jac = torch.func.vmap(torch.func.jacrev(lambda row: _softmax(row, dim=-1)))(rows)
    return jac.reshape(*scores.shape, scores.shape[-1])


@exercise("2.3", "The softmax Jacobian for a batch")
def check_softmax_jacobian(softmax_jacobian):
    """Compare ``softmax_jacobian(weights)`` with autograd's Jacobian of torch.softmax."""
    expect_callable(softmax_jacobian, "your Jacobian function",
                    "check_softmax_jacobian(softmax_jacobian)")
    shapes = [(5,), (3, 4), (2, 3, 6), (2, 1), (1,)]
    for seed, shape in enumerate(shapes):
        scores = 2 * _randn(*shape, seed=600 + seed)
        weights = _softmax(scores, dim=-1)  # (..., L)
        before = weights.clone()
        try:
            jac = call(softmax_jacobian, weights, what="softmax_jacobian(weights)")
        except CheckFailure as failure:
            if len(shape) > 1:
                fail(f"{failure} For a batch of rows, torch.diag and torch.outer do not apply "
                     "(they take one vector); build the matrices with torch.diag_embed and "
                     "weights.unsqueeze(-1) * weights.unsqueeze(-2).")
            raise
        expect_unchanged(before, weights, "weights")
        L = shape[-1]
        expect_shape(jac, (*shape, L), f"softmax_jacobian(weights) for weights of shape {shape}")
        expected = _softmax_jacobian_autograd(scores)
        if same(jac, expected):
            continue
        p = weights
        diag = torch.diag_embed(p)  # (..., L, L)
        outer = p.unsqueeze(-1) * p.unsqueeze(-2)  # (..., L, L)
        diagnose(jac, [
            (-outer, "the off-diagonal entries are right but the diagonal is -p_j^2: the "
             "diag(p) term is missing (dA_j/dS_j = p_j - p_j^2)."),
            (outer - diag, "every entry has the wrong sign: J = diag(p) - p p^T, not "
             "p p^T - diag(p)."),
            (diag, "only diag(p): the -p_j p_l term, present on and off the diagonal, is "
             "missing."),
            (torch.diag_embed(p * (1 - p)), "the diagonal p_j (1 - p_j) is right but the "
             "off-diagonal entries are 0: changing score l also lowers every other weight, "
             "dA_j/dS_l = -p_j p_l."),
            (diag - outer.sum(dim=-1, keepdim=True), "the outer product p p^T was summed "
             "away: keep it as an (L, L) matrix."),
        ])
        expect_close(jac, expected, f"for weights of shape {shape}, softmax_jacobian differs "
                     "from autograd's Jacobian of torch.softmax (J = diag(p) - p p^T for each "
                     "row p)")

    # A one-hot row has a zero Jacobian: the saturated softmax passes no gradient.
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    jac = call(softmax_jacobian, one_hot, what="softmax_jacobian(weights)")
    expect_shape(jac, (2, 4, 4), "softmax_jacobian(weights) for weights of shape (2, 4)")
    expected = torch.diag_embed(one_hot) - one_hot.unsqueeze(-1) * one_hot.unsqueeze(-2)
    expect_close(jac, expected, "for a one-hot row (and a uniform one) the Jacobian is wrong: "
                 "it should be all zeros for the one-hot row")

    # float64 stays float64.
    weights = _softmax(_randn(3, 5, seed=700, dtype=torch.float64), dim=-1)
    jac = call(softmax_jacobian, weights, what="softmax_jacobian(weights)")
    if jac.dtype != torch.float64:
        fail(f"softmax_jacobian returns {jac.dtype} for float64 weights: keep their dtype "
             "(torch.eye and torch.zeros need dtype=weights.dtype).")
