"""Parity and property tests of transformer_book.norm (generated from chapter 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformer_book
from transformer_book.norm import AddNorm, LayerNorm, PreNormResidual

SHAPES = [(4,), (3, 4), (2, 5, 8), (1, 1, 33), (4, 7, 100), (2, 3, 6, 10), (5, 1)]


def _random_pair(d, dtype=torch.float32, seed=0):
    """Our LayerNorm and nn.LayerNorm with the same random weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    reference = nn.LayerNorm(d).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(d, generator=generator, dtype=dtype))
        reference.bias.copy_(torch.randn(d, generator=generator, dtype=dtype))
    ours = LayerNorm(d).to(dtype)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def test_exported_from_the_package_top_level():
    assert transformer_book.LayerNorm is LayerNorm
    assert transformer_book.AddNorm is AddNorm
    assert transformer_book.PreNormResidual is PreNormResidual


def test_layer_norm_parameters_and_defaults_match_torch():
    ours, theirs = LayerNorm(6), nn.LayerNorm(6)
    assert ours.eps == theirs.eps == 1e-5
    assert ours.normalized_shape == theirs.normalized_shape == (6,)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert torch.equal(ours.weight, torch.ones(6)) and torch.equal(ours.bias, torch.zeros(6))
    assert set(ours.state_dict()) == set(theirs.state_dict())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_values_and_gradients_match_torch(shape, dtype, tol):
    d = shape[-1]
    ours, theirs = _random_pair(d, dtype)
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(shape, generator=generator, dtype=dtype) + 1).requires_grad_()
    upstream = torch.randn(shape, generator=generator, dtype=dtype)
    results = []
    for module in (ours, theirs):
        out = module(x)
        assert out.dtype == dtype and out.shape == x.shape
        grads = torch.autograd.grad((out * upstream).sum(), (x, module.weight, module.bias))
        results.append((out, *grads))
    if d == 1 and dtype == torch.float32:
        tol = 1e-4  # with d = 1, rstd = 1/sqrt(eps) = 316 amplifies torch's float32 rounding
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_layer_norm_state_dict_round_trip_both_ways():
    ours, theirs = _random_pair(12, seed=3)
    x = torch.randn(2, 5, 12)
    back = nn.LayerNorm(12)
    back.load_state_dict(ours.state_dict())  # ours -> torch
    again = LayerNorm(12)
    again.load_state_dict(back.state_dict())  # torch -> ours
    torch.testing.assert_close(back(x), theirs(x))
    torch.testing.assert_close(again(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_matches_the_formula_with_eps_inside_and_biased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.001, -0.001, 0.001, -0.001]], dtype=torch.float64)
    ours = LayerNorm(4, eps=1e-5).double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / 4
    torch.testing.assert_close(ours(x), (x - mean) / torch.sqrt(var + 1e-5))
    unbiased = (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
    eps_outside = (x - mean) / (var.sqrt() + 1e-5)
    assert not torch.allclose(ours(x), unbiased, atol=1e-3)
    assert not torch.allclose(ours(x)[1], eps_outside[1], atol=1e-1)  # the quiet token


def test_layer_norm_custom_eps_and_constant_input():
    x = torch.full((3, 5), 7.0)
    assert torch.equal(LayerNorm(5)(x), torch.zeros(3, 5))  # finite: eps inside the root
    x = 0.05 * torch.randn(4, 8)
    torch.testing.assert_close(LayerNorm(8, eps=1e-2)(x), F.layer_norm(x, (8,), eps=1e-2))


def test_layer_norm_rejects_a_wrong_last_dimension():
    with pytest.raises(ValueError, match=r"last dimension.*size 4.*\(2, 3\)"):
        LayerNorm(4)(torch.randn(2, 3))
    with pytest.raises(ValueError):
        LayerNorm(4)(torch.tensor(1.0))


def test_add_norm_is_layer_norm_of_the_sum():
    torch.manual_seed(0)
    block = AddNorm(6)
    with torch.no_grad():
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    x, s = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    expected = F.layer_norm(x + s, (6,), block.norm.weight, block.norm.bias, 1e-5)
    torch.testing.assert_close(block(x, s), expected)
    assert isinstance(block.norm, LayerNorm)
    assert not torch.allclose(block(x, s), x + block.norm(s), atol=1e-2)  # not residual-after-norm


def test_add_norm_dropout_only_in_training_and_only_on_the_sublayer_output():
    torch.manual_seed(0)
    block = AddNorm(8, dropout=0.5)
    x, s = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    assert not torch.equal(block(x, s), block(x, s))  # training mode: random
    torch.testing.assert_close(block(x, torch.zeros_like(s)), F.layer_norm(x, (8,)))  # x untouched
    block.eval()
    torch.testing.assert_close(block(x, s), F.layer_norm(x + s, (8,)))
    assert torch.equal(block(x, s), block(x, s))


def test_add_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"sublayer_output has shape \(2, 1, 6\)"):
        AddNorm(6)(torch.randn(2, 3, 6), torch.randn(2, 1, 6))  # would broadcast silently


def test_pre_norm_residual_is_x_plus_sublayer_of_the_normalized_x():
    torch.manual_seed(0)
    sublayer = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    block = PreNormResidual(6, sublayer)
    with torch.no_grad():
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    x = torch.randn(2, 3, 6)
    normalized = F.layer_norm(x, (6,), block.norm.weight, block.norm.bias, 1e-5)
    torch.testing.assert_close(block(x), x + sublayer(normalized))
    assert block.sublayer is sublayer and isinstance(block.norm, LayerNorm)


def test_pre_norm_residual_passes_extra_arguments_and_is_the_identity_for_a_zero_sublayer():
    class Scaled(nn.Module):
        def forward(self, h, scale, *, shift=0.0):
            return scale * h + shift

    x = torch.randn(3, 4)
    block = PreNormResidual(4, Scaled())
    torch.testing.assert_close(block(x, 2.0, shift=1.0), x + 2.0 * F.layer_norm(x, (4,)) + 1.0)
    assert torch.equal(block(x, 0.0), x)  # sublayer outputs zeros: exactly the identity


def test_pre_norm_residual_dropout_in_eval_mode():
    torch.manual_seed(0)
    sublayer = nn.Linear(8, 8)
    block = PreNormResidual(8, sublayer, dropout=0.5)
    x = torch.randn(4, 8)
    assert not torch.equal(block(x), block(x))
    block.eval()
    torch.testing.assert_close(block(x), x + sublayer(F.layer_norm(x, (8,))))


def test_pre_norm_residual_rejects_a_sublayer_that_changes_the_shape_or_returns_a_tuple():
    with pytest.raises(ValueError, match=r"sublayer returned \(3, 5\)"):
        PreNormResidual(4, nn.Linear(4, 5))(torch.randn(3, 4))

    class ReturnsTuple(nn.Module):
        def forward(self, h):
            return h, None

    with pytest.raises(ValueError, match=r"sublayer returned tuple"):
        PreNormResidual(4, ReturnsTuple())(torch.randn(3, 4))
