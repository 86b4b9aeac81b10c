"""What the chapter 8 tables cannot express (every mistake of every table: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book import MultiHeadAttention, Transformer
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch08 import (
    _calls_the_chapter,
    _pool_variant,
    _reorder_variant,
    check_chunk_step,
    check_cross_attention_step,
    check_reorder_cache,
    check_ring_window_step,
)
from transformer_book.multihead import merge_heads, split_heads


def test_check_leaves_the_chapters_module_working():
    forward, keys_values = MultiHeadAttention.forward, MultiHeadAttention._keys_values
    with pytest.raises(CheckFailure, match="not with the chapter's"):
        check_chunk_step(_calls_the_chapter)
    assert MultiHeadAttention.forward is forward
    assert MultiHeadAttention._keys_values is keys_values
    module = MultiHeadAttention(8, 2)
    assert module(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)).shape == (1, 3, 8)


def test_cross_attention_step_accepts_the_projections_as_functional_calls(capsys):
    """The same weights through F.linear are right: the memory is projected once."""

    def cross_attention_step(mha, x, memory, cache):
        if "k" not in cache:
            cache["k"], cache["v"] = (
                split_heads(F.linear(memory, w.weight, w.bias), mha.num_heads)
                for w in (mha.w_k, mha.w_v)
            )
        q = split_heads(F.linear(x, mha.w_q.weight, mha.w_q.bias), mha.num_heads)
        heads = F.scaled_dot_product_attention(q, cache["k"], cache["v"])
        return mha.w_o(merge_heads(heads))

    check_cross_attention_step(cross_attention_step)
    assert "passed" in capsys.readouterr().out


# ----------------------------------------------------------------- 8.1, 8.3 and 8.6


def test_a_ring_may_keep_its_own_bookkeeping_in_the_cache():
    def ring_window_step(query, key, value, cache, window):
        steps = cache.setdefault("my steps", [])
        t = len(steps)
        steps.append(t)
        if not t:
            shape = (key.size(0), key.size(1), window, key.size(3))
            cache["k"], cache["v"] = torch.zeros(shape), torch.zeros(shape)
        cache["k"][:, :, t % window] = key[:, :, 0]
        cache["v"][:, :, t % window] = value[:, :, 0]
        n = min(t + 1, window)
        return F.scaled_dot_product_attention(query, cache["k"][:, :, :n], cache["v"][:, :, :n])

    check_ring_window_step(ring_window_step)


@pytest.mark.parametrize("capacity", [None, 10])
def test_a_reordered_cache_decodes_as_the_reordered_sequences_recomputed(capacity):
    """The premise of check 8.3: index_select(0, beams) on every tensor is beam search's
    reorder (the next step then equals recomputing the reordered prefixes)."""
    torch.manual_seed(5)
    model = Transformer(13, 13, d_model=8, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=2, d_ff=16, dropout=0.0).eval()
    src, prefix = torch.randint(3, 13, (4, 5)), torch.randint(3, 13, (4, 6))
    src[1:, -2:], prefix[0, 4:] = 0, 0
    beams, token = torch.tensor([2, 2, 0, 1]), torch.randint(3, 13, (4, 1))
    with torch.no_grad():
        memory = model.encode(src)
        cache = {"capacity": capacity}
        model.decode(prefix, memory, src, cache)
        _reorder_variant(cache, beams)  # the check's reference
        got = model.decode(token, memory[beams], src[beams], cache)[:, -1]
        whole = torch.cat([prefix[beams], token], dim=1)
        expected = model.decode(whole, memory[beams], src[beams])[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_reorder_may_return_a_new_cache():
    def reorder_cache(cache, beams):
        fresh = {k: dict(v) if isinstance(v, dict) else v for k, v in cache.items()}
        _reorder_variant(fresh, beams)
        return fresh

    check_reorder_cache(reorder_cache)


def test_pooling_identical_heads_changes_no_key():
    """The premise of check 8.6: when a group's heads are equal, the pooled projection,
    each head repeated for its group, is the original projection."""
    torch.manual_seed(6)
    heads, kv_heads, d_model = 6, 2, 12
    linear = torch.nn.Linear(d_model, d_model)
    with torch.no_grad():  # make the heads of each group equal: 0 = 1 = 2, 3 = 4 = 5
        w, b = linear.weight.view(heads, 2, d_model), linear.bias.view(heads, 2)
        w.copy_(w[[0, 0, 0, 3, 3, 3]])
        b.copy_(b[[0, 0, 0, 3, 3, 3]])
    pooled = _pool_variant(linear, heads, kv_heads)  # the check's reference
    x = torch.randn(3, d_model)
    keys = pooled(x).view(3, kv_heads, 2).repeat_interleave(heads // kv_heads, dim=1)
    torch.testing.assert_close(keys.reshape(3, d_model), linear(x))
