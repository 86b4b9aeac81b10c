"""The chapter 2 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch

from transformer_book.checks import CheckFailure
from transformer_book.checks.ch02 import (
    check_local_attention,
    check_softmax_jacobian,
    check_stable_softmax,
)


def test_builtin_softmax_is_restored_after_the_check():
    original = torch.softmax
    with pytest.raises(CheckFailure):
        check_stable_softmax(lambda x, dim=-1: torch.softmax(x, dim=dim))
    assert torch.softmax is original
    assert torch.Tensor.softmax(torch.zeros(2), 0).tolist() == [0.5, 0.5]


# ----------------------------------------------------------------------------- 2.1


def softmax_global_max(x, dim=-1):  # one shift for the whole tensor: far rows underflow
    exps = (x - x.max()).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_max_ignores_dim(x, dim=-1):  # the sum follows dim, the max always the last dim
    exps = (x - x.amax(dim=-1, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_max_pair(x, dim=-1):  # x.max(dim=...) is (values, indices)
    exps = (x - x.max(dim=dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_naive(x, dim=-1):
    return x.exp() / x.exp().sum(dim=dim, keepdim=True)


def softmax_ignores_dim(x, dim=-1):
    exps = (x - x.amax(dim=-1, keepdim=True)).exp()
    return exps / exps.sum(dim=-1, keepdim=True)


def softmax_wrong_dim(x, dim=-1):
    exps = (x - x.amax(dim=0, keepdim=True)).exp()
    return exps / exps.sum(dim=0, keepdim=True)


def softmax_max_over_other_dim(x, dim=-1):
    exps = (x - x.amax(dim=0, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_global_sum(x, dim=-1):
    exps = (x - x.amax(dim=dim, keepdim=True)).exp()
    return exps / exps.sum()


def softmax_no_keepdim(x, dim=-1):
    exps = (x - x.amax(dim=dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim)


def softmax_builtin(x, dim=-1):
    return x.softmax(dim)


def softmax_in_place(x, dim=-1):
    x -= x.amax(dim=dim, keepdim=True).detach()
    exps = x.exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_float32(x, dim=-1):
    x = x.float()
    exps = (x - x.amax(dim=dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def softmax_detached(x, dim=-1):
    exps = (x.detach() - x.detach().amax(dim=dim, keepdim=True)).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (softmax_naive, "overflows to inf"),
        (softmax_ignores_dim, "ignores its `dim` argument"),
        (softmax_wrong_dim, "normalized over dim 0"),
        (softmax_max_over_other_dim, "max you subtract is taken along another dim"),
        (softmax_global_sum, "the whole tensor sums to 1"),
        (softmax_no_keepdim, "keepdim=True"),
        (softmax_builtin, "calls PyTorch's softmax"),
        (softmax_in_place, "changed its input `x` in place"),
        (softmax_float32, "returns torch.float32 for a float64 input"),
        (softmax_detached, "carries no gradient"),
        (softmax_global_max, r"one maximum for the whole tensor \(x.max\(\)\)"),
        (softmax_max_ignores_dim, "subtracts the max along dim 2 but sums along dim 0"),
        (softmax_max_pair, r"returns a pair \(values, indices\)"),
    ],
)
def test_stable_softmax_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_stable_softmax(wrong)


def test_stable_softmax_names_underflow():
    def shift_by_min(x, dim=-1):  # exp(x - min): fine for small x, overflows for a wide row
        exps = (x - x.amin(dim=dim, keepdim=True)).exp()
        return exps / exps.sum(dim=dim, keepdim=True)

    with pytest.raises(CheckFailure, match="overflows|underflows"):
        check_stable_softmax(shift_by_min)


# ----------------------------------------------------------------------------- 2.2


def band(length, window, *, kind="band"):
    """local_window_mask with one knob per misconception."""
    i = torch.arange(length)
    offset = i[:, None] - i[None, :]  # i - j
    masks = {
        "band": offset.abs() <= window,
        "inverted": offset.abs() > window,
        "past": (offset >= 0) & (offset <= window),
        "future": (offset <= 0) & (offset >= -window),
        "strict": offset.abs() < window,
        "wide": offset.abs() <= window + 1,
        "float": (offset.abs() <= window).float(),
        "eye": torch.eye(length, dtype=torch.bool),
        "full": torch.ones(length, length, dtype=torch.bool),
    }
    return masks[kind]


def local(query, key, value, window, *, mask="band", scale="root", dim=-1, fill="before",
          neg_inf=True, values="v", detach=False):
    """local_attention with one knob per misconception."""
    d_k, length = query.size(-1), query.size(-2)
    scores = query @ key.transpose(-2, -1)
    scores = {"root": scores / d_k**0.5, "none": scores, "d_k": scores / d_k,
              "times": scores * d_k**0.5}[scale]
    allowed = band(length, window, kind=mask)
    if fill == "before":
        scores = scores.masked_fill(~allowed, float("-inf") if neg_inf else -1e9)
    weights = torch.softmax(scores, dim=dim)
    if fill == "after":
        weights = weights * allowed
    output = weights @ {"v": value, "k": key}[values]
    return (output.detach(), weights) if detach else (output, weights)


def test_the_configurable_local_attention_passes_when_correct(capsys):
    check_local_attention(band, local)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind, message",
    [
        ("inverted", "True outside the window"),
        ("past", "only looks back"),
        ("future", "only looks ahead"),
        ("strict", "leaves out the edges"),
        ("wide", "one key too many"),
        ("float", "return a bool tensor"),
        ("eye", "only the diagonal"),
        ("full", "the window has no effect"),
    ],
)
def test_window_mask_names_the_mistake(kind, message):
    with pytest.raises(CheckFailure, match=message):
        check_local_attention(lambda length, window: band(length, window, kind=kind), local)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(scale="none"), "without the 1/sqrt\\(d_k\\) scale"),
        (dict(scale="d_k"), "not 1/d_k"),
        (dict(scale="times"), "multiplied by sqrt\\(d_k\\)"),
        (dict(dim=-2), "over the queries"),
        (dict(fill="after"), "applied after the softmax"),
        (dict(fill="none"), "the window has no effect"),
        (dict(mask="inverted"), "treated True as blocked"),
        (dict(mask="inverted", neg_inf=False), "treated True as blocked"),
        (dict(mask="past"), "wrong window: it only looks back"),
        (dict(mask="strict"), "wrong window: it uses \\|i - j\\| < window"),
        (dict(values="k"), "averages the keys"),
        (dict(detach=True), "carries no gradient"),
    ],
)
def test_local_attention_names_the_mistake(options, message):
    def wrong(query, key, value, window):
        return local(query, key, value, window, **options)

    with pytest.raises(CheckFailure, match=message):
        check_local_attention(band, wrong)


def test_local_attention_must_not_call_a_ready_made_attention():
    """A one-line call of the book's or PyTorch's function is refused (issue: 2.2)."""
    import torch.nn.functional as F

    import transformer_book
    from transformer_book.attention import scaled_dot_product_attention

    def book(query, key, value, window):
        return scaled_dot_product_attention(query, key, value, band(query.size(-2), window))

    def book_by_module(query, key, value, window):
        mask = band(query.size(-2), window)
        return transformer_book.scaled_dot_product_attention(query, key, value, mask)

    def pytorch(query, key, value, window):
        mask = band(query.size(-2), window)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return output, local(query, key, value, window)[1]

    for wrong in (book, book_by_module, pytorch):
        with pytest.raises(CheckFailure, match="write the attention step yourself"):
            check_local_attention(band, wrong)
    # everything is restored afterwards
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert transformer_book.scaled_dot_product_attention is scaled_dot_product_attention
    contents = [cell.cell_contents for cell in book.__closure__]
    assert any(c is scaled_dot_product_attention for c in contents)


def test_local_attention_names_swapped_results():
    with pytest.raises(CheckFailure, match="wrong order"):
        check_local_attention(band, lambda *a: local(*a)[::-1])


# ----------------------------------------------------------------------------- 2.3


def _outer(p):
    return p.unsqueeze(-1) * p.unsqueeze(-2)


def jacobian_unbatched(p):  # right for one row, wrong tools for a batch
    return torch.diag(p) - torch.outer(p, p)


def jacobian_float32(p):
    p = p.float()
    return torch.diag_embed(p) - _outer(p)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda p: -_outer(p), "the diag\\(p\\) term is missing"),
        (lambda p: _outer(p) - torch.diag_embed(p), "wrong sign"),
        (lambda p: torch.diag_embed(p), "only diag\\(p\\)"),
        (lambda p: torch.diag_embed(p * (1 - p)), "off-diagonal entries are 0"),
        (jacobian_unbatched, "torch.diag_embed"),
        (jacobian_float32, "keep their dtype"),
    ],
    ids=["no diag", "sign", "diag only", "no off-diagonal", "torch.diag on a batch", "float32"],
)
def test_softmax_jacobian_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_softmax_jacobian(wrong)
