"""MultiHeadAttention (chapter 3) against torch.nn.MultiheadAttention, and its helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transformer_book
from transformer_book.multihead import (
    MultiHeadAttention,
    copy_torch_mha_weights,
    merge_heads,
    split_heads,
)

TOL = 1e-5


def _pair(d_model, num_heads, bias=True, dropout=0.0, seed=0):
    """Our module and PyTorch's with the same weights (PyTorch's biases randomised)."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(
        d_model, num_heads, dropout=dropout, bias=bias, batch_first=True
    )
    if bias:
        nn.init.normal_(theirs.in_proj_bias)
        nn.init.normal_(theirs.out_proj.bias)
    ours = MultiHeadAttention(d_model, num_heads, dropout=dropout, bias=bias)
    return copy_torch_mha_weights(ours, theirs), theirs


def _torch_mask(mask, batch, num_heads, lq, lk):
    if mask is None:
        return None
    return ~mask.expand(batch, num_heads, lq, lk).reshape(batch * num_heads, lq, lk)


def _inputs(batch, lq, lk, d_model, self_attention, dtype=torch.float32):
    query = torch.randn(batch, lq, d_model, dtype=dtype, requires_grad=True)
    if self_attention:
        return query, query, query, (query,)
    key = torch.randn(batch, lk, d_model, dtype=dtype, requires_grad=True)
    value = torch.randn(batch, lk, d_model, dtype=dtype, requires_grad=True)
    return query, key, value, (query, key, value)


def _mask(kind, batch, num_heads, lq, lk):
    """A mask of the given broadcastable shape, True = may attend, no fully masked row."""
    if kind is None:
        return None
    if kind == "causal":  # (Lq, Lk)
        return torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=max(lk - lq, 0))
    shapes = {
        "keys": (batch, 1, 1, lk),
        "keys_shared": (1, 1, 1, lk),
        "per_sequence": (batch, 1, lq, lk),
        "per_head": (batch, num_heads, lq, lk),
    }
    mask = torch.rand(shapes[kind]) > 0.4
    mask[..., 0] = True  # every query keeps key 0
    return mask


CASES = [
    # batch, Lq, Lk, d_model, heads, self-attention, mask kind
    (3, 9, 9, 24, 4, True, None),
    (3, 9, 9, 24, 4, True, "causal"),
    (2, 5, 8, 16, 2, False, None),
    (2, 5, 8, 16, 2, False, "keys"),
    (2, 5, 8, 16, 4, False, "keys_shared"),
    (2, 6, 6, 12, 3, False, "per_sequence"),
    (2, 4, 7, 20, 5, False, "per_head"),
    (1, 1, 1, 8, 2, True, None),
    (1, 3, 6, 10, 1, False, "keys"),
    (4, 7, 3, 30, 6, False, "causal"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_torch(case, bias):
    batch, lq, lk, d_model, num_heads, self_attention, kind = case
    ours, theirs = _pair(d_model, num_heads, bias=bias)
    query, key, value, leaves = _inputs(batch, lq, lk, d_model, self_attention)
    mask = _mask(kind, batch, num_heads, lq, lk)
    attn_mask = _torch_mask(mask, batch, num_heads, lq, lk)
    grad_out = torch.randn(batch, lq, d_model)

    out = ours(query, key, value, mask)
    ref, ref_mean = theirs(query, key, value, attn_mask=attn_mask)  # averaged weights
    _, ref_heads = theirs(query, key, value, attn_mask=attn_mask, average_attn_weights=False)
    assert out.shape == (batch, lq, d_model)
    assert ours.attention_weights.shape == (batch, num_heads, lq, lk)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.attention_weights.mean(1), ref_mean, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.attention_weights, ref_heads, atol=TOL, rtol=0)

    our_params = [ours.w_q.weight, ours.w_k.weight, ours.w_v.weight, ours.w_o.weight]
    their_params = [theirs.in_proj_weight, theirs.out_proj.weight]
    grads = torch.autograd.grad(out, leaves + tuple(our_params), grad_out)
    ref_grads = torch.autograd.grad(ref, leaves + tuple(their_params), grad_out)
    n = len(leaves)
    for g, r in zip(grads[:n], ref_grads[:n]):
        torch.testing.assert_close(g, r, atol=TOL, rtol=0)  # input gradients
    torch.testing.assert_close(torch.cat(grads[n : n + 3]), ref_grads[n], atol=TOL, rtol=0)
    torch.testing.assert_close(grads[n + 3], ref_grads[n + 1], atol=TOL, rtol=0)


def test_parity_in_float64():
    ours, theirs = _pair(16, 4)
    ours, theirs = ours.double(), theirs.double()
    query, key, value, _ = _inputs(2, 5, 7, 16, False, dtype=torch.float64)
    torch.testing.assert_close(ours(query, key, value), theirs(query, key, value)[0])


def test_dropout_is_inactive_in_eval_mode():
    ours, theirs = _pair(16, 4, dropout=0.5)
    ours.eval(), theirs.eval()
    query, key, value, _ = _inputs(2, 5, 7, 16, False)
    out = ours(query, key, value)
    ref, ref_heads = theirs(query, key, value, average_attn_weights=False)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.attention_weights, ref_heads, atol=TOL, rtol=0)


