"""The chapter 8 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book import Transformer
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch08 import (
    _pool_variant,
    check_chunk_step,
    check_cross_attention_step,
    check_grouped_query_step,
    check_reorder_cache,
    check_ring_window_step,
)
from transformer_book.multihead import merge_heads, split_heads

# ----------------------------------------------------------------------------- 8.2


def _cross_step(recompute=False, mask=None, project_out=True, call_module=False,
                call_class=False):
    """A wrong answer family for 8.2."""

    def cross_attention_step(mha, x, memory, cache):
        if call_module:
            return mha(x, memory, memory)
        if call_class:  # the chapter's own module, reached through the class
            cache["static"] = True
            return type(mha).forward(mha, x, memory, memory, cache=cache)
        if recompute or "k" not in cache:
            cache["k"] = split_heads(mha.w_k(memory), mha.num_heads)
            cache["v"] = split_heads(mha.w_v(memory), mha.num_heads)
        cache["t"] = cache.get("t", -1) + 1
        q = split_heads(mha.w_q(x), mha.num_heads)
        k, v = cache["k"], cache["v"]
        m = None
        if mask == "one query":  # tril of (1, L_src): source position 0 only
            m = torch.ones(1, k.size(2), dtype=torch.bool).tril()
        if mask == "causal":  # step t may read sources 0 ... t
            m = (torch.arange(k.size(2)) <= cache["t"])[None, :]
        heads = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        return mha.w_o(heads) if project_out else heads

    return cross_attention_step


CROSS_MISTAKES = {
    "recomputes the memory": (_cross_step(recompute=True), "recomputes the memory's keys"),
    "causal mask, one query": (
        _cross_step(mask="one query"),
        "a causal mask was applied to a one-query step",
    ),
    "causal mask on cross-attention": (
        _cross_step(mask="causal"),
        "a causal mask was applied to cross-attention",
    ),
    "no output projection": (_cross_step(project_out=False), "skips the output projection"),
    "calls the module": (_cross_step(call_module=True), r"rather than mha\(\.\.\.\)"),
    "calls the class's forward": (
        _cross_step(call_class=True),
        "the chapter's MultiHeadAttention methods",
    ),
}


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


def _reorder(cache, beams):
    for key, value in cache.items():
        if isinstance(value, dict):
            _reorder(value, beams)
        elif isinstance(value, torch.Tensor):
            cache[key] = value.index_select(0, beams)


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
        _reorder(cache, beams)
        got = model.decode(token, memory[beams], src[beams], cache)[:, -1]
        whole = torch.cat([prefix[beams], token], dim=1)
        expected = model.decode(whole, memory[beams], src[beams])[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_reorder_may_return_a_new_cache():
    def reorder_cache(cache, beams):
        fresh = {k: dict(v) if isinstance(v, dict) else v for k, v in cache.items()}
        _reorder(fresh, beams)
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


# ----------------------------------------------------------------------------- 8.5


def _chunk_step(mask="bottom right", scale=None, chunk_only=False, call_module=False):
    """A wrong answer family for 8.5 (mask="bottom right" is the right answer)."""

    def chunk_step(query, key, value, cache):
        new_k, new_v = key, value
        if "k" in cache:
            key = torch.cat([cache["k"], key], dim=2)
            value = torch.cat([cache["v"], value], dim=2)
        cache["k"], cache["v"] = key, value
        n, total = query.size(2), key.size(2)
        if call_module:
            from transformer_book import MultiHeadAttention

            MultiHeadAttention._keys_values(None, key, value, {"static": True, "k": key})
        if chunk_only:
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(query, new_k, new_v, attn_mask=causal)
        if mask == "top left":
            return F.scaled_dot_product_attention(query, key, value, is_causal=True)
        if mask is None:
            return F.scaled_dot_product_attention(query, key, value)
        positions = torch.arange(total)
        m = positions <= positions[total - n :, None]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=m, scale=scale)

    return chunk_step


def test_chunk_step_passes_when_correct():
    check_chunk_step(_chunk_step())


CHUNK_MISTAKES = {
    "is_causal=True": (_chunk_step(mask="top left"), "aligned to the top left"),
    "no mask": (_chunk_step(mask=None), "later positions of the same chunk"),
    "the chunk only": (_chunk_step(chunk_only=True), "attends within the chunk only"),
    "unscaled": (_chunk_step(scale=1.0), "unscaled"),
    "the chapter's module": (_chunk_step(call_module=True), "not with the chapter's"),
}


def test_chunk_step_refuses_a_cache_that_forgets():
    def forgets(query, key, value, cache):
        cache["k"], cache["v"] = key, value  # only the chunk
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)

    with pytest.raises(CheckFailure, match="append the chunk along axis 2"):
        check_chunk_step(forgets)


def test_check_leaves_the_chapters_module_working():
    from transformer_book import MultiHeadAttention

    forward = MultiHeadAttention.forward
    with pytest.raises(CheckFailure):
        check_chunk_step(_chunk_step(call_module=True))
    assert MultiHeadAttention.forward is forward
    module = MultiHeadAttention(8, 2)
    assert module(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)).shape == (1, 3, 8)


# ----------------------------------------------------------------------------- 8.6


def _grouped_step(expand_first=False, tile=False, call_module=False):
    """A wrong answer family for 8.6 (no option: the right answer)."""

    def grouped_query_step(query, key, value, cache):
        group = query.size(1) // key.size(1)
        if expand_first:  # repeats before caching: the cache is as large as MHA's
            key, value = (x.repeat_interleave(group, dim=1) for x in (key, value))
        if "k" in cache:
            key = torch.cat([cache["k"], key], dim=2)
            value = torch.cat([cache["v"], value], dim=2)
        cache["k"], cache["v"] = key, value
        if call_module:
            from transformer_book.multihead import MultiHeadAttention

            MultiHeadAttention.forward(None, query, key, value)
        if not expand_first:
            spread = (lambda x: x.repeat(1, group, 1, 1)) if tile else (
                lambda x: x.repeat_interleave(group, dim=1))
            key, value = spread(key), spread(value)
        return F.scaled_dot_product_attention(query, key, value)

    return grouped_query_step


def test_grouped_query_step_passes_when_correct():
    check_grouped_query_step(_grouped_step())


GROUPED_MISTAKES = {
    "repeats before caching": (_grouped_step(expand_first=True), "before they were cached"),
    "tiles the heads": (_grouped_step(tile=True), "repeat_interleave"),
    "the chapter's module": (_grouped_step(call_module=True), "not with the chapter's"),
}


# --------------------------------------------------------------- every mistake, named

TABLES = {
    check_cross_attention_step: CROSS_MISTAKES,
    check_chunk_step: CHUNK_MISTAKES,
    check_grouped_query_step: GROUPED_MISTAKES,
}
CASES = [(check, mistake) for check, table in TABLES.items() for mistake in table]


@pytest.mark.parametrize(
    "check, mistake", CASES, ids=[f"{check.name}[{mistake}]" for check, mistake in CASES]
)
def test_each_check_names_each_mistake(check, mistake):
    wrong, message = TABLES[check][mistake]
    with pytest.raises(CheckFailure, match=message):
        check(wrong)
