"""Checks for the exercises of chapter 8, Fast decoding.

Per-head tensors have the shape ``(batch, heads, L, d_head)``; a decoding step brings
one new position, ``L = 1``. A cache is a dict holding ``"k"`` and ``"v"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transformer_book.multihead import MultiHeadAttention

from ._core import (
    CheckFailure,
    call,
    exercise,
    expect_callable,
    expect_shape,
    expect_tensor,
    fail,
    refused,
    same,
)


def _chapter_attention() -> list[tuple[object, str]]:
    """(owner, attribute) of the methods the chapter added to MultiHeadAttention, and its
    forward: an exercise that asks for what they do refuses a call of them."""
    return [(MultiHeadAttention, name) for name in ("forward", "_keys_values", "_fused")]

# ----------------------------------------------------------------------------- helpers


def _sequences(generator: torch.Generator, batch: int, heads: int, length: int, d_head: int):
    shape = (batch, heads, length, d_head)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def _attend(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _step(fn, q, k, v, cache, t, what, *extra):
    """Run one step of the student's code; on a crash, first look at what it cached."""
    args = (q[:, :, t : t + 1].clone(), k[:, :, t : t + 1].clone(), v[:, :, t : t + 1].clone())
    try:
        return call(fn, *args, cache, *extra, what=what)
    except CheckFailure:
        if isinstance(cache, dict) and "k" in cache:  # a wrong cache explains the crash
            _expect_appended(cache, k, t, where=f"at step {t}")
        raise


def _expect_appended(cache, k, t, where: str) -> None:
    """The cache after step t holds keys of positions 0 ... t along axis 2, in order."""
    if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
        fail(
            f"after the step {where} the cache has no 'k' and 'v' entries: store the keys "
            "and values you attend over in cache['k'] and cache['v'] (the same dict, "
            "updated in place), so that the next step can use them."
        )
    batch, heads, _, d_head = k.shape
    got = expect_tensor(cache["k"], f"cache['k'] {where}")
    expected = k[:, :, : t + 1]
    if tuple(got.shape) == tuple(expected.shape):
        if same(got, torch.cat([k[:, :, t : t + 1], k[:, :, :t]], dim=2)) and t > 0:
            fail(
                f"cache['k'] {where} holds the positions in the wrong order: the new one "
                "was put first (`torch.cat([key, cache['k']], dim=2)`?). Keep position "
                "order, so that cache['k'][:, :, p] is position p: a sliding window or a "
                "position bias depends on it."
            )
        if not same(got, expected):
            fail(
                f"cache['k'] {where} does not hold the keys of positions 0 ... {t} that "
                "the steps were given: store the keys themselves, not a copy changed "
                "in place or scaled."
            )
        return
    shape = tuple(got.shape)
    if t > 0 and shape == (batch, heads, 1, d_head):
        fail(
            f"cache['k'] {where} holds only the newest position: the new keys replaced "
            "the cached ones instead of being appended, "
            "`torch.cat([cache['k'], key], dim=2)`."
        )
    wrong_axes = {
        0: (batch * (t + 1), heads, 1, d_head),
        1: (batch, heads * (t + 1), 1, d_head),
        3: (batch, heads, 1, d_head * (t + 1)),
    }
    names = {0: "batch axis (dim=0)", 1: "heads axis (dim=1)", 3: "feature axis (dim=-1)"}
    for axis, wrong in wrong_axes.items():
        if t > 0 and shape == wrong:
            fail(
                f"cache['k'] {where} has shape {shape}: the new position was appended "
                f"along the {names[axis]}. Positions are axis 2 of (batch, heads, L, "
                "d_head): `torch.cat([cache['k'], key], dim=2)`."
            )
    fail(f"cache['k'] {where} has shape {shape}, expected {tuple(expected.shape)}.")


