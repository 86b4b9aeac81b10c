"""Checks for the exercises of chapter 8, Fast decoding.

Per-head tensors have the shape ``(batch, heads, L, d_head)``; a decoding step brings
one new position (``L = 1``) or a chunk of them. A cache is a dict holding ``"k"`` and
``"v"``. Each check is its cases, a reference and tables of mistakes, each a wrong step
with the student's signature: the check replays it over the same steps and names the
mistake whose cache or output the student's equals.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from transformer_book.multihead import MultiHeadAttention, merge_heads, split_heads

from ._core import (
    Caught,
    CheckFailure,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_shape,
    expect_tensor,
    fail,
    name_mistake,
    refused,
    same,
)


def _chapter_attention() -> list[tuple[object, str]]:
    """(owner, attribute) of the methods the chapter added to MultiHeadAttention, and its
    forward: an exercise that asks for what they do refuses a call of them."""
    return [(MultiHeadAttention, name) for name in ("forward", "_keys_values", "_fused")]


def _attend(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _bottom_right(new: int, total: int) -> torch.Tensor:
    """(new, total): query i, at position total - new + i, sees keys 0 ... that position."""
    return torch.arange(total) <= torch.arange(total - new, total)[:, None]


def _step_variant(query, key, value, cache, window=None, *, axis=2, prepend=False,
                  replace=False, keep="last", extra=0, mask="bottom right", scale=None,
                  keep_new=True, spread="interleave"):
    """A decoding step with one option per mistake (the defaults give the right answer).

    It appends the new keys and values to the cache along the positions (keeping the last
    ``window`` when one is given) and attends over it with a mask aligned to the bottom
    right; with fewer key/value heads than query heads, each group of neighbouring query
    heads reads one key/value head.
    """
    group = query.size(1) // key.size(1)
    if spread == "before cache":  # the cache then holds one head per query head
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    new_k, new_v = key, value
    if "k" in cache and not replace:
        pairs = [(cache["k"], key), (cache["v"], value)]
        key, value = (torch.cat(p[::-1] if prepend else p, dim=axis) for p in pairs)
    if window is not None and keep != "all":
        n = max(window + extra, 1)
        key, value = (x[:, :, :n] if keep == "first" else x[:, :, -n:] for x in (key, value))
    cache["k"], cache["v"] = key, value
    if not keep_new and key.size(2) > 1:  # attends before appending
        key, value = key[:, :, :-1], value[:, :, :-1]
    if mask == "new only":
        key, value = new_k, new_v
    if spread != "before cache" and group > 1:
        key, value = (x.repeat(1, group, 1, 1) if spread == "tile"
                      else x.repeat_interleave(group, dim=1) for x in (key, value))
    n, total = query.size(2), key.size(2)
    top_left = torch.ones(n, total, dtype=torch.bool).tril()  # is_causal=True's mask
    masks = {"bottom right": _bottom_right(n, total), "top left": top_left, "none": None}
    return _attend(query, key, value, masks.get(mask, _bottom_right(n, total)), scale=scale)


# ----------------------------------------------------------------------- decoding steps


@dataclasses.dataclass
class _Step:
    """Step ``index`` of a decoding case: the chunk of positions ``bounds[index]``."""

    q: torch.Tensor  # (B, h, L, d_head)
    k: torch.Tensor  # (B, h_kv, L, d_head)
    v: torch.Tensor
    bounds: list  # (start, end) of every step
    index: int
    extra: tuple = ()  # arguments after the cache (the window)
    where: str = ""
    held: torch.Tensor | None = None  # the student's cache['k'] after this step

    @property
    def start(self) -> int:
        return self.bounds[self.index][0]

    @property
    def end(self) -> int:
        return self.bounds[self.index][1]

    @property
    def last(self) -> int:
        return self.end - 1

    @property
    def lo(self) -> int:
        """The first position this step attends to (the window's start)."""
        return 0 if not self.extra else max(0, self.end - self.extra[0])

    def inputs(self, start: int, end: int) -> list[torch.Tensor]:
        return [x[:, :, start:end].clone() for x in (self.q, self.k, self.v)]

    def grown(self, axis) -> tuple:
        """The cache's shape had every step been appended along ``axis`` (None: replaced)."""
        shape = [*self.k.shape[:2], 1, self.k.shape[-1]]
        if axis is not None:
            shape[axis] *= self.end
        return tuple(shape)


def _replay(step_fn, s: _Step):
    """(output, cache) of ``step_fn`` run over the steps up to ``s``, from an empty cache."""
    cache: dict = {}
    for start, end in s.bounds[: s.index + 1]:
        out = step_fn(*s.inputs(start, end), cache, *s.extra)
    return out, cache


def _name(actual, table, s: _Step, cached: bool = False) -> None:
    """Name the mistake of ``table`` whose output (or cache['k']) ``actual`` equals."""
    pick = (lambda r: r[1].get("k")) if cached else (lambda r: r[0])
    name_mistake(actual, table, s, run=lambda wrong: _replay(wrong, s), pick=pick)


def _steps(step_fn, what, q, k, v, bounds, where, extra=(), refuse=None, on_crash=None,
           missing="."):
    """Run the student's step over the chunks; yield each step (its ``held`` set) and output."""
    cache: dict = {}
    for index, (start, end) in enumerate(bounds):
        s = _Step(q, k, v, bounds, index, extra)
        s.where = where.format(s=s)
        try:
            with refused([step_fn], _chapter_attention(), refuse) if refuse else nullcontext():
                out = call(step_fn, *s.inputs(start, end), cache, *extra, what=what)
        except CheckFailure:
            if on_crash is not None and isinstance(cache, dict) and "k" in cache:
                on_crash(s, cache)  # a wrong cache explains the crash
            raise
        if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
            fail(f"after the step {s.where} the cache has no 'k' and 'v' entries{missing}")
        s.held = expect_tensor(cache["k"], f"cache['k'] {s.where}")
        yield s, out


_STEP_OUTPUT = [  # a one-query step (with or without a window) whose output is wrong
    Mistake(lambda s: f"your output {s.where} attends to the cached key only, not to the new "
            "one. Either a causal mask was applied to a one-query step (`tril` of a (1, n) "
            "matrix keeps column 0 only; the new query is the latest position and may attend "
            "to every cached key), or you attended over the cache before adding the new "
            "position: append first, then attend.", partial(_step_variant, mask="top left"),
            when=lambda s: s.last == s.lo + 1,
            expect="a causal mask was applied to a one-query step"),
    Mistake(lambda s: f"your output {s.where} attends to the first cached key only: a causal "
            "mask was applied to a one-query step. `tril` of a (1, n) matrix keeps column 0, "
            "but the one new query is the latest position and may attend to every cached key: "
            "use no mask (or one that is True everywhere).",
            partial(_step_variant, mask="top left"), when=lambda s: s.last > s.lo,
            expect="a causal mask was applied to a one-query step"),
    Mistake(lambda s: f"your output {s.where} attends to the new position only: attend over "
            "everything in the cache after appending the new keys and values.",
            partial(_step_variant, mask="new only"), when=lambda s: s.last > s.lo,
            expect="new position only"),
    Mistake(lambda s: f"your output {s.where} attends over the cache without the new position: "
            "append first, then attend (a position may attend to itself).",
            partial(_step_variant, keep_new=False), when=lambda s: s.last > s.lo,
            expect="append first, then attend"),
    Mistake(lambda s: f"your output {s.where} is unscaled: divide the scores by sqrt(d_head).",
            partial(_step_variant, scale=1.0), expect="unscaled"),
]


def _check_output(out, s: _Step, expected, table, general: str) -> None:
    """The output of step ``s`` has its shape and equals ``expected``, or names a mistake."""
    expect_shape(out, expected.shape, f"your output {s.where}")
    if not same(out, expected):
        _name(out, table, s)
        fail(f"your output {s.where} differs from {general}.")


# ----------------------------------------------------------------------------- 8.1


def _shape_mistake(message, axis):
    """The cache's shape says the new keys were appended along ``axis`` (None: replaced)."""
    return Mistake(message, partial(_step_variant, axis=axis, replace=axis is None),
                   symptom=lambda held, s: s.index > 0 and tuple(held.shape) == s.grown(axis),
                   expect=(r"appended along the .* \(dim=" if axis is not None
                           else "replaced the cached ones"))


_AXES = {0: "batch axis (dim=0)", 1: "heads axis (dim=1)", 3: "feature axis (dim=-1)"}
_APPENDED = [  # cache['k'] after a step, when it is not the keys of positions 0 ... t
    Mistake(lambda s: f"cache['k'] {s.where} holds the positions in the wrong order: the new "
            "one was put first (`torch.cat([key, cache['k']], dim=2)`?). Keep position order, "
            "so that cache['k'][:, :, p] is position p: a sliding window or a position bias "
            "depends on it.", partial(_step_variant, prepend=True), when=lambda s: s.index > 0,
            expect="the new one was put first"),
    _shape_mistake(lambda s: f"cache['k'] {s.where} holds only the newest position: the new "
                   "keys replaced the cached ones instead of being appended, "
                   "`torch.cat([cache['k'], key], dim=2)`.", None),
    *[_shape_mistake(lambda s, a=axis: f"cache['k'] {s.where} has shape {s.grown(a)}: the new "
                     f"position was appended along the {_AXES[a]}. Positions are axis 2 of "
                     "(batch, heads, L, d_head): `torch.cat([cache['k'], key], dim=2)`.", axis)
      for axis in _AXES],
]


def _expect_appended(s: _Step, cache=None) -> None:
    """The cache after step s holds the keys of positions 0 ... t along axis 2, in order."""
    held = s.held if cache is None else expect_tensor(cache["k"], f"cache['k'] {s.where}")
    expected = s.k[:, :, : s.end]
    if not same(held, expected):
        _name(held, _APPENDED, s, cached=True)
        if tuple(held.shape) == tuple(expected.shape):
            fail(f"cache['k'] {s.where} does not hold the keys of positions 0 ... {s.last} "
                 "that the steps were given: store the keys themselves, not a copy changed in "
                 "place or scaled.")
        fail(f"cache['k'] {s.where} has shape {tuple(held.shape)}, expected "
             f"{tuple(expected.shape)}.")


def _one_at_a_time(length: int) -> list[tuple[int, int]]:
    return [(t, t + 1) for t in range(length)]


@exercise("8.1", "One step of self-attention with a key/value cache", mistakes={
    "self_attention_step": _APPENDED + _STEP_OUTPUT + [
        Caught(lambda q, k, v, cache: _attend(q, k, v), "cache has no 'k' and 'v' entries")],
})
def check_self_attention_step(self_attention_step):
    expect_callable(
        self_attention_step, "your step function", "check_self_attention_step(self_attention_step)"
    )
    generator = torch.Generator().manual_seed(8)
    for batch, heads, length, d_head in [(2, 3, 5, 4), (1, 1, 3, 8), (3, 2, 6, 5)]:
        q, k, v = (torch.randn(batch, heads, length, d_head, generator=generator) for _ in "qkv")
        expected = _attend(q, k, v, _bottom_right(length, length))  # (B, h, L, d_head)
        where = f"(shape {(batch, heads, length, d_head)})"
        for s, out in _steps(self_attention_step, "self_attention_step", q, k, v,
                             _one_at_a_time(length), "at step {s.index} " + where,
                             on_crash=lambda s, cache: _expect_appended(
                                 dataclasses.replace(s, where=f"at step {s.index}"), cache),
                             missing=": store the keys and values you attend over in cache['k'] "
                             "and cache['v'] (the same dict, updated in place), so that the "
                             "next step can use them."):
            _expect_appended(s)
            _check_output(out, s, expected[:, :, s.start : s.end], _STEP_OUTPUT, "attention "
                          "of the new query over the keys and values of every position so far")


# ----------------------------------------------------------------------------- 8.2


def _cross_variant(mha, x, memory, cache, *, recompute=False, mask=None, project_out=True,
                   call_module=False, call_class=False, names="kv", split=True):
    """cross_attention_step with one option per mistake (the defaults give the right answer)."""
    if call_module:
        return mha(x, memory, memory)
    if call_class:  # the chapter's own module, reached through the class
        cache["static"] = True
        return type(mha).forward(mha, x, memory, memory, cache=cache)
    keep = (lambda t: split_heads(t, mha.num_heads)) if split else (lambda t: t)
    if recompute or names[0] not in cache:
        cache[names[0]], cache[names[1]] = keep(mha.w_k(memory)), keep(mha.w_v(memory))
    cache["t"] = cache.get("t", -1) + 1
    q = split_heads(mha.w_q(x), mha.num_heads)
    k, v = (t if split else split_heads(t, mha.num_heads) for t in (cache[n] for n in names))
    masks = {"one query": torch.ones(1, k.size(2), dtype=torch.bool).tril(),  # source 0 only
             "causal": (torch.arange(k.size(2)) <= cache["t"])[None, :]}  # sources 0 ... t
    heads = merge_heads(_attend(q, k, v, masks.get(mask)))
    return mha.w_o(heads) if project_out else heads


def _cross_replay(step_fn, mha, xs, memory):
    cache: dict = {}
    return torch.cat([step_fn(mha, xs[:, t : t + 1], memory, cache)
                      for t in range(xs.size(1))], dim=1)


_TOO_FEW = ("your output attends to too few source positions: {}. The decoder may read every "
            "position of the memory: no mask here (only the source's padding mask, when there "
            "is padding).")
_CROSS = [
    Mistake(_TOO_FEW.format("a causal mask was applied to a one-query step"),
            partial(_cross_variant, mask="one query"), when=lambda src_len: src_len > 1),
    Mistake(_TOO_FEW.format("a causal mask was applied to cross-attention"),
            partial(_cross_variant, mask="causal"), when=lambda src_len: src_len > 1),
    Mistake("your output skips the output projection mha.w_o.",
            partial(_cross_variant, project_out=False)),
]
_CROSS_CAUGHT = [
    Caught(partial(_cross_variant, recompute=True), "recomputes the memory's keys"),
    Caught(partial(_cross_variant, call_module=True), r"rather than mha\(\.\.\.\)"),
    Caught(partial(_cross_variant, call_class=True), "the chapter's MultiHeadAttention methods"),
    Caught(partial(_cross_variant, names=("keys", "values")), "cache has no 'k' and 'v' entries"),
    Caught(partial(_cross_variant, split=False), r"split into heads, \(batch, heads"),
]
_CROSS_REFUSED = (
    "call the projections (mha.w_q, mha.w_k, mha.w_v, mha.w_o) yourself rather than mha(...) "
    "or the chapter's MultiHeadAttention methods: the point is to see where the memory's keys "
    "are made."
)


def _counted_steps(step_fn, mha, xs, memory):
    """The student's outputs over the steps, how often they ran mha.w_k and mha.w_v, and the
    cache they left."""
    calls = {"k": 0, "v": 0}
    hooks = [getattr(mha, f"w_{n}").register_forward_hook(
        lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)) for n in "kv"]
    cache: dict = {}
    outs = []
    try:
        targets = [(mha, "forward"), *_chapter_attention()]
        with refused([step_fn], targets, _CROSS_REFUSED), torch.no_grad():
            for t in range(xs.size(1)):
                out = call(step_fn, mha, xs[:, t : t + 1].clone(), memory, cache,
                           what="cross_attention_step")
                where = (f"at step {t} (batch {xs.size(0)}, {mha.num_heads} heads, "
                         f"{memory.size(1)} sources)")
                outs.append(expect_shape(out, xs[:, :1].shape, f"your output {where}"))
    finally:
        for hook in hooks:
            hook.remove()
        del mha.forward  # refused() left the bound method on the instance
    return torch.cat(outs, dim=1).detach(), calls, cache


