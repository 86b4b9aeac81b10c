"""Checks for the exercises of chapter 8, Fast decoding.

Per-head tensors have the shape ``(batch, heads, L, d_head)``; a decoding step brings
one new position (``L = 1``) or a chunk of them. A cache is a dict holding ``"k"`` and
``"v"``. Each check is its cases, a reference and tables of mistakes, each a wrong step
with the student's signature: the check replays it over the same steps and names the
mistake whose cache or output the student's equals.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from transformer_book.multihead import MultiHeadAttention, merge_heads, split_heads

from ._core import (
    Caught,
    Hint,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_shape,
    expect_tensor,
    expect_unchanged,
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


def _step_variant(query, key, value, cache, *, replace=False, mask="bottom right", scale=None,
                  spread="interleave"):
    """A decoding step with one option per mistake (the defaults give the right answer).

    It appends the new keys and values to the cache along the positions and attends over
    it with a mask aligned to the bottom right; with fewer key/value heads than query
    heads, each group of neighbouring query heads reads one key/value head.
    """
    group = query.size(1) // key.size(1)
    if spread == "before cache":  # the cache then holds one head per query head
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    new_k, new_v = key, value
    if "k" in cache and not replace:
        key = torch.cat([cache["k"], key], dim=2)
        value = torch.cat([cache["v"], value], dim=2)
    cache["k"], cache["v"] = key, value
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

    def inputs(self, start: int, end: int) -> list[torch.Tensor]:
        return [x[:, :, start:end].clone() for x in (self.q, self.k, self.v)]


def _replay(step_fn, s: _Step):
    """(output, cache) of ``step_fn`` run over the steps up to ``s``, from an empty cache."""
    cache: dict = {}
    for start, end in s.bounds[: s.index + 1]:
        out = step_fn(*s.inputs(start, end), cache)
    return out, cache


def _name(actual, table, s: _Step) -> None:
    """Name the mistake of ``table`` whose output ``actual`` equals."""
    name_mistake(actual, table, s, run=lambda wrong: _replay(wrong, s), pick=lambda r: r[0])


def _steps(step_fn, what, q, k, v, bounds, where, refuse=None, missing="."):
    """Run the student's step over the chunks; yield each step (its ``held`` set) and output."""
    cache: dict = {}
    for index, (start, end) in enumerate(bounds):
        s = _Step(q, k, v, bounds, index)
        s.where = where.format(s=s)
        with refused([step_fn], _chapter_attention(), refuse) if refuse else nullcontext():
            out = call(step_fn, *s.inputs(start, end), cache, what=what)
        if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
            fail(f"after the step {s.where} the cache has no 'k' and 'v' entries{missing}")
        s.held = expect_tensor(cache["k"], f"cache['k'] {s.where}")
        yield s, out


_UNSCALED = Mistake(lambda s: f"your output {s.where} is unscaled: divide the scores by "
                    "sqrt(d_head).", partial(_step_variant, scale=1.0), expect="unscaled")


def _one_at_a_time(length: int) -> list[tuple[int, int]]:
    return [(t, t + 1) for t in range(length)]


def _check_output(out, s: _Step, expected, table, general: str) -> None:
    """The output of step ``s`` has its shape and equals ``expected``, or names a mistake."""
    expect_shape(out, expected.shape, f"your output {s.where}")
    if not same(out, expected):
        _name(out, table, s)
        fail(f"your output {s.where} differs from {general}.")


# ----------------------------------------------------------------------------- 8.1


def _window(k, t: int, window: int):
    """Positions max(0, t - window + 1) ... t of k along the length axis."""
    return k[:, :, max(0, t - window + 1) : t + 1]