def _diagnose_step(out, q, k, v, t, where, window=None):
    """Name the mistake of a one-query step whose output is wrong."""
    lo = 0 if window is None else max(0, t - window + 1)
    q_t = q[:, :, t : t + 1]
    keys, values = k[:, :, lo : t + 1], v[:, :, lo : t + 1]
    if t == lo + 1 and same(out, _attend(q_t, k[:, :, lo:t], v[:, :, lo:t])):
        fail(
            f"your output {where} attends to the cached key only, not to the new one. "
            "Either a causal mask was applied to a one-query step (`tril` of a (1, n) "
            "matrix keeps column 0 only; the new query is the latest position and may "
            "attend to every cached key), or you attended over the cache before adding "
            "the new position: append first, then attend."
        )
    if t > lo:
        one_by_n = torch.ones(1, t + 1 - lo, dtype=torch.bool).tril()  # (1, n)
        if same(out, _attend(q_t, keys, values, one_by_n)):
            fail(
                f"your output {where} attends to the first cached key only: a causal mask "
                "was applied to a one-query step. `tril` of a (1, n) matrix keeps column "
                "0, but the one new query is the latest position and may attend to every "
                "cached key: use no mask (or one that is True everywhere)."
            )
        if same(out, _attend(q_t, k[:, :, t : t + 1], v[:, :, t : t + 1])):
            fail(
                f"your output {where} attends to the new position only: attend over "
                "everything in the cache after appending the new keys and values."
            )
        if same(out, _attend(q_t, k[:, :, lo:t], v[:, :, lo:t])):
            fail(
                f"your output {where} attends over the cache without the new position: "
                "append first, then attend (a position may attend to itself)."
            )
    if same(out, _attend(q_t, keys, values, scale=1.0)):
        fail(f"your output {where} is unscaled: divide the scores by sqrt(d_head).")
    fail(
        f"your output {where} differs from attention of the new query over the keys and "
        "values of every position so far."
    )


# ----------------------------------------------------------------------------- 8.1


@exercise("8.1", "One step of self-attention with a key/value cache")
def check_self_attention_step(self_attention_step):
    expect_callable(
        self_attention_step, "your step function", "check_self_attention_step(self_attention_step)"
    )
    generator = torch.Generator().manual_seed(8)
    for batch, heads, length, d_head in [(2, 3, 5, 4), (1, 1, 3, 8), (3, 2, 6, 5)]:
        q, k, v = _sequences(generator, batch, heads, length, d_head)
        expected = _attend(q, k, v, is_causal_mask(length))  # (B, h, L, d_head)
        cache: dict = {}
        for t in range(length):
            where = f"at step {t} (shape {(batch, heads, length, d_head)})"
            out = _step(self_attention_step, q, k, v, cache, t, "self_attention_step")
            _expect_appended(cache, k, t, where)
            out = expect_shape(out, (batch, heads, 1, d_head), f"your output {where}")
            if not same(out, expected[:, :, t : t + 1]):
                _diagnose_step(out, q, k, v, t, where)


def is_causal_mask(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)


# ----------------------------------------------------------------------------- 8.2


def _counter(module: torch.nn.Module):
    calls = {"n": 0}

    def hook(*_args):
        calls["n"] += 1

    return calls, module.register_forward_hook(hook)


