"""Checks for the exercises of chapter 2, scaled dot-product attention.

Each check is its cases, a reference (PyTorch's own where one exists) and a table of
mistakes, each a wrong implementation with the student's signature: when the student's
output differs from the reference, it is compared with each mistake's output in table
order, so that the failure names the likely misconception.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ._core import (
    Caught,
    Hint,
    Mistake,
    aten,
    attention_functions,
    call,
    exercise,
    expect_callable,
    expect_close,
    expect_dtype,
    expect_finite,
    expect_gradient,
    expect_shape,
    expect_tensor,
    expect_unchanged,
    fail,
    name_mistake,
    randn,
    refused,
    same,
)

# PyTorch's softmax, kept before any patching (exercise 2.1 refuses it to the student).
_softmax = torch.softmax


def _reference_masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the allowed entries; rows with none allowed are 0."""
    filled = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.where(mask, _softmax(filled, dim=-1), 0.0)


# ----------------------------------------------------------------------------- exercise 2.1


def _softmax_variant(x, dim=-1, *, max_dim=None, sum_dim=None, keep_max=True, keep_sum=True,
                     shift="row", whole_sum=False):
    """stable_softmax with one option per mistake (the defaults give the right answer)."""
    max_dim = dim if max_dim is None else max_dim
    sum_dim = dim if sum_dim is None else sum_dim
    if shift == "row":
        exps = (x - x.amax(dim=max_dim, keepdim=keep_max)).exp()
    elif shift == "min":  # exp(x - min): fine for small x, overflows for a wide row
        exps = (x - x.amin(dim=max_dim, keepdim=True)).exp()
    else:  # "whole": one shift for the whole tensor; "none": no shift at all
        exps = (x - x.max()).exp() if shift == "whole" else x.exp()
    return exps / (exps.sum() if whole_sum else exps.sum(dim=sum_dim, keepdim=keep_sum))