def _expect_memory_cache(cache, mha, memory) -> None:
    """After the steps the cache holds the memory's keys and values, split into heads."""
    if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
        fail("after the steps the cache has no 'k' and 'v' entries: keep the memory's keys and "
             "values, projected on the first step, in cache['k'] and cache['v'] (the same "
             "dict, updated in place).")
    for name, w in (("k", mha.w_k), ("v", mha.w_v)):
        held = expect_tensor(cache[name], f"cache['{name}'] after the steps")
        with torch.no_grad():
            expected = split_heads(w(memory), mha.num_heads)  # (B, h, L_src, d_head)
        if tuple(held.shape) == tuple(memory.shape) != tuple(expected.shape):
            fail(f"cache['{name}'] has shape {tuple(held.shape)}, the memory's projection "
                 "before the heads: keep it split into heads, (batch, heads, L_src, d_head) = "
                 f"{tuple(expected.shape)}, as split_heads returns it.")
        if not same(held, expected):
            fail(f"cache['{name}'] after the steps does not hold the memory's projection "
                 f"split into heads, split_heads(mha.w_{name}(memory), mha.num_heads), shape "
                 f"{tuple(expected.shape)}.")


@exercise("8.2", "Cross-attention that projects the memory once",
          mistakes={"cross_attention_step": _CROSS + _CROSS_CAUGHT})