@exercise("8.2", "Cross-attention that projects the memory once")
def check_cross_attention_step(cross_attention_step):
    expect_callable(
        cross_attention_step,
        "your step function",
        "check_cross_attention_step(cross_attention_step)",
    )
    generator = torch.Generator().manual_seed(82)
    for batch, d_model, heads, src_len, steps in [(2, 12, 3, 5, 4), (1, 8, 1, 1, 3)]:
        with torch.random.fork_rng():
            torch.manual_seed(82)
            mha = MultiHeadAttention(d_model, heads).eval()
        memory = torch.randn(batch, src_len, d_model, generator=generator)
        xs = torch.randn(batch, steps, d_model, generator=generator)
        with torch.no_grad():
            expected = mha(xs, memory, memory)  # (B, steps, d_model); rows independent
        keys, key_hook = _counter(mha.w_k)
        values, value_hook = _counter(mha.w_v)
        cache: dict = {}
        message = (
            "call the projections (mha.w_q, mha.w_k, mha.w_v, mha.w_o) yourself rather "
            "than mha(...) or the chapter's MultiHeadAttention methods: the point is to "
            "see where the memory's keys are made."
        )
        try:
            targets = [(mha, "forward"), *_chapter_attention()]
            with refused([cross_attention_step], targets, message), torch.no_grad():
                outs = []
                for t in range(steps):
                    out = call(
                        cross_attention_step,
                        mha,
                        xs[:, t : t + 1].clone(),
                        memory,
                        cache,
                        what="cross_attention_step",
                    )
                    where = f"at step {t} (batch {batch}, {heads} heads, {src_len} sources)"
                    outs.append(expect_shape(out, (batch, 1, d_model), f"your output {where}"))
        finally:
            key_hook.remove()
            value_hook.remove()
            del mha.forward  # refused() left the bound method on the instance
        got = torch.cat(outs, dim=1).detach()
        if keys["n"] > 1 or values["n"] > 1:
            fail(
                f"your step ran mha.w_k {keys['n']} and mha.w_v {values['n']} times over "
                f"{steps} steps: it recomputes the memory's keys and values at every step. "
                "The memory does not change while decoding: project it on the first step, "
                "keep the result in cache['k'] and cache['v'], and reuse it."
            )
        if keys["n"] == 0 or values["n"] == 0:
            fail(
                "your step never ran mha.w_k or mha.w_v: the memory's keys and values are "
                "its projections, split into heads (check the cache is empty at the start)."
            )
        if same(got, expected):
            continue
        _diagnose_cross(got, mha, xs, memory, heads, steps, src_len)


@torch.no_grad()
def _diagnose_cross(got, mha, xs, memory, heads, steps, src_len):
    """Name the mistake of a cross-attention step whose output is wrong."""
    q = _split(mha.w_q(xs), heads)  # (B, h, steps, d_head)
    k, v = _split(mha.w_k(memory), heads), _split(mha.w_v(memory), heads)
    first_only = torch.zeros(steps, src_len, dtype=torch.bool)
    first_only[:, 0] = True
    causal = torch.ones(steps, src_len, dtype=torch.bool).tril()  # row t sees 0 ... t
    for mask, text in [
        (first_only, "a causal mask was applied to a one-query step"),
        (causal, "a causal mask was applied to cross-attention"),
    ]:
        if src_len > 1 and same(got, mha.w_o(_merge(_attend(q, k, v, mask)))):
            fail(
                f"your output attends to too few source positions: {text}. The decoder "
                "may read every position of the memory: no mask here (only the "
                "source's padding mask, when there is padding)."
            )
    if same(got, _merge(_attend(q, k, v))):
        fail("your output skips the output projection mha.w_o.")
    fail(
        "your output differs from mha(x, memory, memory): queries from x, keys and "
        "values from the memory, split into heads, attended, merged and projected."
    )


def _split(x, heads):
    batch, length, d_model = x.shape
    return x.reshape(batch, length, heads, d_model // heads).transpose(1, 2)


def _merge(x):
    batch, heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * d_head)


# ----------------------------------------------------------------------------- 8.3