def _max_pair(x, dim=-1):  # x.max(dim=...) is (values, indices)
    exps = (x - x.max(dim=dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def _in_place(x, dim=-1):
    x -= x.amax(dim=dim, keepdim=True).detach()
    return _softmax_variant(x, dim)


_KEEPDIM = (
    "on a square (5, 5) input your result is wrong although it has the right shape: "
    "a reduction without keepdim=True (x.sum(dim=-1) has shape (5,)) lines up with "
    "the last dim, not with the rows; pass keepdim=True to amax and sum."
)
_PLAIN = [  # case 1: an ordinary (4, 6) input over the last dim
    Mistake("the whole tensor sums to 1, not each row: the sum runs over every entry; sum "
            "along `dim` only (.sum(dim=dim, keepdim=True)).",
            partial(_softmax_variant, whole_sum=True),
            symptom=lambda y, x, dim: torch.allclose(y.sum(), torch.tensor(1.0))),
    Mistake("each column sums to 1 instead of each row: you normalized over dim 0, not over "
            "the `dim` argument (-1).", partial(_softmax_variant, max_dim=0, sum_dim=0)),
    Mistake("the max you subtract is taken along another dim than the sum: a shift that "
            "varies along `dim` changes the softmax; use x.amax(dim=dim, keepdim=True).",
            partial(_softmax_variant, max_dim=0)),
]
_SQUARE = [  # case 2: a reduction without keepdim broadcasts along the wrong axis
    Mistake(_KEEPDIM, partial(_softmax_variant, keep_sum=False), expect="without keepdim=True"),
    Mistake(_KEEPDIM, partial(_softmax_variant, keep_max=False), expect="without keepdim=True"),
    Mistake(_KEEPDIM, partial(_softmax_variant, keep_max=False, keep_sum=False),
            expect="without keepdim=True"),
]  # (on a non-square input these crash first: the crash hint names keepdim too)
_DIMS = [  # case 3: the dim argument on a (2, 3, 4) input
    Mistake(lambda x, dim: f"stable_softmax(x, dim={dim}) normalizes over the last dim: your "
            "function ignores its `dim` argument.",
            partial(_softmax_variant, max_dim=-1, sum_dim=-1), expect="ignores its `dim`"),
    *[Mistake(lambda x, dim, o=o: f"stable_softmax(x, dim={dim}) on a (2, 3, 4) input "
              f"normalizes over dim {o}: use `dim` in every reduction (amax and sum).",
              partial(_softmax_variant, max_dim=o, sum_dim=o),
              expect="normalizes over dim 1" if o else "normalized over dim 0")
      for o in (0, 1)],  # (dim 2 is the last dim: named above)
    *[Mistake(lambda x, dim, o=o: f"stable_softmax(x, dim={dim}) on a (2, 3, 4) input "
              f"subtracts the max along dim {o % 3} but sums along dim {dim}: the shift must "
              "be the same for every entry along `dim`, or it changes the softmax; use "
              "x.amax(dim=dim, keepdim=True) with the same `dim` as the sum.",
              partial(_softmax_variant, max_dim=o), when=lambda x, dim, o=o: o % 3 != dim % 3,
              expect=f"subtracts the max along dim {o % 3} but sums along dim 0" if o
              else "max you subtract is taken along another dim")
      for o in (0, 1, -1)],  # (on 2-d inputs, dim 0 is named by the first case)
]
_WIDE = [  # case 4: one shift for the whole tensor underflows in rows far below the others
    Mistake(lambda x, dim: f"stable_softmax(x) for x = {x.tolist()} gives NaN in a row far "
            "below the others: you subtract one maximum for the whole tensor (x.max()), so "
            "every exp in that row underflows to 0 and the row is 0 / 0; subtract the max of "
            "each row along dim, x.amax(dim=dim, keepdim=True).",
            partial(_softmax_variant, shift="whole"),
            symptom=lambda y, x, dim: same(y, _softmax_variant(x, dim, shift="whole"),
                                           equal_nan=True),
            expect=r"one maximum for the whole tensor \(x.max\(\)\)"),
]
_SOFTMAX_CAUGHT = [  # by a property, a crash hint or the refusal
    Caught(partial(_softmax_variant, shift="none"), "overflows to inf"),
    Caught(partial(_softmax_variant, shift="min"), "overflows|underflows"),
    Caught(lambda x, dim=-1: x.softmax(dim), "calls PyTorch's softmax"),
    Caught(lambda x, dim=-1: torch.ops.aten._softmax(x, dim, False), "calls PyTorch's softmax"),
    Caught(_in_place, "changed its input `x` in place"),
    Caught(lambda x, dim=-1: _softmax_variant(x.float(), dim),
           "returns torch.float32 for a float64 input"),
    Caught(lambda x, dim=-1: _softmax_variant(x.detach(), dim), "carries no gradient"),
    Caught(_max_pair, r"returns a pair \(values, indices\)"),
]
_BUILTIN_SOFTMAXES = [
    *[(owner, name) for owner in (torch, torch.Tensor, F, torch.special)
      for name in ("softmax", "log_softmax")],
    (torch, "_softmax"), (torch, "_log_softmax"),
    *aten("softmax", "_softmax", "log_softmax", "_log_softmax", "special_softmax"),
]
_BUILTIN_SOFTMAX_MESSAGE = (
    "your stable_softmax calls PyTorch's softmax (torch.softmax, F.softmax, Tensor.softmax or a "
    "log_softmax): the exercise is to write it yourself with exp, amax and sum."
)
_SOFTMAX_HINTS = [
    Hint(TypeError, "return_types", "x.max(dim=...) returns a pair (values, indices), not a "
         "tensor: use x.amax(dim=dim, keepdim=True) or x.max(dim=dim, keepdim=True).values."),
    Hint(RuntimeError, "size of tensor", "The shapes did not line up: a reduction such as "
         "x.amax(dim=dim) or .sum(dim=dim) without keepdim=True drops the dim, so it no "
         "longer broadcasts against x."),
]


def _run_softmax(softmax, x, dim):
    """``softmax(x, dim=dim)``, refused PyTorch's softmax, with its common properties."""
    before = x.detach().clone()
    with refused([softmax], _BUILTIN_SOFTMAXES, _BUILTIN_SOFTMAX_MESSAGE):
        y = call(softmax, x, dim=dim, what=f"stable_softmax(x, dim={dim})", hints=_SOFTMAX_HINTS)
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"stable_softmax(x, dim={dim}) for x of shape {tuple(x.shape)}")


def _softmax_case(softmax, x, dim, table, general, finite) -> None:
    """One case: when ``softmax`` differs from torch.softmax, name the mistake."""
    y, expected = _run_softmax(softmax, x, dim), _softmax(x, dim=dim)
    if not same(y, expected):
        name_mistake(y, table, x, dim)
        expect_finite(y, *finite)
        expect_close(y, expected, general)


_EXTREMES = [
    ([[1000.0, 999.0, 998.0, 0.0], [1000.0, -1000.0, 500.0, 1000.0]],
     "with entries near 1000, exp overflows to inf and inf / inf is NaN"),
    ([[-1000.0, -1001.0, -1002.0]],
     "with entries near -1000, exp underflows to 0 and 0 / 0 is NaN"),
    ([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, 2.0]],
     "an entry of -inf (a masked score) must get weight 0"),
    ([[3.0], [-7.0]], "along a dim of length 1 every weight is 1"),
    ([[0.0, 1.0, 2.0], [-200.0, -201.0, -199.0]],
     "rows of very different scale each need their own shift"),
]


