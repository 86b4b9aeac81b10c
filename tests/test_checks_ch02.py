"""The chapter 2 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch

from transformer_book.checks import CheckFailure
from transformer_book.checks.ch02 import (
    check_attention_with_temperature,
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


def softmax_global_max(x, dim=-1):  # accepted: any constant along dim may be subtracted
    exps = (x - x.max()).exp()
    return exps / exps.sum(dim=dim, keepdim=True)


def test_stable_softmax_accepts_a_global_max(capsys):
    check_stable_softmax(softmax_global_max)
    assert "passed" in capsys.readouterr().out


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

# Masked softmax recipes, right and wrong, that the wrong attentions below are built from.


def masked_neg_inf(scores, mask):  # the textbook recipe: NaN on an empty row
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def masked_finite_fill_only(scores, mask):  # uniform weights on an empty row
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)


def masked_after_softmax(scores, mask):
    return torch.softmax(scores, dim=-1) * mask


def masked_inverted(scores, mask):
    filled = scores.masked_fill(mask, -1e9)
    return torch.softmax(filled, dim=-1).masked_fill(mask, 0.0)


def masked_additive_nan_to_num(scores, mask):  # fine forward, NaN backward
    additive = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores + additive, dim=-1).nan_to_num(0.0)


def masked_where_overflow(scores, mask):  # inf in the unselected branch of where: NaN grads
    top = scores.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
    exps = torch.where(mask, (scores - top).exp(), 0.0)
    total = exps.sum(dim=-1, keepdim=True)
    return exps / torch.where(total > 0, total, 1.0)


def masked_ignores_mask(scores, mask):
    return torch.softmax(scores, dim=-1)


def _attention(scores_fn, softmax_fn=None):
    """An attention_with_temperature whose scores (and weights) follow the given recipe."""

    def attention(query, key, value, mask=None, temperature=1.0):
        scores = scores_fn(query @ key.transpose(-2, -1), query.size(-1), temperature)
        if mask is None:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool)
        weights = (softmax_fn or _masked_softmax)(scores, mask)
        return weights @ value, weights

    return attention


def _masked_softmax(scores, mask):
    filled = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.where(mask, torch.softmax(filled, dim=-1), 0.0)


def _right(raw, d_k, tau):
    return raw / (tau * d_k**0.5)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (_attention(lambda raw, d_k, tau: raw / tau), "without the 1/sqrt\\(d_k\\) scale"),
        (_attention(lambda raw, d_k, tau: raw / (tau * d_k)), "not 1/d_k"),
        (_attention(lambda raw, d_k, tau: raw * d_k**0.5 / tau), "multiplied by sqrt\\(d_k\\)"),
        (_attention(_right, lambda s, m: _masked_softmax(s.mT, m.mT).mT), "over the queries"),
        (_attention(lambda raw, d_k, tau: raw * tau / d_k**0.5), "multiplied by the temperature"),
        (_attention(lambda raw, d_k, tau: raw / d_k**0.5), "temperature .* has no effect"),
        (_attention(_right, masked_after_softmax), "applied after the softmax"),
        (_attention(_right, masked_inverted), "treated True as blocked"),
        (_attention(_right, masked_neg_inf), "gives NaN"),
        (_attention(_right, masked_finite_fill_only), "same weight on every key"),
        (_attention(_right, masked_additive_nan_to_num), "gradient with respect to `query`"),
        (_attention(_right, masked_where_overflow), "gradient with respect to `query`"),
        (_attention(_right, masked_ignores_mask), "the mask has no effect"),
    ],
)
def test_attention_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_attention_with_temperature(wrong)


def test_attention_names_swapped_results():
    right = _attention(_right)

    def swapped(*args, **kwargs):
        output, weights = right(*args, **kwargs)
        return weights, output

    with pytest.raises(CheckFailure, match="wrong order"):
        check_attention_with_temperature(swapped)


def test_attention_names_a_missing_tuple():
    right = _attention(_right)
    with pytest.raises(CheckFailure, match="should return a tuple"):
        check_attention_with_temperature(lambda *a, **k: right(*a, **k)[0])


def test_attention_temperature_after_softmax():
    def after(query, key, value, mask=None, temperature=1.0):
        _, weights = _attention(_right)(query, key, value, mask)
        weights = weights / temperature
        return weights @ value, weights

    with pytest.raises(CheckFailure, match="temperature divides the scores, before the softmax"):
        check_attention_with_temperature(after)


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