@exercise("8.3", "A sliding-window cache")
def check_sliding_window_step(sliding_window_step):
    expect_callable(
        sliding_window_step, "your step function", "check_sliding_window_step(sliding_window_step)"
    )
    generator = torch.Generator().manual_seed(83)
    for batch, heads, length, d_head, window in [
        (2, 2, 7, 4, 3),
        (1, 3, 5, 6, 1),
        (2, 1, 6, 4, 2),
        (1, 2, 4, 4, 6),  # a window longer than the sequence: plain causal attention
    ]:
        q, k, v = _sequences(generator, batch, heads, length, d_head)
        cache: dict = {}
        for t in range(length):
            where = f"at step {t} (window {window})"
            args = (q[:, :, t : t + 1].clone(), k[:, :, t : t + 1].clone())
            args += (v[:, :, t : t + 1].clone(), cache, window)
            out = call(sliding_window_step, *args, what="sliding_window_step")
            if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
                fail(f"after the step {where} the cache has no 'k' and 'v' entries.")
            held = expect_tensor(cache["k"], f"cache['k'] {where}")
            keep = min(t + 1, window)
            expected_keys = k[:, :, t + 1 - keep : t + 1]
            if held.dim() == 4 and held.shape[2] > keep:
                if held.shape[2] == t + 1 and t + 1 < length:
                    continue  # one too many, or never trimmed: the next step tells
                if held.shape[2] == keep + 1:
                    fail(
                        f"cache['k'] {where} holds {held.shape[2]} positions, one more than "
                        f"the window of {window}: trim after appending, keeping the last "
                        "W positions (`[:, :, -W:]`)."
                    )
                fail(
                    f"cache['k'] {where} holds {held.shape[2]} positions: it never drops "
                    f"the oldest ones, so its memory grows with L. Keep the last {window}."
                )
            if held.dim() == 4 and 0 < held.shape[2] < keep:
                fail(
                    f"cache['k'] {where} holds {held.shape[2]} positions, fewer than the "
                    f"{keep} the window allows: the window covers the new position and "
                    f"the {window - 1} before it."
                )
            expect_shape(held, expected_keys.shape, f"cache['k'] {where}")
            if t >= window and same(held, k[:, :, :window]):
                fail(
                    f"cache['k'] {where} holds the first {window} positions: it kept the "
                    "oldest ones and dropped the new. Keep the last W (`[:, :, -W:]`)."
                )
            if not same(held, expected_keys):
                fail(
                    f"cache['k'] {where} should hold the keys of positions "
                    f"{t + 1 - keep} ... {t}, in order."
                )
            out = expect_shape(out, (batch, heads, 1, d_head), f"your output {where}")
            reference = _attend(q[:, :, t : t + 1], expected_keys, v[:, :, t + 1 - keep : t + 1])
            if not same(out, reference):
                _diagnose_step(out, q, k, v, t, where, window=window)


# ----------------------------------------------------------------------------- 8.4


def _bytes_held(num_layers, batch, length, d_model, num_heads, num_kv_heads, dtype):
    """Build the caches for real and count their bytes."""
    d_head = d_model // num_heads
    shape = (batch, num_kv_heads, length, d_head)
    caches = [
        {"k": torch.empty(shape, dtype=dtype), "v": torch.empty(shape, dtype=dtype)}
        for _ in range(num_layers)
    ]
    return sum(t.numel() * t.element_size() for c in caches for t in c.values())