@exercise("2.1", "Numerically stable softmax",
          mistakes={"softmax": _PLAIN + _SQUARE + _DIMS + _WIDE + _SOFTMAX_CAUGHT})
def check_stable_softmax(softmax):
    """Compare ``softmax(x, dim=...)`` with ``torch.softmax`` on shapes, dims and extremes."""
    expect_callable(softmax, "your softmax function", "check_stable_softmax(stable_softmax)")
    ordinary = ("stable_softmax(x) for ordinary x of shape (4, 6)", "check the formula.")
    _softmax_case(softmax, randn(4, 6, seed=0), -1, _PLAIN, "stable_softmax(x, dim=-1) "
                  "differs from torch.softmax on a (4, 6) input: softmax(x)_i = exp(x_i) / "
                  "sum_j exp(x_j) along dim", ordinary)
    _softmax_case(softmax, randn(5, 5, seed=1), -1, _SQUARE, "stable_softmax(x, dim=-1) "
                  "differs from torch.softmax on a (5, 5) input", ordinary)
    for dim in (0, 1, 2, -2, -3):
        _softmax_case(softmax, randn(2, 3, 4, seed=2), dim, _DIMS, f"stable_softmax(x, "
                      f"dim={dim}) differs from torch.softmax on a (2, 3, 4) input", ordinary)
    for x, problem in _EXTREMES:  # exp(1000) overflows to inf, exp(-1000) underflows to 0
        what = f"stable_softmax(x) for x = {x}"
        _softmax_case(softmax, torch.tensor(x), -1, _WIDE, f"{what} differs from torch.softmax "
                      f"({problem})", (what, f"{problem}: subtract the max along dim before "
                      "exp (softmax(x) = softmax(x - c) for any c constant along dim)."))
    # float64 stays float64, to float64 precision.
    x = 10 * randn(3, 7, seed=3, dtype=torch.float64)
    y = _run_softmax(softmax, x, -1)
    expect_dtype(y, torch.float64, f"stable_softmax returns {y.dtype} for a float64 input: "
                 "keep the input's dtype (no .float() or torch.tensor(..., dtype=...) inside).")
    expect_close(y, _softmax(x, dim=-1), "stable_softmax differs from torch.softmax in "
                 "float64", atol=1e-12, rtol=1e-10)
    # Gradients flow like torch.softmax's.
    x, g = randn(3, 5, seed=4).requires_grad_(), randn(3, 5, seed=5)
    y = _run_softmax(softmax, x, -1)
    expect_gradient(y, "the result of stable_softmax carries no gradient: is it computed under "
                    "torch.no_grad(), from x.detach()/x.data, or through .item()/.tolist()?")
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad((_softmax(x_ref, dim=-1) * g).sum(), x_ref)
    expect_close(grad, grad_ref, "the gradient of stable_softmax differs from torch.softmax's: "
                 "is part of it computed from x.detach() or x.data?")


# ----------------------------------------------------------------------------- exercise 2.2


def _band(length: int, window: int, kind: str = "band") -> torch.Tensor:
    """local_window_mask with one option per mistake: (L, L) bool, True = may attend."""
    positions = torch.arange(length)
    offset = positions[:, None] - positions[None, :]  # i - j
    masks = {
        "band": lambda: offset.abs() <= window,
        "inverted": lambda: offset.abs() > window,
        "past": lambda: (offset >= 0) & (offset <= window),
        "future": lambda: (offset <= 0) & (offset >= -window),
        "strict": lambda: offset.abs() < window,
        "wide": lambda: offset.abs() <= window + 1,
        "full": lambda: torch.ones(length, length, dtype=torch.bool),
        "eye": lambda: torch.eye(length, dtype=torch.bool),
        "float": lambda: (offset.abs() <= window).float(),
    }
    return masks[kind]()