def _ring_variant(query, key, value, cache, window, *, fill="empty", span=0, slot="ring",
                  order="write", in_place=True):
    """Exercise 8.1 written right, and as the realistic slips of it: ``fill="zeros"``
    attends over every slot, unwritten ones included; ``span`` widens the window by one
    slot too many (+1) or too few (-1); ``slot="cat"`` appends and slices (a copy per
    step), ``"t"`` forgets the modulo; ``order="attend first"`` attends before writing;
    ``order="masked"`` applies a causal mask to the one query; ``in_place=False`` writes with ``index_copy``, which returns a new tensor."""
    t = cache.get("seen", 0)
    size = window + span
    if slot == "cat":  # exercise 8.3's old solution: correct outputs, a copy per step
        k = key if "k" not in cache else torch.cat([cache["k"], key], dim=2)[:, :, -size:]
        v = value if "v" not in cache else torch.cat([cache["v"], value], dim=2)[:, :, -size:]
        cache["k"], cache["v"], cache["seen"] = k, v, t + 1
        return _attend(query, k, v)
    if "k" not in cache:
        shape = (key.size(0), key.size(1), size, key.size(3))
        make = torch.zeros if fill == "zeros" else torch.empty
        cache["k"], cache["v"] = make(shape), make(shape)
    where = t % size if slot == "ring" else t
    filled = size if fill == "zeros" else min(t + 1, size)
    if order == "attend first":  # the new position is written after attending
        k, v = cache["k"][:, :, : min(t, size)], cache["v"][:, :, : min(t, size)]
        out = _attend(query, k, v) if t else torch.zeros_like(query)
    if in_place:
        cache["k"][:, :, where], cache["v"][:, :, where] = key[:, :, 0], value[:, :, 0]
    else:
        slot = torch.tensor([where])
        cache["k"] = cache["k"].index_copy(2, slot, key)
        cache["v"] = cache["v"].index_copy(2, slot, value)
    cache["seen"] = t + 1
    if order == "attend first":
        return out
    mask = torch.ones(1, filled, dtype=torch.bool).tril() if order == "masked" else None
    return _attend(query, cache["k"][:, :, :filled], cache["v"][:, :, :filled], mask)


def _unfilled(c) -> str:
    return (f"your output {c.where} attends over slots that hold no position yet (only "
            f"{c.t + 1} of the {c.window} are written): attend over the filled slots only until "
            "the window is full.")


_RING = [  # the outputs' mistakes, tried in this order on step c.t of a case c
    Mistake(_unfilled, partial(_ring_variant, fill="zeros"), when=lambda c: c.t < c.window - 1,
            expect="attends over slots that hold no position yet"),
    Mistake(lambda c: f"your output {c.where} attends to the oldest key only: a causal mask was "
            "applied to a one-query step (`tril` of a (1, n) matrix keeps column 0). The one new "
            "query is the latest position and may see every key in the window: no mask.",
            partial(_ring_variant, order="masked"), when=lambda c: 0 < c.t < c.window,
            expect="a causal mask was applied to a one-query"),
    Mistake(lambda c: f"your output {c.where} is attention computed before its own key and value "
            "were written: write the new position into its slot first; a query always sees "
            "itself.", partial(_ring_variant, order="attend first"),
            expect="before its own key and value were written"),
    Caught(partial(_ring_variant, slot="cat"), "allocate all 3 slots on the first step"),
    Caught(partial(_ring_variant, in_place=False), r"cache\['k'\] was reallocated at step 1"),
    Caught(partial(_ring_variant, span=1), "one slot too many"),
    Caught(partial(_ring_variant, span=-1), "one slot too few"),
    Caught(partial(_ring_variant, slot="t"), r"slot t % window"),
]


def _ring_replay(step, c):
    """The output of ``step`` at step c.t, run over steps 0 ... c.t from an empty cache."""
    cache: dict = {}
    for p in range(c.t + 1):
        out = step(*(x[:, :, p : p + 1].clone() for x in (c.q, c.k, c.v)), cache, c.window)
    return out


def _expect_ring(cache, k, t: int, window: int, where: str) -> None:
    """After step t, slot p % window of cache['k'] holds position p's key."""
    if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
        fail(f"after the step {where} the cache has no 'k' and 'v' entries: keep the window's "
             "keys and values in cache['k'] and cache['v'] of the dict the check passes.")
    shape = (k.size(0), k.size(1), window, k.size(3))
    for name in ("k", "v"):
        held = expect_tensor(cache[name], f"cache['{name}'] {where}")
        slots = held.size(2) if held.dim() == 4 else None
        if slots != window and slots == min(t + 1, window):
            fail(f"cache['{name}'] {where} has {slots} slot(s): allocate all {window} slots on "
                 "the first step and write each position into its slot in place; "
                 "appending with torch.cat and slicing copies the cache at every step.")
        if slots in (window + 1, window - 1):
            fail(f"cache['{name}'] {where} has one slot too "
                 f"{'many' if slots > window else 'few'}: the window is positions "
                 f"t - {window} + 1 ... t, {window} of them, the new one included.")
        held = expect_shape(held, shape, f"cache['{name}'] {where}")
        if name == "k":
            for p in range(max(0, t - window + 1), t + 1):
                if not same(held[:, :, p % window], k[:, :, p]):
                    fail(f"cache['k'] {where}: slot {p % window} should hold the key of "
                         f"position {p} (slot p % window); the ring writes each position "
                         "over the oldest one.")


