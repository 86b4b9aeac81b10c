"""The chapter 8 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book.checks import CheckFailure
from transformer_book.checks.ch08 import (
    check_chunk_step,
    check_cross_attention_step,
    check_grouped_query_step,
    check_kv_cache_bytes,
    check_self_attention_step,
    check_sliding_window_step,
)
from transformer_book.multihead import merge_heads, split_heads

# ----------------------------------------------------------------------------- 8.1


def _self_step(axis=2, mask=None, prepend=False, replace=False, scale=None, keep_new=True):
    """A wrong answer family for 8.1."""

    def self_attention_step(query, key, value, cache):
        new_k, new_v = key, value
        if "k" in cache and not replace:
            parts_k, parts_v = [cache["k"], key], [cache["v"], value]
            if prepend:
                parts_k, parts_v = parts_k[::-1], parts_v[::-1]
            key, value = torch.cat(parts_k, dim=axis), torch.cat(parts_v, dim=axis)
        cache["k"], cache["v"] = key, value
        if not keep_new and key.size(2) > 1:
            key, value = key[:, :, :-1], value[:, :, :-1]
        if mask == "causal":
            n = key.size(2)
            m = torch.ones(1, n, dtype=torch.bool).tril()  # (1, n): keeps key 0 only
            return F.scaled_dot_product_attention(query, key, value, attn_mask=m)
        if mask == "new only":
            return F.scaled_dot_product_attention(query, new_k, new_v)
        return F.scaled_dot_product_attention(query, key, value, scale=scale)

    return self_attention_step


SELF_MISTAKES = {
    "cat on the heads axis": (_self_step(axis=1), r"appended along the heads axis \(dim=1\)"),
    "cat on the batch axis": (_self_step(axis=0), r"appended along the batch axis \(dim=0\)"),
    "cat on the feature axis": (_self_step(axis=-1), r"along the feature axis \(dim=-1\)"),
    "causal mask on one query": (
        _self_step(mask="causal"),
        "a causal mask was applied to a one-query step",
    ),
    "replaces the cache": (_self_step(replace=True), "replaced the cached ones"),
    "prepends": (_self_step(prepend=True), "the new one was put first"),
    "attends to the new key only": (_self_step(mask="new only"), "new position only"),
    "attends before appending": (_self_step(keep_new=False), "append first, then attend"),
    "unscaled": (_self_step(scale=1.0), "unscaled"),
}


def test_self_attention_step_without_a_cache_entry():
    def forgets(query, key, value, cache):
        return F.scaled_dot_product_attention(query, key, value)

    with pytest.raises(CheckFailure, match="cache has no 'k' and 'v' entries"):
        check_self_attention_step(forgets)


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


# ----------------------------------------------------------------------------- 8.3


def _window_step(keep=lambda w: w, oldest=False, trim=True):
    """A wrong answer family for 8.3."""

    def sliding_window_step(query, key, value, cache, window):
        if "k" in cache:
            key = torch.cat([cache["k"], key], dim=2)
            value = torch.cat([cache["v"], value], dim=2)
        if trim:
            n = keep(window)
            if oldest:
                key, value = key[:, :, :n], value[:, :, :n]
            else:
                key, value = key[:, :, -n:], value[:, :, -n:]
        cache["k"], cache["v"] = key, value
        return F.scaled_dot_product_attention(query, key, value)

    return sliding_window_step


WINDOW_MISTAKES = {
    "never trims": (_window_step(trim=False), "never drops the oldest ones"),
    "one too many": (_window_step(keep=lambda w: w + 1), "one more than the window"),
    "one too few": (_window_step(keep=lambda w: max(w - 1, 1)), "fewer than the"),
    "keeps the oldest": (_window_step(oldest=True), "kept the oldest ones and dropped the new"),
}


# ----------------------------------------------------------------------------- 8.4


def _size(factor=2, heads="kv", size=None, layers=True, bits=False):
    """A wrong answer family for 8.4."""

    def kv_cache_bytes(num_layers, batch, length, d_model, num_heads, num_kv_heads, dtype):
        width = (num_kv_heads if heads == "kv" else num_heads) * (d_model // num_heads)
        per = torch.tensor([], dtype=dtype).element_size() if size is None else size
        total = factor * batch * length * width * per * (num_layers if layers else 1)
        return total * 8 if bits else total

    return kv_cache_bytes


SIZE_MISTAKES = {
    "keys only": (_size(factor=1), "count keys and values"),
    "every head cached": (_size(heads="q"), "as many key/value heads as query heads"),
    "bits": (_size(bits=True), "bits, not bytes"),
    "always 4 bytes": (_size(size=4), "4 bytes per number whatever the dtype"),
    "numbers, not bytes": (_size(size=1), "a count of numbers, not bytes"),
    "one layer": (_size(layers=False), "one layer only"),
}


def test_kv_cache_bytes_wants_an_int():
    with pytest.raises(CheckFailure, match="should return an int"):
        check_kv_cache_bytes(lambda *args: "a lot")


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
    check_self_attention_step: SELF_MISTAKES,
    check_cross_attention_step: CROSS_MISTAKES,
    check_sliding_window_step: WINDOW_MISTAKES,
    check_kv_cache_bytes: SIZE_MISTAKES,
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