_WINDOW_MESSAGES = {
    "inverted": "it is True outside the window and False inside: in this course True means "
    "'may attend', so the band |i - j| <= window is True.",
    "past": "it only looks back (keys i - window ... i, a causal window): the window is "
    "two-sided, |i - j| <= window.",
    "future": "it only looks ahead (keys i ... i + window): the window is two-sided, "
    "|i - j| <= window.",
    "strict": "it uses |i - j| < window, which leaves out the edges of the window: a query "
    "sees `window` keys on each side, |i - j| <= window.",
    "wide": "it lets one key too many in on each side: |i - j| <= window, not window + 1.",
    "full": "it is True everywhere: the window has no effect.",
    "eye": "only the diagonal is True: each query sees itself alone, whatever the window.",
}
_WINDOW = [Mistake(message, partial(_band, kind=kind)) for kind, message in _WINDOW_MESSAGES.items()]


def _check_window_mask(local_window_mask, length: int, window: int) -> None:
    what = f"local_window_mask({length}, {window})"
    got = expect_tensor(call(local_window_mask, length, window, what=what), what)
    expect_shape(got, (length, length), f"the mask returned by {what}")
    expected = _band(length, window)
    if got.dtype != torch.bool:
        if torch.equal(got.detach().to(torch.float64), expected.to(torch.float64)):
            fail(f"{what} returns dtype {got.dtype}: return a bool tensor (e.g. a comparison "
                 "such as `<=`). PyTorch adds a float mask to the scores instead of hiding keys.")
        fail(f"{what} returns dtype {got.dtype}; expected a bool tensor, True = may attend.")
    if not torch.equal(got, expected):
        name_mistake(got, _WINDOW, length, window, prefix=f"{what}: ", general=f"{what} differs "
                     "from the band |i - j| <= window (True = query i may attend to key j).")


def _local_variant(query, key, value, window, *, mask="band", scale="root", dim=-1,
                   fill="before", values="v", detach=False):
    """local_attention with one option per mistake (the defaults give the right answer)."""
    d_k, length = query.shape[-1], query.shape[-2]
    scores = query @ key.transpose(-2, -1)
    scores = {"root": scores / d_k**0.5, "none": scores, "d_k": scores / d_k,
              "times": scores * d_k**0.5}[scale]
    allowed = _band(length, window, kind=mask)
    if fill == "before":
        weights = _reference_masked_softmax(scores.transpose(dim, -1), allowed.transpose(dim, -1))
        weights = weights.transpose(dim, -1)
    elif fill == "large":  # a large negative fill: rows with no allowed key are uniform
        weights = _softmax(scores.masked_fill(~allowed, -1e9), dim=dim)
    else:  # "after": hide the weights after the softmax; "none": no mask at all
        weights = _softmax(scores, dim=dim) * (allowed if fill == "after" else 1)
    output = weights @ {"v": value, "k": key}[values]
    return (output.detach(), weights) if detach else (output, weights)


