"""Unit and property tests of the residual wrapper exported by chapter 5."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from transformer_book import MultiHeadAttention, Residual, causal_mask


def _mlp(d_model: int, hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))


@pytest.mark.parametrize("shape", [(3, 4), (2, 5, 6), (1, 1, 7), (5,)])
def test_adds_the_sublayer_output_to_the_input(shape):
    torch.manual_seed(0)
    sublayer = _mlp(shape[-1])
    x = torch.randn(shape)
    out = Residual(sublayer)(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x + sublayer(x))


def test_a_zero_sublayer_is_the_identity_in_values_and_gradient():
    torch.manual_seed(0)
    sublayer = _mlp(4)
    with torch.no_grad():
        sublayer[2].weight.zero_()
        sublayer[2].bias.zero_()
    block = Residual(sublayer)
    x = torch.randn(3, 4)
    assert torch.equal(block(x), x)
    assert torch.equal(jacobian(block, x[0]), torch.eye(4))


def test_jacobian_is_identity_plus_the_sublayer_jacobian():
    torch.manual_seed(1)
    sublayer = _mlp(5).double()
    x0 = torch.randn(5, dtype=torch.float64)
    expected = torch.eye(5, dtype=torch.float64) + jacobian(sublayer, x0)
    torch.testing.assert_close(jacobian(Residual(sublayer), x0), expected)


def test_extra_arguments_reach_the_sublayer():
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=8, num_heads=2).eval()
    block = Residual(attention)
    x = torch.randn(2, 5, 8)
    mask = causal_mask(5)
    out = block(x, x, x, mask=mask)
    torch.testing.assert_close(out, x + attention(x, x, x, mask=mask))
    # Causality survives the residual: changing the last token leaves the others unchanged.
    changed = x.clone()
    changed[:, -1] += 1.0
    out_changed = block(changed, changed, changed, mask=mask)
    torch.testing.assert_close(out_changed[:, :-1], out[:, :-1])


def test_registers_the_sublayer_parameters():
    sublayer = _mlp(4)
    block = Residual(sublayer, dropout=0.1)
    assert {id(p) for p in block.parameters()} == {id(p) for p in sublayer.parameters()}


def test_dropout_acts_on_the_branch_only():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    block = Residual(_mlp(6), dropout=1.0)
    assert torch.equal(block.train()(x), x)  # the whole branch dropped, the skip kept
    torch.testing.assert_close(block.eval()(x), x + block.sublayer(x))  # eval: no dropout
    half = Residual(_mlp(6), dropout=0.5).train()
    branch = half(x) - x
    kept = branch != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(branch[kept], 2.0 * half.sublayer(x)[kept])  # scaled by 1/(1-p)


@pytest.mark.parametrize(
    "sublayer, out_shape",
    [(nn.Linear(4, 8), (3, 8)), (nn.Linear(4, 1), (3, 1)), (nn.Flatten(0), (12,))],
    ids=["wider", "broadcastable", "flattened"],
)
def test_a_sublayer_that_changes_the_shape_is_refused(sublayer, out_shape):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="Residual") as info:
        Residual(sublayer)(x)
    message = str(info.value)
    assert str(out_shape) in message and "(3, 4)" in message
    assert message.count(".") == 1 and message.endswith(".")  # one sentence


def test_a_sublayer_that_returns_a_tuple_is_refused():
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(1, 3, 4)
    with pytest.raises(TypeError, match="returned a tuple"):
        Residual(attention)(x, x, x)


def test_gradients_reach_input_and_sublayer():
    torch.manual_seed(0)
    sublayer = _mlp(4)
    x = torch.randn(3, 4, requires_grad=True)
    Residual(sublayer)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in sublayer.parameters())
