"""Parity and property tests of transformer_book.attention.scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book import scaled_dot_product_attention

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}
LEADING = [(), (3,), (2, 3)]
LENGTHS = [(4, 4), (3, 7), (1, 5), (6, 1), (1, 1)]  # (L_q, L_k)


def _inputs(lead, L_q, L_k, d_k=6, d_v=5, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    return randn(*lead, L_q, d_k), randn(*lead, L_k, d_k), randn(*lead, L_k, d_v)


def _mask(shape, seed=0):
    """A boolean mask with at least one allowed key per query (PyTorch's case)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) < 0.5
    mask[..., 0] = True
    return mask


def _grads(output, inputs, seed=1):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed),
                           dtype=output.dtype)
    return torch.autograd.grad((output * upstream).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("masked", [False, True])
def test_parity_with_torch_values_and_gradients(dtype, lead, lengths, masked):
    L_q, L_k = lengths
    inputs = _inputs(lead, L_q, L_k, dtype=dtype)
    # the mask is (L_q, L_k): it broadcasts over every leading dim
    mask = _mask((L_q, L_k)) if masked else None
    ours, weights = scaled_dot_product_attention(*inputs, mask=mask)
    theirs = F.scaled_dot_product_attention(*inputs, attn_mask=mask)
    assert ours.shape == theirs.shape == (*lead, L_q, 5)
    assert weights.shape == (*lead, L_q, L_k)
    assert ours.dtype == weights.dtype == dtype
    torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])
    for g_ours, g_theirs in zip(_grads(ours, inputs), _grads(theirs, inputs)):
        torch.testing.assert_close(g_ours, g_theirs, **TOLERANCE[dtype])


@pytest.mark.parametrize("mask_shape", [(4, 7), (1, 7), (7,), (2, 1, 4, 7), (2, 3, 4, 7), (3, 1, 7)])
def test_mask_broadcasts_over_leading_dims(mask_shape):
    inputs = _inputs((2, 3), 4, 7)
    mask = _mask(mask_shape, seed=3)
    ours, weights = scaled_dot_product_attention(*inputs, mask=mask)
    # PyTorch wants a mask of at least 2 dims; ours also takes a (L_k,) row
    theirs = F.scaled_dot_product_attention(*inputs, attn_mask=mask.expand(4, 7) if mask.dim() == 1
                                            else mask)
    torch.testing.assert_close(ours, theirs)
    assert weights.shape == (2, 3, 4, 7)
    assert (weights[~mask.expand(2, 3, 4, 7)] == 0).all()
    for g_ours, g_theirs in zip(_grads(ours, inputs), _grads(theirs, inputs)):
        torch.testing.assert_close(g_ours, g_theirs)


def test_leading_dims_broadcast_between_query_and_key():
    query, _, _ = _inputs((2, 1), 3, 5, seed=4)  # (2, 1, L_q, d_k)
    _, key, value = _inputs((1, 4), 3, 5, seed=5)  # (1, 4, L_k, d_k), (1, 4, L_k, d_v)
    output, weights = scaled_dot_product_attention(query, key, value)
    assert output.shape == (2, 4, 3, 5) and weights.shape == (2, 4, 3, 5)
    expanded, _ = scaled_dot_product_attention(
        query.expand(2, 4, 3, 6), key.expand(2, 4, 5, 6), value.expand(2, 4, 5, 5)
    )
    torch.testing.assert_close(output, expanded)


@pytest.mark.parametrize("masked", [False, True])
def test_weights_sum_to_one_over_keys(masked):
    inputs = _inputs((2, 3), 5, 8, seed=6)
    mask = _mask((5, 8), seed=7) if masked else None
    _, weights = scaled_dot_product_attention(*inputs, mask=mask)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 3, 5))
    assert (weights >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_equal_softmax_of_scaled_scores_by_hand(dtype):
    query, key, value = (t.detach() for t in _inputs((3,), 4, 6, d_k=9, dtype=dtype, seed=8))
    scores = torch.einsum("bqd,bkd->bqk", query, key) / 3.0  # sqrt(d_k) = sqrt(9) = 3
    expected = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
    output, weights = scaled_dot_product_attention(query, key, value)
    torch.testing.assert_close(weights, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(output, expected @ value, **TOLERANCE[dtype])

    mask = _mask((4, 6), seed=9)
    masked_exp = scores.exp() * mask
    expected = masked_exp / masked_exp.sum(dim=-1, keepdim=True)
    _, weights = scaled_dot_product_attention(query, key, value, mask=mask)
    torch.testing.assert_close(weights, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", LEADING)
def test_fully_masked_rows_give_zeros_and_finite_gradients(dtype, lead):
    inputs = _inputs(lead, 4, 5, dtype=dtype, seed=10)
    mask = _mask((4, 5), seed=11)
    mask[1] = False  # query 1 may attend to nothing
    mask[3] = False
    output, weights = scaled_dot_product_attention(*inputs, mask=mask)
    assert torch.isfinite(output).all() and torch.isfinite(weights).all()
    assert (weights[..., [1, 3], :] == 0).all() and (output[..., [1, 3], :] == 0).all()
    torch.testing.assert_close(weights[..., [0, 2], :].sum(-1), torch.ones(*lead, 2, dtype=dtype))
    grads = _grads(output, inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][..., [1, 3], :] == 0).all()  # the empty queries receive no gradient
    # the other queries get what they would get without the empty ones
    query, key, value = inputs
    alone, _ = scaled_dot_product_attention(query[..., [0, 2], :], key, value, mask=mask[[0, 2]])
    torch.testing.assert_close(output[..., [0, 2], :], alone, **TOLERANCE[dtype])


def test_everything_masked_is_all_zeros():
    inputs = _inputs((2,), 3, 4, seed=12)
    output, weights = scaled_dot_product_attention(*inputs, mask=torch.zeros(3, 4, dtype=torch.bool))
    assert (output == 0).all() and (weights == 0).all()
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in _grads(output, inputs))


def test_masked_keys_do_not_influence_the_output():
    query, key, value = (t.detach() for t in _inputs((2,), 3, 6, seed=13))
    mask = _mask((3, 6), seed=14)
    mask[:, 4] = False
    output, _ = scaled_dot_product_attention(query, key, value, mask=mask)
    key2, value2 = key.clone(), value.clone()
    key2[..., 4, :] = 1e4  # a hidden key with an enormous score
    value2[..., 4, :] = -1e4
    output2, _ = scaled_dot_product_attention(query, key2, value2, mask=mask)
    torch.testing.assert_close(output, output2)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1.0, 0.0, 1.0]]),
        torch.tensor([[1, 0, 1]]),
        torch.tensor([[0.0, float("-inf"), 0.0]]),
        [[True, False, True]],
    ],
    ids=["float 0/1", "int 0/1", "additive float", "list"],
)
def test_non_bool_mask_raises_type_error(mask):
    inputs = _inputs((), 1, 3, seed=15)
    with pytest.raises(TypeError, match="boolean tensor, True where a query may attend"):
        scaled_dot_product_attention(*inputs, mask=mask)