_INVERTED = (
    "the weights are nonzero exactly where the mask is False: True means the key may be "
    "attended to (the convention of torch.nn.functional.scaled_dot_product_attention); you "
    "treated True as blocked."
)
_INVERTED_MISTAKE = Mistake(_INVERTED, partial(_local_variant, mask="inverted"))
_WEIGHTS = [  # compared with the weights, in this order
    Mistake(lambda q, k, v, w: "the weights match softmax(QK^T) without the 1/sqrt(d_k) "
            f"scale: divide the scores by sqrt(d_k) (here sqrt({q.shape[-1]})).",
            partial(_local_variant, scale="none"), expect=r"without the 1/sqrt\(d_k\) scale"),
    Mistake(lambda q, k, v, w: "the weights match the scores divided by d_k: the scale is "
            f"1/sqrt(d_k), not 1/d_k (here 1/sqrt({q.shape[-1]}), not 1/{q.shape[-1]}).",
            partial(_local_variant, scale="d_k"), expect="not 1/d_k"),
    Mistake("the weights match the scores multiplied by sqrt(d_k): divide by sqrt(d_k) "
            "instead.", partial(_local_variant, scale="times")),
    Mistake("the weights sum to 1 over the queries (dim -2), not over the keys: take the "
            "softmax over the last dim.", partial(_local_variant, dim=-2)),
    _INVERTED_MISTAKE,
    Mistake("the rows no longer sum to 1: the mask was applied after the softmax, which "
            "zeroes the hidden weights but leaves the others too small; mask the scores "
            "before normalizing.", partial(_local_variant, fill="after")),
    Mistake("the window has no effect: keys outside |i - j| <= window still get weight. "
            "Hide their scores before the softmax.", partial(_local_variant, fill="none")),
    *[Mistake("your attention uses the wrong window: " + _WINDOW_MESSAGES[kind],
              partial(_local_variant, mask=kind)) for kind in ("past", "future", "strict", "wide")],
]
_OUTPUT = [
    Mistake("the weights are right but the output averages the keys: output = weights @ "
            "value.", partial(_local_variant, values="k")),
]
_FROM_SCRATCH = (
    "your local_attention calls a ready-made attention function (the book's "
    "scaled_dot_product_attention or PyTorch's F.scaled_dot_product_attention): the exercise "
    "is to write the attention step yourself (scores, scale, mask, softmax, weighted sum)."
)
_LOCAL_CAUGHT = [
    Caught(partial(_local_variant, mask="inverted", fill="large"), "treated True as blocked"),
    Caught(partial(_local_variant, detach=True), "carries no gradient"),
    Caught(lambda *args: _local_variant(*args)[::-1], "wrong order"),
    Caught(lambda q, k, v, w: (torch.ops.aten.scaled_dot_product_attention(
        q, k, v, _band(q.shape[-2], w)), _local_variant(q, k, v, w)[1]),
        "write the attention step yourself"),
]


def _call_local(local_attention, query, key, value, window):
    what = f"local_attention(query, key, value, window={window})"
    before = [t.detach().clone() for t in (query, key, value)]
    with refused([local_attention], attention_functions(), _FROM_SCRATCH):
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


def _local_case(local_attention, lead, length, d_k, d_v, window, seed, dtype=torch.float32):
    label = f"with query {(*lead, length, d_k)}, value {(*lead, length, d_v)} and window {window}"
    query = randn(*lead, length, d_k, seed=seed, dtype=dtype).requires_grad_()
    key = randn(*lead, length, d_k, seed=seed + 1, dtype=dtype)
    value = randn(*lead, length, d_v, seed=seed + 2, dtype=dtype)
    output, weights = _call_local(local_attention, query, key, value, window)
    args = (query.detach(), key, value, window)
    band = _band(length, window)
    with torch.no_grad():
        expected_weights = _local_variant(*args)[1]
        expected_output = F.scaled_dot_product_attention(query, key, value, attn_mask=band)
    tolerance = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else {}  # (not for
    # naming a mistake, which uses the default tolerance on every dtype)
    if torch.isnan(weights).any() or torch.isnan(output).any():
        if not (~band).any(dim=-1).all():  # an inverted band leaves some query no key
            name_mistake(torch.nan_to_num(weights.detach()), [_INVERTED_MISTAKE], *args,
                         pick=lambda r: r[1])
        fail(f"{label}: your result contains NaN.")
    if not same(weights, expected_weights, **tolerance):
        name_mistake(weights, _WEIGHTS, *args, pick=lambda r: r[1])
        expect_close(weights, expected_weights, f"{label}: the weights differ from "
                     "softmax(QK^T / sqrt(d_k)) over the keys with |i - j| <= window", **tolerance)
    if not same(output, expected_output, **tolerance):
        name_mistake(output, _OUTPUT, *args, pick=lambda r: r[0])
        expect_close(output, expected_output, f"{label}: the weights are right but the output "
                     "is not weights @ value", **tolerance)
    expect_dtype(output, dtype, f"local_attention returns {output.dtype} for {dtype} inputs: "
                 "keep their dtype.")
    expect_gradient(output, "the output of local_attention carries no gradient: is it computed "
                    "under torch.no_grad(), or from .detach()/.data?")
    (grad,) = torch.autograd.grad(output.sum(), query)
    expect_finite(grad, "the gradient with respect to `query`", "is a score filled with -inf "
                  "in a row that has no allowed key?")


