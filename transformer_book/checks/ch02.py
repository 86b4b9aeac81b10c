"""Checks for the exercises of chapter 2, scaled dot-product attention.

Each check compares the student's code with a reference (PyTorch's own where one
exists) and, when they differ, first compares it with what the usual mistakes would
produce, so that the failure names the likely misconception.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import scaled_dot_product_attention
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
    ]
    for x, problem in extremes:
        y = _call_softmax(softmax, x, -1)
        expected = _softmax(x, dim=-1)
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
_NAN_ROW = (
    "a row whose mask is all False (a query with no allowed key) gives NaN: with -inf "
    "scores the softmax computes -inf - (-inf) or 0 / 0; fill hidden scores with the most "
    "negative finite float (torch.finfo(dtype).min) and set the weights of such a row to 0."
)
_UNIFORM_ROW = (
    "a row whose mask is all False gets the same weight on every key, so that query "
    "averages exactly the keys it was told to ignore: set the weights of such a row to 0 "
    "after the softmax."
)




def _reference_attention(query, key, value, mask=None, temperature=1.0):
    """softmax(Q K^T / (temperature sqrt(d_k))) V via the package (zero rows when empty)."""
    return scaled_dot_product_attention(query / temperature, key, value, mask=mask)


def _call_attention(attention, query, key, value, mask=None, temperature=1.0):
    tensors = [query, key, value] + ([] if mask is None else [mask])
    before = [t.detach().clone() for t in tensors]
    result = call(attention, query, key, value, mask=mask, temperature=temperature,
                  what="attention_with_temperature(query, key, value, mask, temperature)")
    for name, old, new in zip(["query", "key", "value", "mask"], before, tensors):
        expect_unchanged(old, new.detach(), name)
    if not (isinstance(result, tuple) and len(result) == 2):
        fail("attention_with_temperature should return a tuple (output, weights), like "
             f"scaled_dot_product_attention; it returned a {type(result).__name__}.")
    output, weights = (expect_tensor(t, name) for t, name in zip(result, ["output", "weights"]))
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    out_shape = (*lead, query.shape[-2], value.shape[-1])
    weights_shape = (*lead, query.shape[-2], key.shape[-2])
    if tuple(output.shape) == weights_shape and tuple(weights.shape) == out_shape != weights_shape:
        fail("the two results are in the wrong order: return (output, weights).")
    expect_shape(weights, weights_shape, "the weights")
    expect_shape(output, out_shape, "the output")
    return output, weights


def _weights_candidates(query, key, mask, temperature):
    """(wrong weights, message) for the usual scaling, axis, temperature and mask mistakes."""
    d_k = query.shape[-1]
    raw = query @ key.transpose(-2, -1)
    full = torch.ones(raw.shape, dtype=torch.bool) if mask is None else mask

    def weights(scores, m=full, dim=-1):
        if dim == -1:
            return _reference_masked_softmax(scores, m)
        return _reference_masked_softmax(scores.mT, m.mT).mT

    tau = temperature
    right = raw / (tau * d_k**0.5)
    return [
        (weights(raw / tau), f"the weights match softmax(QK^T / temperature) without the "
         f"1/sqrt(d_k) scale: divide the scores by sqrt(d_k) (here sqrt({d_k}))."),
        (weights(raw / (tau * d_k)), f"the weights match softmax(QK^T / (temperature * d_k)): "
         f"the scale is 1/sqrt(d_k), not 1/d_k (here 1/sqrt({d_k}), not 1/{d_k})."),
        (weights(raw * d_k**0.5 / tau), "the weights match the scores multiplied by sqrt(d_k): "
         "divide by sqrt(d_k) instead."),
        (weights(right, dim=-2), "the weights sum to 1 over the queries (dim -2), not over the "
         "keys: take the softmax over the last dim."),
        (weights(raw * tau / d_k**0.5), f"the weights match the scores multiplied by the "
         f"temperature ({tau}): divide by it (a temperature below 1 sharpens, above 1 "
         "flattens)."),
        (weights(raw / d_k**0.5), f"the temperature ({tau}) has no effect on your weights: "
         "divide the scores by temperature * sqrt(d_k)."),
        (weights(raw / d_k**0.5) / tau, "the weights are softmax(QK^T / sqrt(d_k)) / "
         "temperature: the temperature divides the scores, before the softmax."),
        (weights(right, ~full), _INVERTED),
        (weights(right, torch.ones_like(full)) * full, _AFTER),
        (weights(right, torch.ones_like(full)), "the mask has no effect: hidden keys still get "
         "weight."),
    ]


@exercise("2.2", "Attention with a temperature")
def check_attention_with_temperature(attention):
    """Compare with F.scaled_dot_product_attention(scale=1 / (temperature sqrt(d_k)))."""
    expect_callable(attention, "your attention function",
                    "check_attention_with_temperature(attention_with_temperature)")

    def compare(query, key, value, mask, temperature, label, atol=1e-5, rtol=1e-4):
        output, weights = _call_attention(attention, query, key, value, mask, temperature)
        expected_output, expected_weights = _reference_attention(query, key, value, mask,
                                                                 temperature)
        if torch.isnan(weights).any() or torch.isnan(output).any():
            if mask is not None and not mask.any(dim=-1).all():
                fail(_NAN_ROW)
            fail(f"{label}: your result contains NaN.")
        if not same(weights, expected_weights, atol, rtol):
            diagnose(weights, _weights_candidates(query, key, mask, temperature))
            if mask is not None and same(weights.sum(-1), torch.ones(weights.shape[:-1])):
                empty = ~mask.expand(weights.shape).any(dim=-1)
                if empty.any() and torch.allclose(weights[empty], weights[empty].mean()):
                    fail(_UNIFORM_ROW)
            expect_close(weights, expected_weights, f"{label}: the weights differ from "
                         "softmax(QK^T / (temperature * sqrt(d_k))) with the mask applied",
                         atol, rtol)
        if not same(output, expected_output, atol, rtol):
            expect_close(output, expected_output, f"{label}: the weights are right but the "
                         "output is not weights @ value", atol, rtol)
        if mask is None or mask.any(dim=-1).all():  # PyTorch's own, where it is defined
            scale = 1 / (temperature * query.shape[-1] ** 0.5)
            theirs = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                    scale=scale)
            expect_close(output, theirs, f"{label}: the output differs from "
                         "F.scaled_dot_product_attention(..., scale=1 / (temperature * "
                         "sqrt(d_k)))", atol, rtol)
        return output

    # 1. No mask, temperature 1: the chapter's attention.
    q, k, v = _randn(5, 8, seed=30), _randn(6, 8, seed=31), _randn(6, 3, seed=32)
    compare(q, k, v, None, 1.0, "with L_q=5, L_k=6, d_k=8, no mask, temperature 1")

    # 2. Temperatures below and above 1.
    for tau in (0.5, 2.0):
        compare(q, k, v, None, tau, f"with temperature {tau}")

    # 3. A mask, with and without a temperature.
    mask = _random_mask(5, 6, seed=33)
    for tau in (1.0, 0.5):
        compare(q, k, v, mask, tau, f"with a (5, 6) mask and temperature {tau}")

    # 4. A query with no allowed key: zero weights, zero output, finite gradients.
    mask = _random_mask(5, 6, seed=34)
    mask[2] = False
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    output = compare(q_, k_, v_, mask, 1.0, "with row 2 of the mask all False")
    grads = torch.autograd.grad((output * _randn(5, 3, seed=35)).sum(), (q_, k_, v_),
                                allow_unused=True)
    for name, grad in zip(["query", "key", "value"], grads):
        if grad is None:
            fail(f"no gradient reaches `{name}`: is part of the computation detached?")
        _reject_nonfinite(grad, f"the gradient with respect to `{name}` when one query has no "
                          "allowed key", "the forward values are fine, but a NaN made along the "
                          "way (-inf scores, a 0 / 0 patched with nan_to_num) is still in the "
                          "backward pass; fill hidden scores with torch.finfo(dtype).min, as the "
                          "chapter does, then zero the weights of empty rows.")

    # 5. Leading dims, broadcast masks, L_q != L_k, length 1, d_k not a power of two, float64.
    cases = [  # (query lead, key/value lead, mask shape, L_q, L_k, d_k, d_v, temperature)
        ((2,), (2,), None, 3, 7, 5, 4, 1.5),
        ((2, 3), (2, 3), (4, 6), 4, 6, 12, 2, 0.7),
        ((2, 3), (2, 3), (2, 1, 1, 6), 4, 6, 12, 2, 1.0),
        ((2, 1), (1, 3), (3, 1, 5), 3, 5, 6, 3, 1.0),
        ((), (), (1, 1), 1, 1, 3, 2, 0.25),
        ((4,), (4,), (1, 9), 1, 9, 16, 8, 3.0),
    ]
    for seed, (q_lead, kv_lead, mask_shape, L_q, L_k, d_k, d_v, tau) in enumerate(cases):
        query = _randn(*q_lead, L_q, d_k, seed=100 + seed)
        key = _randn(*kv_lead, L_k, d_k, seed=200 + seed)
        value = _randn(*kv_lead, L_k, d_v, seed=300 + seed)
        mask = None if mask_shape is None else _random_mask(*mask_shape, seed=400 + seed)
        compare(query, key, value, mask, tau,
                f"with query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                f"{tuple(value.shape)}, mask {mask_shape}, temperature {tau}")
    query, key, value = (_randn(2, n, 6, seed=500 + n, dtype=torch.float64) for n in (3, 4, 4))
    mask = _random_mask(3, 4, seed=501)
    output = compare(query, key, value, mask, 0.8, "in float64", atol=1e-10, rtol=1e-8)
    if output.dtype != torch.float64:
        fail(f"your function returns {output.dtype} for float64 inputs: keep their dtype.")


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