def check_cross_attention_step(cross_attention_step):
    expect_callable(cross_attention_step, "your step function",
                    "check_cross_attention_step(cross_attention_step)")
    generator = torch.Generator().manual_seed(82)
    for batch, d_model, heads, src_len, steps in [(2, 12, 3, 5, 4), (1, 8, 1, 1, 3)]:
        with torch.random.fork_rng():
            torch.manual_seed(82)
            mha = MultiHeadAttention(d_model, heads).eval()
        memory = torch.randn(batch, src_len, d_model, generator=generator)
        xs = torch.randn(batch, steps, d_model, generator=generator)
        with torch.no_grad():
            expected = mha(xs, memory, memory)  # (B, steps, d_model); rows independent
        got, calls, cache = _counted_steps(cross_attention_step, mha, xs, memory)
        if calls["k"] > 1 or calls["v"] > 1:
            fail(f"your step ran mha.w_k {calls['k']} and mha.w_v {calls['v']} times over "
                 f"{steps} steps: it recomputes the memory's keys and values at every step. "
                 "The memory does not change while decoding: project it on the first step, "
                 "keep the result in cache['k'] and cache['v'], and reuse it.")
        _expect_memory_cache(cache, mha, memory)
        if same(got, expected):
            continue  # (the memory may be projected with F.linear and the same weights)
        if calls["k"] == 0 or calls["v"] == 0:
            fail("your step never ran mha.w_k or mha.w_v: the memory's keys and values are "
                 "its projections, split into heads (check the cache is empty at the start).")
        with torch.no_grad():
            name_mistake(got, _CROSS, src_len,
                         run=partial(_cross_replay, mha=mha, xs=xs, memory=memory))
        fail("your output differs from mha(x, memory, memory): queries from x, keys and "
             "values from the memory, split into heads, attended, merged and projected.")