@exercise("8.1", "A sliding-window cache that never copies", mistakes={"ring_window_step": _RING})
def check_ring_window_step(ring_window_step):
    expect_callable(ring_window_step, "your step function",
                    "check_ring_window_step(ring_window_step)")
    generator = torch.Generator().manual_seed(81)
    hints = [Hint(IndexError, "out of bounds",
                  "Position t goes into slot t % window: the ring has window slots.")]
    for batch, heads, length, d_head, window in [(2, 3, 8, 4, 3), (1, 2, 5, 3, 5),
                                                 (2, 1, 6, 2, 1)]:
        q, k, v = (torch.randn(batch, heads, length, d_head, generator=generator) for _ in "qkv")
        cache: dict = {}
        address = None
        for t in range(length):
            where = f"at step {t} (window {window})"
            args = [x[:, :, t : t + 1].clone() for x in (q, k, v)]
            out = call(ring_window_step, *args, cache, window, what="ring_window_step",
                       hints=hints)
            _expect_ring(cache, k, t, window, where)
            if address is None:
                address = cache["k"].data_ptr(), cache["v"].data_ptr()
            elif (cache["k"].data_ptr(), cache["v"].data_ptr()) != address:
                fail(f"cache['k'] was reallocated at step {t}: allocate the window's slots once, "
                     "on the first step, and write each new position into its slot in place "
                     "(`cache['k'][:, :, slot] = ...`), without torch.cat or a slice that copies.")
            out = expect_shape(out, (batch, heads, 1, d_head), f"your output {where}")
            expected = _attend(q[:, :, t : t + 1], _window(k, t, window), _window(v, t, window))
            if same(out, expected):
                continue
            c = SimpleNamespace(q=q, k=k, v=v, t=t, window=window, where=where)
            if t < window - 1 and not torch.isfinite(out).all():
                fail(_unfilled(c))
            name_mistake(out, _RING, c, run=lambda wrong, c=c: _ring_replay(wrong, c),
                         general=f"your output {where} differs from attention over the last "
                         f"min(t + 1, {window}) positions.")


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


def _decoder(seed: int, heads: int = 4):
    torch.manual_seed(seed)  # the check runs under fork_rng: the notebook's stream is kept
    from transformer_book import Transformer

    return Transformer(13, 13, d_model=8, num_heads=heads, num_encoder_layers=1,
                       num_decoder_layers=2, d_ff=16, dropout=0.0).eval()


def _tensors(cache, path=()):
    """(path, tensor) of every tensor in a nested cache dict."""
    for key, value in cache.items():
        if isinstance(value, dict):
            yield from _tensors(value, (*path, key))
        elif isinstance(value, torch.Tensor):
            yield (*path, key), value


def _path_name(path) -> str:
    return "cache" + "".join(f"[{p!r}]" for p in path)


def _reorder_variant(cache, beams, *, skip=(), axis=0, scatter=False, numbers=False):
    """Exercise 8.3 written right, and as its slips: ``skip`` leaves entries whose path
    contains one of these names as they were, ``axis`` reorders another axis,
    ``scatter`` moves row b to row beams[b], ``numbers`` also indexes plain numbers."""
    for key, value in cache.items():
        if isinstance(value, dict):
            _reorder_variant(value, beams, skip=skip, axis=axis, scatter=scatter,
                             numbers=numbers)
        elif key in skip or (isinstance(value, torch.Tensor) and "cross" in skip
                             and "static" in cache):
            continue
        elif isinstance(value, torch.Tensor):
            if scatter:
                moved = torch.empty_like(value)
                moved[beams] = value
                cache[key] = moved
            else:
                cache[key] = value.index_select(axis if value.dim() > 2 else 0, beams)
        elif numbers:
            cache[key] = value.index_select(0, beams)