@exercise("2.2", "A local-window mask", mistakes={
    "local_window_mask": _WINDOW + [Caught(partial(_band, kind="float"), "return a bool tensor")],
    "local_attention": _WEIGHTS + _OUTPUT + _LOCAL_CAUGHT,
})
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


def _outer(p):
    return p.unsqueeze(-1) * p.unsqueeze(-2)  # (..., L, L)


_JACOBIAN = [
    Mistake("the off-diagonal entries are right but the diagonal is -p_j^2: the diag(p) term "
            "is missing (dA_j/dS_j = p_j - p_j^2).", lambda p: -_outer(p)),
    Mistake("every entry has the wrong sign: J = diag(p) - p p^T, not p p^T - diag(p).",
            lambda p: _outer(p) - torch.diag_embed(p)),
    Mistake("only diag(p): the -p_j p_l term, present on and off the diagonal, is missing.",
            torch.diag_embed),
    Mistake("the diagonal p_j (1 - p_j) is right but the off-diagonal entries are 0: changing "
            "score l also lowers every other weight, dA_j/dS_l = -p_j p_l.",
            lambda p: torch.diag_embed(p * (1 - p))),
    Mistake("the outer product p p^T was summed away: keep it as an (L, L) matrix.",
            lambda p: torch.diag_embed(p) - _outer(p).sum(dim=-1, keepdim=True)),
    Caught(lambda p: torch.diag(p) - torch.outer(p, p), "torch.diag_embed"),  # one row only
    Caught(lambda p: torch.diag_embed(p.float()) - _outer(p.float()), "keep their dtype"),
]
_BATCH_HINT = [Hint(Exception, "", "For a batch of rows, torch.diag and torch.outer do not "
                    "apply (they take one vector); build the matrices with torch.diag_embed "
                    "and weights.unsqueeze(-1) * weights.unsqueeze(-2).")]


@exercise("2.3", "The softmax Jacobian for a batch", mistakes={"softmax_jacobian": _JACOBIAN})
def check_softmax_jacobian(softmax_jacobian):
    """Compare ``softmax_jacobian(weights)`` with autograd's Jacobian of torch.softmax."""
    expect_callable(softmax_jacobian, "your Jacobian function",
                    "check_softmax_jacobian(softmax_jacobian)")
    for seed, shape in enumerate([(5,), (3, 4), (2, 3, 6), (2, 1), (1,)]):
        scores = 2 * randn(*shape, seed=600 + seed)
        weights = _softmax(scores, dim=-1)  # (..., L)
        before = weights.clone()
        jac = call(softmax_jacobian, weights, what="softmax_jacobian(weights)",
                   hints=_BATCH_HINT if len(shape) > 1 else ())
        expect_unchanged(before, weights, "weights")
        expect_shape(jac, (*shape, shape[-1]),
                     f"softmax_jacobian(weights) for weights of shape {shape}")
        expected = _softmax_jacobian_autograd(scores)
        if not same(jac, expected):
            name_mistake(jac, _JACOBIAN, weights)
            expect_close(jac, expected, f"for weights of shape {shape}, softmax_jacobian "
                         "differs from autograd's Jacobian of torch.softmax (J = diag(p) - "
                         "p p^T for each row p)")
    # A one-hot row has a zero Jacobian: the saturated softmax passes no gradient.
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    jac = call(softmax_jacobian, one_hot, what="softmax_jacobian(weights)")
    expect_shape(jac, (2, 4, 4), "softmax_jacobian(weights) for weights of shape (2, 4)")
    expect_close(jac, torch.diag_embed(one_hot) - _outer(one_hot), "for a one-hot row (and a "
                 "uniform one) the Jacobian is wrong: it should be all zeros for the one-hot row")
    # float64 stays float64.
    weights = _softmax(randn(3, 5, seed=700, dtype=torch.float64), dim=-1)
    jac = call(softmax_jacobian, weights, what="softmax_jacobian(weights)")
    expect_dtype(jac, torch.float64, f"softmax_jacobian returns {jac.dtype} for float64 "
                 "weights: keep their dtype (torch.eye and torch.zeros need dtype=weights.dtype).")