# ----------------------------------------------------------------------------- 8.3


def _held_size(mistake: Mistake, test) -> Mistake:
    """``mistake`` seen in the number of positions the cache holds (``test(n, keep)``)."""
    return dataclasses.replace(mistake, symptom=lambda held, s: held.dim() == 4 and test(
        held.shape[2], min(s.end, s.extra[0])))


_WINDOW_SIZES = [  # by the number of positions cache['k'] holds, in this order
    _held_size(Mistake(lambda s: f"cache['k'] {s.where} holds {s.held.shape[2]} positions, one "
                       f"more than the window of {s.extra[0]}: trim after appending, keeping "
                       "the last W positions (`[:, :, -W:]`).", partial(_step_variant, extra=1),
                       expect="one more than the window"), lambda n, keep: n == keep + 1),
    _held_size(Mistake(lambda s: f"cache['k'] {s.where} holds {s.held.shape[2]} positions: it "
                       "never drops the oldest ones, so its memory grows with L. Keep the last "
                       f"{s.extra[0]}.", partial(_step_variant, keep="all"),
                       expect="never drops the oldest ones"), lambda n, keep: n > keep),
    _held_size(Mistake(lambda s: f"cache['k'] {s.where} holds {s.held.shape[2]} positions, "
                       f"fewer than the {min(s.end, s.extra[0])} the window allows: the window "
                       f"covers the new position and the {s.extra[0] - 1} before it.",
                       partial(_step_variant, extra=-1), expect="fewer than the"),
               lambda n, keep: 0 < n < keep),
]
_WINDOW_CONTENT = [
    Mistake(lambda s: f"cache['k'] {s.where} holds the first {s.extra[0]} positions: it kept "
            "the oldest ones and dropped the new. Keep the last W (`[:, :, -W:]`).",
            partial(_step_variant, keep="first"), when=lambda s: s.index >= s.extra[0],
            expect="kept the oldest ones and dropped the new"),
]