_REORDER = [  # tried in this order on each tensor of the cache (case c), by its path
    Mistake(lambda c: f"{c.name} was not reordered {c.where}: every tensor of the cache has one "
            "row per sequence" + ("; cross-attention's keys and values come from each row's "
                                  "source, so they follow the rows too" if c.cross else "") + ".",
            lambda cache, beams: cache, expect="was not reordered"),
    Mistake(lambda c: f"{c.name} {c.where}: you reordered the heads (axis 1); the sequences are "
            "axis 0, (batch, heads, L, d_head).", partial(_reorder_variant, axis=1),
            when=lambda c: c.old.dim() > 2, expect="reordered the heads"),
    Mistake(lambda c: f"{c.name} {c.where}: row b's cache was scattered to row beams[b]; row b "
            "must receive the cache of its parent, row beams[b] (`index_select(0, beams)`).",
            partial(_reorder_variant, scatter=True),
            when=lambda c: len(set(c.beams.tolist())) == len(c.beams), expect="scattered"),
    Caught(partial(_reorder_variant, skip=("cross",)), r"\['cross'\]\['k'\] was not reordered"),
    Caught(partial(_reorder_variant, skip=("real",)), r"cache\['real'\] was not reordered"),
    Caught(partial(_reorder_variant, skip=("v",)), r"\['self'\]\['v'\] was not reordered"),
    Caught(partial(_reorder_variant, numbers=True), "plain numbers"),
]


def _entry(cache, path):
    for key in path:
        cache = cache.get(key) if isinstance(cache, dict) else None
    return cache


def _reordered_by(reorder, c):
    """The tensor at c.path after ``reorder`` ran on a copy of the cache c.cache (bool as float)."""
    cache = copy.deepcopy(c.cache)
    result = reorder(cache, c.beams.clone())
    got = _entry(result if isinstance(result, dict) else cache, c.path)
    return got.float() if got.dtype == torch.bool else got


@exercise("8.3", "Reordering the cache for beam search", mistakes={"reorder_cache": _REORDER})
def check_reorder_cache(reorder_cache):
    expect_callable(reorder_cache, "your reorder function", "check_reorder_cache(reorder_cache)")
    numbers = ("The cache also holds plain numbers ('length', 'capacity'): reorder the "
               "tensors only.")
    hints = [Hint(AttributeError, "object has no attribute", numbers),
             Hint(TypeError, "not subscriptable", numbers)]
    generator = torch.Generator().manual_seed(83)
    for capacity, beams in [(12, [1, 2, 3, 0]), (None, [1, 1, 0, 3]), (None, [2, 0, 0, 2])]:
        model = _decoder(seed=len(beams) + (capacity or 0))
        src = torch.randint(3, 13, (4, 5), generator=generator)
        src[1:, -2:] = 0  # padded sources
        prefix = torch.randint(3, 13, (4, 6), generator=generator)
        prefix[0, 4:], prefix[2, 3:] = 0, 0  # finished sequences, padded afterwards
        beams = torch.tensor(beams)
        where = f"(beams {beams.tolist()}, capacity {capacity})"
        with torch.no_grad():
            memory = model.encode(src)
            cache: dict = {"capacity": capacity}
            model.decode(prefix, memory, src, cache)
            original = copy.deepcopy(cache)
            result = call(reorder_cache, cache, beams.clone(), what="reorder_cache",
                          hints=hints)
            if isinstance(result, dict):
                cache = result
            for path, old in _tensors(original):
                c = SimpleNamespace(path=path, name=_path_name(path), where=where, beams=beams,
                                    cross="cross" in path, cache=original,
                                    old=old.float() if old.dtype == torch.bool else old)
                got = expect_tensor(_entry(cache, path), f"{c.name} after your call {where}")
                if not same(got, c.old.index_select(0, beams), equal_nan=True):
                    name_mistake(got, _REORDER, c, equal_nan=True,
                                 run=lambda wrong, c=c: _reordered_by(wrong, c),
                                 general=f"{c.name} {where} should hold row beams[b] of the old "
                                 "tensor in row b.")


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
    _UNSCALED,
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


# ----------------------------------------------------------------------------- 8.4

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


