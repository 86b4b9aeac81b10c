"""Unit, parity and property tests of the masks exported by chapter 4 (transformer_book.masking)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_book import (
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from transformer_book.multihead import copy_torch_mha_weights

PAD = 0
SEEDS = range(8)
HEADS = 3


def padded_tokens(generator, batch, length, vocab=11, pad_id=PAD, left=False):
    """Random ids with random lengths (at least 1), padded with pad_id on the right or left."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    positions = torch.arange(length)
    padding = positions >= lengths[:, None]
    if left:
        padding = padding.flip(-1)
    return ids.masked_fill(padding, pad_id), lengths


def torch_twin(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention, whose weights chapter 3's helper copies into ``mha``."""
    twin = nn.MultiheadAttention(12, HEADS, batch_first=True)
    copy_torch_mha_weights(mha, twin)
    return twin


@pytest.fixture
def mha():
    torch.manual_seed(0)
    return MultiHeadAttention(12, HEADS)


# ----------------------------------------------------------------------------- the masks


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_causal_mask_is_the_lower_triangle(size):
    mask = causal_mask(size)
    assert mask.dtype == torch.bool and mask.shape == (size, size)
    for i in range(size):
        for j in range(size):
            assert bool(mask[i, j]) == (j <= i)
    torch_float = nn.Transformer.generate_square_subsequent_mask(size)
    assert torch.equal(mask, torch_float == 0)


def test_causal_mask_honours_device():
    assert causal_mask(3, device="cpu").device.type == "cpu"
    assert causal_mask(3, device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("pad_id", [0, 99])
def test_padding_mask_shape_and_polarity(pad_id):
    tokens = torch.tensor([[4, 0, 7, pad_id], [pad_id, pad_id, pad_id, pad_id], [1, 2, 3, 5]])
    mask = padding_mask(tokens, pad_id)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 1, 4)
    assert torch.equal(mask[:, 0, 0], tokens != pad_id)  # True at real tokens
    assert mask[0, 0, 0, 1] == (pad_id != 0)  # id 0 is a real token when pad_id is 99


def test_padding_mask_from_generated_lengths():
    generator = torch.Generator().manual_seed(1)
    tokens, lengths = padded_tokens(generator, 6, 9)
    assert torch.equal(padding_mask(tokens, PAD).sum(dim=-1).flatten(), lengths)


def test_combined_mask_broadcasts_to_batch_1_l_l():
    tokens = torch.tensor([[3, 4, 5, PAD], [6, PAD, PAD, PAD]])
    combined = padding_mask(tokens, PAD) & causal_mask(4)  # (2, 1, 1, 4) & (4, 4)
    assert combined.shape == (2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                assert bool(combined[b, 0, i, j]) == (j <= i and bool(tokens[b, j] != PAD))


# ----------------------------------------------------------------------------- parity with PyTorch


@pytest.mark.parametrize("seed", SEEDS)
def test_masks_mean_the_same_to_f_scaled_dot_product_attention(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, length, source_length = 3, 2, 7, 5
    tokens, _ = padded_tokens(generator, batch, length)
    source, _ = padded_tokens(generator, batch, source_length)
    q = torch.randn(batch, heads, length, 8, generator=generator)
    k = torch.randn(batch, heads, length, 8, generator=generator)
    v = torch.randn(batch, heads, length, 8, generator=generator)
    ks = torch.randn(batch, heads, source_length, 8, generator=generator)
    vs = torch.randn(batch, heads, source_length, 8, generator=generator)
    masks = [
        (k, v, causal_mask(length)),
        (k, v, padding_mask(tokens, PAD) & causal_mask(length)),
        (ks, vs, padding_mask(source, PAD)),  # cross-attention, Lq != Lk
    ]
    for keys, values, mask in masks:
        ours, _ = scaled_dot_product_attention(q, keys, values, mask=mask)
        theirs = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_nn_multihead_attention_agrees_with_inverted_masks(mha, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens, _ = padded_tokens(generator, 4, 6)
    x = torch.randn(4, 6, 12, generator=generator)
    pad, causal = padding_mask(tokens, PAD), causal_mask(6)
    theirs_module = torch_twin(mha)
    with torch.no_grad():
        ours = mha(x, x, x, mask=pad & causal)
        theirs, weights = theirs_module(x, x, x, attn_mask=~causal, key_padding_mask=~pad[:, 0, 0])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mha.attention_weights.mean(dim=1), weights, atol=1e-6, rtol=1e-5)
        # a general mask through the 3-D attn_mask, ordered batch first (b * heads + h)
        per_head = torch.rand(4, 3, 6, 6, generator=generator) < 0.5
        per_head[..., 0] = True  # every query keeps a key (PyTorch would give NaN otherwise)
        ours = mha(x, x, x, mask=per_head)
        theirs, _ = theirs_module(x, x, x, attn_mask=~per_head.reshape(12, 6, 6))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_uninverted_masks_differ_from_the_book(mha):
    x = torch.randn(2, 5, 12)
    causal = causal_mask(5)
    twin = torch_twin(mha)
    with torch.no_grad():
        ours = mha(x, x, x, mask=causal)
        wrong, _ = twin(x, x, x, attn_mask=causal)
    assert not torch.allclose(ours, wrong, atol=1e-3, equal_nan=True)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("seed", SEEDS)
def test_the_future_cannot_change_the_past(mha, seed):
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(2, 12, (1,), generator=generator))
    t = int(torch.randint(0, length - 1, (1,), generator=generator))
    x = torch.randn(2, length, 12, generator=generator)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(2, length - t - 1, 12, generator=generator)
    mask = causal_mask(length)
    with torch.no_grad():
        before, after = mha(x, x, x, mask=mask), mha(changed, changed, changed, mask=mask)
        unmasked_before, unmasked_after = mha(x, x, x), mha(changed, changed, changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(unmasked_after[:, : t + 1], unmasked_before[:, : t + 1], atol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_cannot_change_real_outputs(mha, seed, causal):
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(2, 10, (1,), generator=generator))
    tokens, _ = padded_tokens(generator, 3, length)
    embed = nn.Embedding(11, 12)
    real = tokens != PAD

    def run(ids, x):
        mask = padding_mask(ids, PAD)
        if causal:
            mask = mask & causal_mask(ids.size(1))
        with torch.no_grad():
            return mha(x, x, x, mask=mask)

    with torch.no_grad():
        x = embed(tokens)
        noisy = torch.where(real[..., None], x, torch.randn(x.shape, generator=generator))
        longer = F.pad(tokens, (0, 4), value=PAD)
        x_longer = embed(longer)
    out = run(tokens, x)
    torch.testing.assert_close(run(tokens, noisy)[real], out[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        run(longer, x_longer)[:, :length][real], out[real], atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_self_attention_without_mask_is_permutation_equivariant(mha, seed):
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(4, 12, (1,), generator=generator))
    x = torch.randn(2, length, 12, generator=generator)
    perm = torch.randperm(length, generator=generator)
    if torch.equal(perm, torch.arange(length)):
        perm = perm.roll(1)
    xp = x[:, perm]
    with torch.no_grad():
        torch.testing.assert_close(mha(xp, xp, xp), mha(x, x, x)[:, perm], atol=1e-5, rtol=1e-4)
        mask = causal_mask(length)
        assert not torch.allclose(
            mha(xp, xp, xp, mask=mask), mha(x, x, x, mask=mask)[:, perm], atol=1e-3
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_fully_masked_rows_give_zeros_not_nan(mha, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens, lengths = padded_tokens(generator, 4, 7, left=True)
    mask = padding_mask(tokens, PAD) & causal_mask(7)  # left padding: the first rows are empty
    x = torch.randn(4, 7, 12, generator=generator, requires_grad=True)
    out = mha(x, x, x, mask=mask)
    weights = mha.attention_weights
    empty = ~mask.any(dim=-1)  # (4, 1, 7)
    assert int(empty.sum()) == int((7 - lengths).sum())
    assert torch.isfinite(out).all()
    assert (weights * empty[..., None] == 0).all()  # an empty row has all-zero weights
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