@exercise("8.3", "A sliding-window cache",
          mistakes={"sliding_window_step": _WINDOW_SIZES + _WINDOW_CONTENT + _STEP_OUTPUT})
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
        q, k, v = (torch.randn(batch, heads, length, d_head, generator=generator) for _ in "qkv")
        for s, out in _steps(sliding_window_step, "sliding_window_step", q, k, v,
                             _one_at_a_time(length), f"at step {{s.index}} (window {window})",
                             extra=(window,)):
            n, keep = s.held.shape[2] if s.held.dim() == 4 else 0, min(s.end, window)
            if n == s.end > keep and s.end < length:
                continue  # one too many, or never trimmed: the next step tells
            name_mistake(s.held, _WINDOW_SIZES, s)
            expected_keys = k[:, :, s.end - keep : s.end]
            expect_shape(s.held, expected_keys.shape, f"cache['k'] {s.where}")
            if not same(s.held, expected_keys):
                _name(s.held, _WINDOW_CONTENT, s, cached=True)
                fail(f"cache['k'] {s.where} should hold the keys of positions "
                     f"{s.end - keep} ... {s.last}, in order.")
            reference = _attend(q[:, :, s.start : s.end], expected_keys,
                                v[:, :, s.end - keep : s.end])
            _check_output(out, s, reference, _STEP_OUTPUT, "attention of the new query over "
                          "the keys and values of every position so far")