def test_dropout_in_training_mode_keeps_the_weights_before_dropout():
    ours, _ = _pair(16, 4, dropout=0.5)
    query, key, value, _ = _inputs(2, 5, 7, 16, False)
    ours.eval()
    out_eval = ours(query, key, value)
    weights_eval = ours.attention_weights
    ours.train()
    torch.manual_seed(1)
    out_train = ours(query, key, value)
    assert not torch.allclose(out_train, out_eval)  # dropout acted
    torch.testing.assert_close(ours.attention_weights, weights_eval)  # stored before dropout
    torch.testing.assert_close(ours.attention_weights.sum(-1), torch.ones(2, 4, 5))


def test_dropout_zero_in_training_mode_is_deterministic():
    ours, theirs = _pair(12, 3)
    query, key, value, _ = _inputs(2, 4, 4, 12, False)
    ours.train()
    torch.testing.assert_close(ours(query, key, value), theirs(query, key, value)[0], atol=TOL, rtol=0)


def test_attention_weights_are_detached():
    ours, _ = _pair(8, 2)
    query, key, value, _ = _inputs(1, 3, 3, 8, False)
    ours(query, key, value)
    assert not ours.attention_weights.requires_grad


@pytest.mark.parametrize("d_model,num_heads", [(10, 3), (8, 3), (6, 4)])
def test_indivisible_d_model_is_a_value_error(d_model, num_heads):
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(d_model, num_heads)


def test_projections_are_linear_layers_with_the_contract_names():
    mha = MultiHeadAttention(12, 3, bias=False)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        layer = getattr(mha, name)
        assert isinstance(layer, nn.Linear)
        assert layer.weight.shape == (12, 12) and layer.bias is None
    assert sum(p.numel() for p in mha.parameters()) == 4 * 12 * 12
    assert sum(p.numel() for p in MultiHeadAttention(12, 3).parameters()) == 4 * 12 * 12 + 4 * 12


def test_fully_masked_row_gives_zeros_not_nan():
    ours, theirs = _pair(8, 2)
    x = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False  # query 2 may attend to nothing
    out = ours(x, x, x, mask)
    out.sum().backward()
    assert out.isfinite().all() and x.grad.isfinite().all()
    assert torch.equal(ours.attention_weights[:, :, 2], torch.zeros(2, 2, 4))
    ref, _ = theirs(x, x, x, attn_mask=~mask)
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(out[:, keep], ref[:, keep], atol=TOL, rtol=0)


def test_mask_must_be_boolean():
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(1, 3, 8)
    with pytest.raises(TypeError):
        mha(x, x, x, torch.ones(3, 3))


def test_split_heads_layout():
    x = torch.arange(2 * 3 * 8).reshape(2, 3, 8)  # (B, L, d_model)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 2)
    for b in range(2):
        for h in range(4):
            for t in range(3):
                assert torch.equal(heads[b, h, t], x[b, t, 2 * h : 2 * h + 2])


@pytest.mark.parametrize("num_heads", [1, 2, 3, 6])
def test_merge_undoes_split(num_heads):
    x = torch.randn(2, 5, 6)
    assert torch.equal(merge_heads(split_heads(x, num_heads)), x)
    y = torch.randn(2, num_heads, 5, 6 // num_heads)
    assert torch.equal(split_heads(merge_heads(y), num_heads), y)


def test_split_heads_accepts_non_contiguous_input():
    x = torch.randn(5, 2, 8).transpose(0, 1)  # (B, L, d_model), not contiguous
    assert torch.equal(split_heads(x, 2), split_heads(x.contiguous(), 2))


def test_self_attention_is_permutation_equivariant():
    ours, _ = _pair(16, 4)
    x = torch.randn(2, 7, 16)
    perm = torch.randperm(7)
    torch.testing.assert_close(ours(x[:, perm], x[:, perm], x[:, perm]), ours(x, x, x)[:, perm])


def test_copy_refuses_mismatched_modules():
    with pytest.raises(ValueError, match="bias"):
        copy_torch_mha_weights(MultiHeadAttention(8, 2, bias=False), nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="d_model or num_heads"):
        copy_torch_mha_weights(MultiHeadAttention(8, 2), nn.MultiheadAttention(8, 4))
    with pytest.raises(ValueError, match="kdim"):
        copy_torch_mha_weights(MultiHeadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


def test_exported_at_the_top_level():
    assert transformer_book.MultiHeadAttention is MultiHeadAttention
    assert "MultiHeadAttention" in transformer_book.__all__


def test_uses_the_chapter_2_attention_function(monkeypatch):
    import transformer_book.multihead as multihead

    calls = []
    original = multihead.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(multihead, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 3, 8)
    MultiHeadAttention(8, 2)(x, x, x)
    assert calls == [(2, 2, 3, 4)]  # called once, on (B, heads, L, d_head)