@exercise("8.4", "The size of a grouped-query cache")
def check_kv_cache_bytes(kv_cache_bytes):
    expect_callable(kv_cache_bytes, "your size function", "check_kv_cache_bytes(kv_cache_bytes)")
    cases = [
        (3, 1, 512, 128, 4, 4, torch.float32),  # plain multi-head attention
        (6, 16, 100, 96, 8, 2, torch.float32),  # grouped-query, 4 query heads per group
        (4, 3, 64, 64, 8, 1, torch.float16),  # multi-query, half precision
        (3, 2, 10, 40, 5, 5, torch.bfloat16),
    ]
    for case in cases:
        num_layers, batch, length, d_model, num_heads, num_kv_heads, dtype = case
        expected = _bytes_held(*case)
        got = call(kv_cache_bytes, *case, what="kv_cache_bytes")
        where = (
            f"for {num_layers} layers, batch {batch}, L {length}, d_model {d_model}, "
            f"{num_heads} heads, {num_kv_heads} key/value heads, {dtype}"
        )
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if not isinstance(got, int):
            fail(f"kv_cache_bytes should return an int (a number of bytes), got {got!r:.40}.")
        if got == expected:
            continue
        d_head = d_model // num_heads
        size = torch.tensor([], dtype=dtype).element_size()
        per_number = num_layers * batch * length * num_kv_heads * d_head
        mistakes = [
            (per_number * size, "half the bytes held: count keys and values, two tensors"),
            (
                2 * num_layers * batch * length * d_model * size,
                "as many key/value heads as query heads: with grouped-query attention "
                "the cache holds num_kv_heads heads of d_head = d_model // num_heads",
            ),
            (2 * per_number * size * 8, "bits, not bytes: multiply by element_size()"),
            (2 * per_number * 4, "4 bytes per number whatever the dtype: use its size"),
            (2 * per_number, "a count of numbers, not bytes: multiply by element_size()"),
            (2 * per_number * size // num_layers, "one layer only: every layer has a cache"),
        ]
        for wrong, text in mistakes:
            if got == wrong:
                fail(f"your size {where} is {got:,}, expected {expected:,}: {text}.")
        fail(
            f"your size {where} is {got:,}, expected {expected:,} (the bytes of the "
            "tensors held): layers x 2 x batch x L x num_kv_heads x d_head x bytes."
        )


# ----------------------------------------------------------------------------- 8.5


def _bottom_right(new: int, total: int) -> torch.Tensor:
    """(new, total): query i, at position total - new + i, sees keys 0 ... that position."""
    keys = torch.arange(total)
    queries = torch.arange(total - new, total)[:, None]
    return keys <= queries


@exercise("8.5", "Chunked prefill: several new queries after the cache")
def check_chunk_step(chunk_step):
    expect_callable(chunk_step, "your step function", "check_chunk_step(chunk_step)")
    message = (
        "write the chunk's attention yourself (F.scaled_dot_product_attention with your "
        "own mask is fine), not with the chapter's MultiHeadAttention: its mask is what "
        "this exercise is about."
    )
    generator = torch.Generator().manual_seed(85)
    for batch, heads, d_head, chunks in [
        (2, 3, 4, [3, 1, 2, 4]),
        (1, 2, 8, [1, 4, 3]),
        (3, 1, 5, [5, 2]),
    ]:
        length = sum(chunks)
        q, k, v = _sequences(generator, batch, heads, length, d_head)
        expected = _attend(q, k, v, is_causal_mask(length))  # (B, h, L, d_head)
        cache: dict = {}
        start = 0
        for n in chunks:
            end = start + n
            where = f"for the chunk of positions {start} ... {end - 1} (chunks {chunks})"
            args = [x[:, :, start:end].clone() for x in (q, k, v)]
            with refused([chunk_step], _chapter_attention(), message):
                out = call(chunk_step, *args, cache, what="chunk_step")
            if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
                fail(
                    f"after the step {where} the cache has no 'k' and 'v' entries: keep "
                    "the keys and values of every position so far in cache['k'] and "
                    "cache['v'], in order."
                )
            held = expect_tensor(cache["k"], f"cache['k'] {where}")
            if tuple(held.shape) != (batch, heads, end, d_head) or not same(
                held, k[:, :, :end]
            ):
                fail(
                    f"cache['k'] {where} should hold the keys of positions 0 ... "
                    f"{end - 1}, in order, shape {(batch, heads, end, d_head)}; got "
                    f"{tuple(held.shape)}: append the chunk along axis 2."
                )
            out = expect_shape(out, (batch, heads, n, d_head), f"your output {where}")
            if not same(out, expected[:, :, start:end]):
                _diagnose_chunk(out, q, k, v, start, end, where)
            start = end


def _diagnose_chunk(out, q, k, v, start, end, where):
    """Name the mistake of a chunk whose output is wrong."""
    n = end - start
    q_c, keys, values = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
    top_left = torch.ones(n, end, dtype=torch.bool).tril()  # is_causal=True's mask
    if start > 0 and same(out, _attend(q_c, keys, values, top_left)):
        fail(
            f"your output {where} uses a causal mask aligned to the top left "
            "(`is_causal=True`, or `tril` of an (n, L) matrix): query i then sees keys "
            "0 ... i, as if the chunk started at position 0. The chunk's queries are the "
            "last n positions: query i sees keys 0 ... start + i, a mask aligned to the "
            "bottom right."
        )
    if n > 1 and same(out, _attend(q_c, keys, values)):
        fail(
            f"your output {where} lets each query of the chunk see the later positions "
            "of the same chunk: with several new queries a mask is needed again (one "
            "query needs none)."
        )
    if start > 0 and same(out, _attend(q_c, k[:, :, start:end], v[:, :, start:end],
                                       torch.ones(n, n, dtype=torch.bool).tril())):
        fail(
            f"your output {where} attends within the chunk only: the cached positions "
            "0 ... start - 1 are in every new query's past; attend over the cache and "
            "the chunk together."
        )
    if same(out, _attend(q_c, keys, values, _bottom_right(n, end), scale=1.0)):
        fail(f"your output {where} is unscaled: divide the scores by sqrt(d_head).")
    fail(
        f"your output {where} differs from rows {start} ... {end - 1} of causal "
        "attention over the whole sequence."
    )


# ----------------------------------------------------------------------------- 8.6


def _grouped_reference(q, k, v):
    """Causal grouped-query attention: query head i reads key/value head i // (h / g)."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _attend(q, k, v, is_causal_mask(q.size(2)))


@exercise("8.6", "A grouped-query step with a smaller cache")
def check_grouped_query_step(grouped_query_step):
    expect_callable(
        grouped_query_step, "your step function", "check_grouped_query_step(grouped_query_step)"
    )
    message = (
        "write the grouped step yourself (F.scaled_dot_product_attention is fine), not "
        "with the chapter's MultiHeadAttention, which has as many key/value heads as "
        "query heads."
    )
    generator = torch.Generator().manual_seed(86)
    for batch, heads, kv_heads, length, d_head in [
        (2, 4, 2, 5, 3),
        (1, 6, 3, 4, 4),
        (2, 4, 1, 3, 2),  # multi-query
        (1, 2, 2, 3, 4),  # as many key/value heads as query heads
    ]:
        q = torch.randn(batch, heads, length, d_head, generator=generator)
        k = torch.randn(batch, kv_heads, length, d_head, generator=generator)
        v = torch.randn(batch, kv_heads, length, d_head, generator=generator)
        expected = _grouped_reference(q, k, v)  # (B, h, L, d_head)
        cache: dict = {}
        for t in range(length):
            where = f"at step {t} ({heads} query heads, {kv_heads} key/value heads)"
            args = [x[:, :, t : t + 1].clone() for x in (q, k, v)]
            with refused([grouped_query_step], _chapter_attention(), message):
                out = call(grouped_query_step, *args, cache, what="grouped_query_step")
            if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
                fail(f"after the step {where} the cache has no 'k' and 'v' entries.")
            held = expect_tensor(cache["k"], f"cache['k'] {where}")
            shape = (batch, kv_heads, t + 1, d_head)
            if tuple(held.shape) == (batch, heads, t + 1, d_head) and heads != kv_heads:
                fail(
                    f"cache['k'] {where} holds {heads} heads, one per query head: the "
                    "keys were repeated for the query heads before they were cached, so "
                    "the cache is as large as multi-head attention's. Cache the "
                    f"{kv_heads} key/value heads and repeat them only to attend."
                )
            if tuple(held.shape) != shape or not same(held, k[:, :, : t + 1]):
                fail(
                    f"cache['k'] {where} should hold the keys of positions 0 ... {t}, "
                    f"shape {shape}, in order; got {tuple(held.shape)}."
                )
            out = expect_shape(out, (batch, heads, 1, d_head), f"your output {where}")
            if same(out, expected[:, :, t : t + 1]):
                continue
            group = heads // kv_heads
            tiled = _attend(q[:, :, t : t + 1], k[:, :, : t + 1].repeat(1, group, 1, 1),
                            v[:, :, : t + 1].repeat(1, group, 1, 1))
            if group > 1 and kv_heads > 1 and same(out, tiled):
                fail(
                    f"your output {where} pairs query head i with key/value head "
                    f"i % {kv_heads} (`repeat`, which tiles the heads): the query heads "
                    f"of a group are neighbours, head i reads key/value head i // "
                    f"{group} (`repeat_interleave(..., dim=1)`)."
                )
            fail(
                f"your output {where} differs from attention of each query head over "
                "its group's cached keys and values."
            )