@exercise("8.4", "A grouped-query step with a smaller cache", mistakes={
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


# ----------------------------------------------------------------------------- 8.6


def _pool_variant(linear, num_heads, num_kv_heads, *, groups="neighbours", reduce="mean",
                  bias="pooled"):
    """Exercise 8.4 written right, and as its slips: ``groups="strided"`` pools heads
    i, i + G, ...; ``reduce`` "sum" or "first"; ``bias`` "dropped" or "sliced"."""
    d_head = linear.out_features // num_heads
    group = num_heads // num_kv_heads
    w = linear.weight.detach().view(num_heads, d_head, -1)
    b = linear.bias.detach().view(num_heads, d_head)
    if groups == "strided":
        w, b = (x.view(group, num_kv_heads, *x.shape[1:]).transpose(0, 1) for x in (w, b))
    else:
        w, b = (x.view(num_kv_heads, group, *x.shape[1:]) for x in (w, b))
    pick = {"mean": lambda x: x.mean(1), "sum": lambda x: x.sum(1), "first": lambda x: x[:, 0]}
    w, pooled = pick[reduce](w), pick[reduce](b)
    out = torch.nn.Linear(linear.in_features, num_kv_heads * d_head, bias=bias != "dropped")
    with torch.no_grad():
        out.weight.copy_(w.reshape(num_kv_heads * d_head, -1))
        if bias == "pooled":
            out.bias.copy_(pooled.reshape(-1))
        elif bias == "sliced":
            out.bias.copy_(linear.bias[: num_kv_heads * d_head])
    return out


_POOL = [
    Mistake("pools heads i, i + G, i + 2G, ... (a strided group): the query heads of a group "
            "are neighbours, head i belongs to group i // (num_heads // num_kv_heads), as in "
            "exercise 8.4.", partial(_pool_variant, groups="strided"),
            when=lambda linear, h, g: 1 < g < h),
    Mistake("sums the heads of a group: average them, or each pooled key is `group` times "
            "too large.", partial(_pool_variant, reduce="sum"), when=lambda linear, h, g: g < h),
    Mistake("keeps the first head of each group: mean pooling averages every head of the "
            "group (Ainslie et al., 2023).", partial(_pool_variant, reduce="first"),
            when=lambda linear, h, g: g < h),
    Caught(partial(_pool_variant, bias="dropped"), "has no bias"),
    Caught(partial(_pool_variant, bias="sliced"), "differs from the mean of each group's head"),
]


@exercise("8.6", "Grouped-query attention from a multi-head layer", mistakes={"pool_kv_heads": _POOL})
def check_pool_kv_heads(pool_kv_heads):
    expect_callable(pool_kv_heads, "your pooling function", "check_pool_kv_heads(pool_kv_heads)")
    for d_model, heads, kv_heads in [(12, 6, 3), (8, 4, 1), (12, 6, 2), (8, 4, 4), (16, 8, 2)]:
        torch.manual_seed(d_model * heads + kv_heads)  # under fork_rng: the notebook's kept
        linear = torch.nn.Linear(d_model, d_model)
        saved = linear.weight.detach().clone(), linear.bias.detach().clone()
        where = f"(d_model {d_model}, {heads} heads -> {kv_heads} key/value heads)"
        got = call(pool_kv_heads, linear, heads, kv_heads, what="pool_kv_heads")
        expect_unchanged(saved[0], linear.weight.detach(), "linear.weight")
        if not isinstance(got, torch.nn.Linear):
            fail(f"pool_kv_heads should return a torch.nn.Linear {where}; it returned a "
                 f"{type(got).__name__}.")
        d_head = d_model // heads
        shape = (kv_heads * d_head, d_model)
        if tuple(got.weight.shape) != shape:
            fail(f"your layer's weight {where} has shape {tuple(got.weight.shape)}, expected "
                 f"{shape}: {kv_heads} heads of {d_head} output features each, from all "
                 f"{d_model} inputs (pool the output features, the heads).")
        expected = _pool_variant(linear, heads, kv_heads)
        if got.bias is None:
            fail(f"your layer {where} has no bias: the key projection has one, and it is "
                 "pooled like the weight.")
        if not same(got.weight, expected.weight):
            name_mistake(got.weight, _POOL, linear, heads, kv_heads, pick=lambda x: x.weight,
                         prefix=f"your layer {where} ",
                         general=f"your layer's weight {where} differs from the mean of each "
                         "group's heads.")
        if not same(got.bias, expected.bias):
            fail(f"your layer's bias {where} differs from the mean of each group's head "
                 "biases: pool the bias as the weight.")