# ----------------------------------------------------------------------------- 8.4


def _bytes_held(num_layers, batch, length, d_model, num_heads, num_kv_heads, dtype):
    """Build the caches for real and count their bytes."""
    shape = (batch, num_kv_heads, length, d_model // num_heads)
    caches = [{"k": torch.empty(shape, dtype=dtype), "v": torch.empty(shape, dtype=dtype)}
              for _ in range(num_layers)]
    return sum(t.numel() * t.element_size() for c in caches for t in c.values())


def _size_variant(num_layers, batch, length, d_model, num_heads, num_kv_heads, dtype, *,
                  factor=2, heads="kv", size=None, layers=True, bits=False):
    """kv_cache_bytes with one option per mistake (the defaults give the right answer)."""
    width = (num_kv_heads if heads == "kv" else num_heads) * (d_model // num_heads)
    per = torch.tensor([], dtype=dtype).element_size() if size is None else size
    total = factor * batch * length * width * per * (num_layers if layers else 1)
    return total * 8 if bits else total


_SIZES = [
    Mistake("half the bytes held: count keys and values, two tensors.",
            partial(_size_variant, factor=1)),
    Mistake("as many key/value heads as query heads: with grouped-query attention the cache "
            "holds num_kv_heads heads of d_head = d_model // num_heads.",
            partial(_size_variant, heads="q")),
    Mistake("bits, not bytes: multiply by element_size().", partial(_size_variant, bits=True)),
    Mistake("4 bytes per number whatever the dtype: use its size.",
            partial(_size_variant, size=4)),
    Mistake("a count of numbers, not bytes: multiply by element_size().",
            partial(_size_variant, size=1)),
    Mistake("one layer only: every layer has a cache.", partial(_size_variant, layers=False)),
]


@exercise("8.4", "The size of a grouped-query cache", mistakes={
    "kv_cache_bytes": _SIZES + [Caught(lambda *case: "a lot", "should return an int")]})
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
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if not isinstance(got, int):
            fail(f"kv_cache_bytes should return an int (a number of bytes), got {got!r:.40}.")
        if got == expected:
            continue
        where = (f"for {num_layers} layers, batch {batch}, L {length}, d_model {d_model}, "
                 f"{num_heads} heads, {num_kv_heads} key/value heads, {dtype}")
        found = f"your size {where} is {got:,}, expected {expected:,}"
        name_mistake(got, _SIZES, *case, atol=0, rtol=0, prefix=found + ": ")
        fail(f"{found} (the bytes of the tensors held): layers x 2 x batch x L x num_kv_heads "
             "x d_head x bytes.")


# ----------------------------------------------------------------------------- 8.5

_CHUNK = [
    Mistake(lambda s: f"your output {s.where} uses a causal mask aligned to the top left "
            "(`is_causal=True`, or `tril` of an (n, L) matrix): query i then sees keys 0 ... i, "
            "as if the chunk started at position 0. The chunk's queries are the last n "
            "positions: query i sees keys 0 ... start + i, a mask aligned to the bottom right.",
            partial(_step_variant, mask="top left"), when=lambda s: s.start > 0,
            expect="aligned to the top left"),
    Mistake(lambda s: f"your output {s.where} lets each query of the chunk see the later "
            "positions of the same chunk: with several new queries a mask is needed again (one "
            "query needs none).", partial(_step_variant, mask="none"),
            when=lambda s: s.end - s.start > 1, expect="later positions of the same chunk"),
    Mistake(lambda s: f"your output {s.where} attends within the chunk only: the cached "
            "positions 0 ... start - 1 are in every new query's past; attend over the cache "
            "and the chunk together.", partial(_step_variant, mask="new only"),
            when=lambda s: s.start > 0, expect="attends within the chunk only"),
    _STEP_OUTPUT[-1],  # unscaled
]
_CHUNK_REFUSED = (
    "write the chunk's attention yourself (F.scaled_dot_product_attention with your own mask is "
    "fine), not with the chapter's MultiHeadAttention: its mask is what this exercise is about."
)


def _calls_the_chapter(*args):
    """A chunk step that calls the chapter's MultiHeadAttention (refused)."""
    MultiHeadAttention._keys_values(None, args[1], args[2], {"static": True, "k": args[1]})
    return _step_variant(*args)


@exercise("8.5", "Chunked prefill: several new queries after the cache", mistakes={
    "chunk_step": _CHUNK + [
        Caught(_calls_the_chapter, "not with the chapter's"),
        Caught(partial(_step_variant, replace=True, mask="top left"),
               "append the chunk along axis 2")],
})
def check_chunk_step(chunk_step):
    expect_callable(chunk_step, "your step function", "check_chunk_step(chunk_step)")
    generator = torch.Generator().manual_seed(85)
    for batch, heads, d_head, chunks in [
        (2, 3, 4, [3, 1, 2, 4]),
        (1, 2, 8, [1, 4, 3]),
        (3, 1, 5, [5, 2]),
    ]:
        length = sum(chunks)
        q, k, v = (torch.randn(batch, heads, length, d_head, generator=generator) for _ in "qkv")
        expected = _attend(q, k, v, _bottom_right(length, length))  # (B, h, L, d_head)
        ends = torch.tensor(chunks).cumsum(0).tolist()
        bounds = list(zip([0, *ends[:-1]], ends))
        for s, out in _steps(chunk_step, "chunk_step", q, k, v, bounds, "for the chunk of "
                             f"positions {{s.start}} ... {{s.last}} (chunks {chunks})",
                             refuse=_CHUNK_REFUSED, missing=": keep the keys and values of "
                             "every position so far in cache['k'] and cache['v'], in order."):
            shape = (batch, heads, s.end, d_head)
            if tuple(s.held.shape) != shape or not same(s.held, k[:, :, : s.end]):
                fail(f"cache['k'] {s.where} should hold the keys of positions 0 ... "
                     f"{s.last}, in order, shape {shape}; got {tuple(s.held.shape)}: append "
                     "the chunk along axis 2.")
            _check_output(out, s, expected[:, :, s.start : s.end], _CHUNK, f"rows {s.start} "
                          f"... {s.last} of causal attention over the whole sequence")


# ----------------------------------------------------------------------------- 8.6

_GROUPED_CACHE = [
    Mistake(lambda s: f"cache['k'] {s.where} holds {s.q.size(1)} heads, one per query head: "
            "the keys were repeated for the query heads before they were cached, so the cache "
            "is as large as multi-head attention's. Cache the "
            f"{s.k.size(1)} key/value heads and repeat them only to attend.",
            partial(_step_variant, spread="before cache"),
            symptom=lambda held, s: s.q.size(1) != s.k.size(1) and tuple(held.shape) == (
                *s.q.shape[:2], s.end, s.q.size(3)), expect="before they were cached"),
]
_GROUPED = [
    Mistake(lambda s: f"your output {s.where} pairs query head i with key/value head "
            f"i % {s.k.size(1)} (`repeat`, which tiles the heads): the query heads of a group "
            f"are neighbours, head i reads key/value head i // {s.q.size(1) // s.k.size(1)} "
            "(`repeat_interleave(..., dim=1)`).", partial(_step_variant, spread="tile"),
            when=lambda s: s.q.size(1) // s.k.size(1) > 1 and s.k.size(1) > 1,
            expect="repeat_interleave"),
]
_GROUPED_REFUSED = (
    "write the grouped step yourself (F.scaled_dot_product_attention is fine), not with the "
    "chapter's MultiHeadAttention, which has as many key/value heads as query heads."
)


def _forwards_to_the_chapter(*args):
    """A grouped step that calls the chapter's MultiHeadAttention (refused)."""
    MultiHeadAttention.forward(None, *args[:3])
    return _step_variant(*args)


@exercise("8.6", "A grouped-query step with a smaller cache", mistakes={
    "grouped_query_step": _GROUPED_CACHE + _GROUPED + [
        Caught(_forwards_to_the_chapter, "not with the chapter's")],
})
def check_grouped_query_step(grouped_query_step):
    expect_callable(
        grouped_query_step, "your step function", "check_grouped_query_step(grouped_query_step)"
    )
    generator = torch.Generator().manual_seed(86)
    for batch, heads, kv_heads, length, d_head in [
        (2, 4, 2, 5, 3),
        (1, 6, 3, 4, 4),
        (2, 4, 1, 3, 2),  # multi-query
        (1, 2, 2, 3, 4),  # as many key/value heads as query heads
    ]:
        q = torch.randn(batch, heads, length, d_head, generator=generator)
        k, v = (torch.randn(batch, kv_heads, length, d_head, generator=generator) for _ in "kv")
        causal = _bottom_right(length, length)  # query head i reads key/value head i // group
        expected = _attend(q, *(x.repeat_interleave(heads // kv_heads, 1) for x in (k, v)), causal)
        for s, out in _steps(grouped_query_step, "grouped_query_step", q, k, v,
                             _one_at_a_time(length), f"at step {{s.index}} ({heads} query "
                             f"heads, {kv_heads} key/value heads)", refuse=_GROUPED_REFUSED):
            shape = (batch, kv_heads, s.end, d_head)
            if tuple(s.held.shape) != shape or not same(s.held, k[:, :, : s.end]):
                name_mistake(s.held, _GROUPED_CACHE, s)
                fail(f"cache['k'] {s.where} should hold the keys of positions 0 ... "
                     f"{s.last}, shape {shape}, in order; got {tuple(s.held.shape)}.")
            _check_output(out, s, expected[:, :, s.start : s.end], _GROUPED, "attention of "
                          "each query head over its group's cached keys and values")
