"""Checks for chapter 3, multi-head attention.

The references are PyTorch's own: plain permutes for the head layouts, and
``torch.nn.MultiheadAttention`` (with the student's weights copied into it, or its
weights copied into the student's module) for the two attention modules. When an answer
differs, the check runs the usual mistakes (heads reshaped without the transpose, no
output projection, the scale 1/sqrt(d_model) instead of 1/sqrt(d_head), softmax over the
queries, the mask inverted ...), each written once in a table as a wrong function or a
wrong module (an option of the configurable ``_Fused`` and ``_MQA``, run with the
student's own weights), and names the one that matches; only if none does it fall back
to a general message.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ._core import (
    Caught,
    Hint,
    Mistake,
    attention_functions,
    call,
    exercise,
    expect_callable,
    expect_class,
    expect_shape,
    expect_tensor,
    fail,
    fmt,
    name_mistake,
    refused,
    same,
    with_weights_of,
)

ATOL, RTOL = 1e-5, 1e-4


def _close(actual, expected, atol: float = ATOL) -> bool:
    return same(actual, expected, atol=atol, rtol=RTOL, equal_nan=True)


# ------------------------------------------------------- exercise 3.1: sequence-first heads


def _split_reference(x, num_heads):
    length, batch, d_model = x.shape
    return x.reshape(length, batch, num_heads, d_model // num_heads).permute(1, 2, 0, 3)


def _merge_reference(x):
    batch, num_heads, length, d_head = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, num_heads * d_head)


# (L, batch, d_model, num_heads): L != batch in most cases, so that the two are told apart;
# length 1, batch 1, one head, d_head = 1 and widths that are not powers of two.
_HEAD_CASES = [(5, 3, 12, 3), (4, 2, 8, 2), (1, 2, 8, 4), (6, 1, 10, 2), (3, 4, 8, 8), (7, 2, 6, 1)]

_VIEW_HINT = Hint(RuntimeError, "view", "In `.view`: after a permute or transpose (or on a "
                  "transposed input) the tensor is not contiguous, and `.view` cannot regroup its "
                  "axes; use `.reshape` (which copies when it must) or call `.contiguous()` first.")


def _split_as(order: str):
    """A split_heads_seq_first that cuts x the wrong way (see _SPLIT)."""

    def split(x, num_heads):
        length, batch, d_model = x.shape
        d_head = d_model // num_heads
        return {
            "no move": lambda: x.reshape(batch, num_heads, length, d_head),
            "batch first, reshape": lambda: x.transpose(0, 1).reshape(batch, num_heads, length,
                                                                      d_head),
            "as batch-first": lambda: x.reshape(batch, length, num_heads, d_head).transpose(1, 2),
            "interleaved": lambda: x.reshape(length, batch, d_head, num_heads).permute(1, 3, 0, 2),
            "sequence first": lambda: x.reshape(length, batch, num_heads, d_head).transpose(1, 2),
        }[order]()

    return split


def _merge_as(order: str):
    """A merge_heads_seq_first that glues the heads the wrong way (see _MERGE)."""

    def merge(heads):
        batch, num_heads, length, d_head = heads.shape
        d_model = num_heads * d_head
        return {
            "no move": lambda: heads.reshape(length, batch, d_model),
            "batch first, reshape": lambda: heads.transpose(1, 2).reshape(length, batch, d_model),
            "interleaved": lambda: heads.permute(2, 0, 3, 1).reshape(length, batch, d_model),
            "batch first": lambda: heads.transpose(1, 2).reshape(batch, length, d_model),
            "view": lambda: heads.permute(2, 0, 1, 3).view(length, batch, d_model),
        }[order]()

    return merge


_SPLIT = [
    Mistake("split_heads_seq_first reshapes straight to (batch, heads, L, d_head) without moving "
            "any axis. reshape keeps memory order, where x is stored position by position, so "
            "the 'heads' hold slices of the wrong tokens and sequences. Reshape to "
            "(L, batch, heads, d_head), then permute the axes into place.", _split_as("no move")),
    Mistake("split_heads_seq_first moves the batch axis to the front but then reshapes straight "
            "to (batch, heads, L, d_head): the reshape-without-transpose bug. Positions get "
            "mixed across heads; reshape to (batch, L, heads, d_head) and transpose L and heads.",
            _split_as("batch first, reshape")),
    Mistake("split_heads_seq_first reads the (L, batch, d_model) input as if it were (batch, L, "
            "d_model) with a reshape: that reinterprets memory and mixes sequences of the "
            "batch. Swap axes with permute/transpose; reshape only splits d_model.",
            _split_as("as batch-first")),
    Mistake("In split_heads_seq_first, head i holds features i, i + num_heads, i + 2 * "
            "num_heads, ...: the last axis was cut as (d_head, num_heads). Cut it as "
            "(num_heads, d_head), so that head i gets the consecutive features i * d_head to "
            "(i + 1) * d_head - 1.", _split_as("interleaved")),
    Caught(_split_as("sequence first"), "sequence axis is still first"),
]
_MERGE = [
    Mistake("merge_heads_seq_first reshapes straight to (L, batch, d_model) without moving any "
            "axis: reshape keeps memory order, where the heads are stored one after the other, "
            "so features of different positions and heads get glued together. Permute to "
            "(L, batch, heads, d_head) first, then reshape.", _merge_as("no move")),
    Mistake("merge_heads_seq_first builds the batch-first (batch, L, d_model) and then reshapes "
            "it to (L, batch, d_model): that reinterprets memory and mixes the sequences. Swap "
            "the batch and sequence axes with permute/transpose.",
            _merge_as("batch first, reshape")),
    Mistake("merge_heads_seq_first interleaves the heads (feature 0 of every head, then feature "
            "1 ...). Concatenate them instead: head 0's d_head features, then head 1's, so put "
            "the heads axis before d_head: (L, batch, heads, d_head).", _merge_as("interleaved")),
    Caught(_merge_as("batch first"), "that is batch-first"),
    Caught(_merge_as("view"), "`.view` cannot regroup its axes"),
]


@exercise("3.1", "Heads for sequence-first tensors",
          mistakes={"split_heads_seq_first": _SPLIT, "merge_heads_seq_first": _MERGE})
def check_seq_first_heads(split_heads_seq_first, merge_heads_seq_first):
    example = "check_seq_first_heads(split_heads_seq_first, merge_heads_seq_first)"
    expect_callable(split_heads_seq_first, "your split function first", example)
    expect_callable(merge_heads_seq_first, "your merge function second", example)
    generator = torch.Generator().manual_seed(31)
    for length, batch, d_model, num_heads in _HEAD_CASES:
        x = torch.randn(length, batch, d_model, generator=generator)  # (L, B, d_model)
        _check_split(split_heads_seq_first, x, num_heads)
        heads = torch.randn(batch, num_heads, length, d_model // num_heads, generator=generator)
        _check_merge(merge_heads_seq_first, heads)
        back = call(merge_heads_seq_first,
                    call(split_heads_seq_first, x, num_heads, what="split_heads_seq_first"),
                    what="merge_heads_seq_first")
        if not torch.equal(expect_tensor(back, "merge(split(x))"), x):
            fail("merge_heads_seq_first(split_heads_seq_first(x, h)) does not give x back.")
    # A sequence-first tensor is often a transposed batch-first one: not contiguous.
    batch_first = torch.randn(3, 5, 12, generator=generator)  # (B, L, d_model)
    x = batch_first.transpose(0, 1)  # (L, B, d_model), a non-contiguous view
    _check_split(split_heads_seq_first, x, 4, note=" (on a non-contiguous input)")


def _check_split(split, x, num_heads, note=""):
    what = "split_heads_seq_first"
    length, batch, d_model = x.shape
    d_head = d_model // num_heads
    got = expect_tensor(call(split, x, num_heads, what=what, hints=[_VIEW_HINT]),
                        f"what {what} returns")
    expected_shape = (batch, num_heads, length, d_head)
    if tuple(got.shape) != expected_shape:
        if tuple(got.shape) == (length, num_heads, batch, d_head) and length != batch:
            fail(f"{what} returned shape {fmt(got.shape)}, expected {fmt(expected_shape)}: the "
                 "sequence axis is still first. The input is (L, batch, d_model); the output "
                 "must be batch-first, (batch, heads, L, d_head).")
        expect_shape(got, expected_shape, f"The result of {what}(x, {num_heads}) for x "
                     f"{fmt(x.shape)}")
    if not torch.equal(got.detach(), _split_reference(x, num_heads)):
        name_mistake(got, _SPLIT, x, num_heads, atol=0, rtol=0, general=f"{what}(x, {num_heads}) "
                     f"for x of shape {fmt(x.shape)}{note} has the right shape but the wrong "
                     "contents: out[b, h, t] should be x[t, b, h * d_head:(h + 1) * d_head].")


def _check_merge(merge, heads):
    what = "merge_heads_seq_first"
    batch, num_heads, length, d_head = heads.shape
    got = expect_tensor(call(merge, heads, what=what, hints=[_VIEW_HINT]), f"what {what} returns")
    expected_shape = (length, batch, num_heads * d_head)
    if tuple(got.shape) != expected_shape:
        if tuple(got.shape) == (batch, length, num_heads * d_head) and length != batch:
            fail(f"{what} returned shape {fmt(got.shape)}, expected {fmt(expected_shape)}: that is "
                 "batch-first. This exercise wants sequence-first output, (L, batch, d_model).")
        expect_shape(got, expected_shape, f"The result of {what} for heads {fmt(heads.shape)}")
    if not torch.equal(got.detach(), _merge_reference(heads)):
        name_mistake(got, _MERGE, heads, atol=0, rtol=0, general=f"{what} for heads of shape "
                     f"{fmt(heads.shape)} has the right shape but the wrong contents: out[t, b, "
                     "h * d_head:(h + 1) * d_head] should be heads[b, h, t].")


# ------------------------------------------------- the attention modules, right and wrong


def _torch_attn_mask(mask, batch, num_heads, lq, lk):
    """Our mask (True = may attend) as nn.MultiheadAttention's attn_mask (True = blocked)."""
    if mask is None:
        return None
    return ~mask.expand(batch, num_heads, lq, lk).reshape(batch * num_heads, lq, lk)


def _split(x, num_heads, bug=False):
    batch, length, d_model = x.shape
    if bug:
        return x.reshape(batch, num_heads, length, d_model // num_heads)
    return x.reshape(batch, length, num_heads, d_model // num_heads).transpose(1, 2)


def _merge(x, bug=False):
    batch, num_heads, length, d_head = x.shape
    if bug:
        return x.reshape(batch, length, num_heads * d_head)
    return x.transpose(1, 2).reshape(batch, length, num_heads * d_head)


class _Heads(nn.Module):
    """What both attention modules share, with one class option per mistake: the defaults
    give the right module; ``_variant(_Fused, scale="model")`` one with that mistake."""

    out_proj, scale, softmax_dim, mask_mode = True, "head", -1, "ok"
    split_bug = merge_bug = store_after_dropout = detach_output = False
    store, dropout = "heads", 0.0

    def attend(self, q, k, v, mask, d_model):
        """Attention over (B, heads, L, d_head) tensors, merged and projected."""
        scores = q @ k.transpose(-2, -1)  # (B, heads, Lq, Lk)
        divisor = {"head": math.sqrt(q.shape[-1]), "model": math.sqrt(d_model),
                   "head_not_root": q.shape[-1], "none": 1.0}[self.scale]
        scores = scores / divisor
        if mask is not None and self.mask_mode in ("ok", "inverted"):
            allowed = mask if self.mask_mode == "ok" else ~mask
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=self.softmax_dim)
        if mask is not None and self.mask_mode == "after":
            weights = weights * mask
        drop = nn.functional.dropout(weights, self.dropout, self.training)
        stored = {"heads": weights, "mean": weights.mean(1), "scores": scores}.get(self.store)
        if stored is not None:
            self.attention_weights = (drop if self.store_after_dropout else stored).detach()
        merged = _merge(drop @ v, self.merge_bug)  # (B, Lq, d_model)
        out = self.w_o(merged) if self.out_proj else merged
        return out.detach() if self.detach_output else out


def _variant(base, **options):
    return type(base.__name__, (base,), options)


class _Fused(_Heads):
    """FusedMultiHeadAttention: one nn.Linear(d_model, 3 * d_model) for q, k and v."""

    order, per_head, check_divisible, ignore_bias, extra_parameter = (0, 1, 2), False, True, 0, 0

    def __init__(self, d_model, num_heads, bias=True):
        super().__init__()
        if self.check_divisible and d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, bias = num_heads, bias or self.ignore_bias
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        if self.extra_parameter:
            self.gain = nn.Parameter(torch.ones(d_model))

    def forward(self, x, mask=None):
        batch, length, d_model = x.shape
        qkv = self.w_qkv(x)  # (B, L, 3 * d_model)
        parts = qkv.chunk(3, dim=-1)
        if self.per_head:  # read as (B, L, heads, 3, d_head): q, k, v interleaved per head
            parts = [p.reshape(batch, length, d_model)
                     for p in qkv.reshape(batch, length, self.num_heads, 3, -1).unbind(dim=3)]
        q, k, v = (_split(parts[i], self.num_heads, self.split_bug) for i in self.order)
        return self.attend(q, k, v, mask, d_model)


class _MQA(_Heads):
    """MultiQueryAttention: one key and one value head of d_head features, shared."""

    kv_width, kv_by_batch, from_query = "head", False, ()

    def __init__(self, d_model, num_heads, bias=True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        width = d_model // num_heads if self.kv_width == "head" else d_model
        self.w_q, self.w_o = nn.Linear(d_model, d_model, bias), nn.Linear(d_model, d_model, bias)
        self.w_k, self.w_v = nn.Linear(d_model, width, bias), nn.Linear(d_model, width, bias)

    def forward(self, query, key, value, mask=None):
        key = query if "key" in self.from_query else key
        value = query if "value" in self.from_query else value
        q = _split(self.w_q(query), self.num_heads, self.split_bug)  # (B, heads, Lq, d_head)
        k, v = self.w_k(key), self.w_v(value)  # (B, Lk, d_head)
        # kv_by_batch: (B, Lk, d_head) broadcast against (B, heads, ...) as (1, B, ...)
        k, v = (k.unsqueeze(0), v.unsqueeze(0)) if self.kv_by_batch else (k[:, None], v[:, None])
        return self.attend(q, k, v, mask, query.shape[-1])


# The mistakes any multi-head module can make, as class options, with their messages.
_COMMON = [
    (dict(out_proj=False), "Your output equals the concatenated heads before the output "
     "projection: apply w_o to the merged heads. Without it the heads are never mixed."),
    (dict(scale="none"), "Your output matches attention without the 1/sqrt(d_head) scale: "
     "divide the scores q @ k^T by sqrt(d_head) before the softmax."),
    (dict(scale="model"), "Your output matches scores divided by sqrt(d_model). The d_k of the "
     "formula is the width of one head, d_head = d_model // num_heads: that is the length of "
     "the dot products being scaled."),
    (dict(scale="head_not_root"), "Your output matches scores divided by d_head: the scale is "
     "1/sqrt(d_head)."),
    (dict(softmax_dim=-2), "Your output matches a softmax over the queries (dim=-2): the softmax "
     "runs over the keys, the last axis, so each query's weights sum to 1."),
    (dict(split_bug=True), "Your output matches the heads split with a reshape to (batch, "
     "heads, L, d_head) and no transpose: positions get mixed across heads. Reshape to "
     "(batch, L, heads, d_head), then transpose(1, 2)."),
    (dict(merge_bug=True), "Your output matches the heads merged with a reshape to (batch, L, "
     "d_model) and no transpose: features of different positions get glued together. "
     "transpose(1, 2) back to (batch, L, heads, d_head) before the reshape."),
    (dict(split_bug=True, merge_bug=True), "Your output matches heads split and merged with plain "
     "reshapes, without the transposes: the shapes fit but positions are mixed across heads. Split "
     "with reshape to (batch, L, heads, d_head) + transpose(1, 2), and merge the reverse way."),
    (dict(mask_mode="inverted"), "Your output matches the mask inverted: in this course True "
     "means 'may attend', so fill the scores with -inf where the mask is False (~mask)."),
    (dict(mask_mode="after"), "Your output matches the weights multiplied by the mask after "
     "the softmax: the rows then no longer sum to 1. Mask the scores before the softmax."),
    (dict(mask_mode="ignored"), "Your output matches attention without the mask: pass it on, "
     "or fill the masked scores with -inf before the softmax."),
]


def _twin(module, args, d_model, num_heads, bias):
    return with_weights_of(module, *args, build=lambda c: c(d_model, num_heads, bias=bias))


def _diagnose_module(output, module, table, run, reference, general, *args):
    """Compare the output with the reference, naming a mistake of ``table`` on a mismatch
    (``args``: what the mistakes' conditions read); then the weights the module stored."""
    ref_out, ref_w = reference
    if not _close(output, ref_out):
        name_mistake(output, table, *args, run=run, general=general, atol=ATOL, rtol=RTOL,
                     equal_nan=True)
    _check_stored_weights(getattr(module, "attention_weights", None), ref_w)


def _check_stored_weights(weights, ref_w):
    if weights is None:
        fail("Your module does not keep the weights: set self.attention_weights to the "
             "(batch, heads, Lq, Lk) attention weights in forward.")
    expect_tensor(weights, "self.attention_weights")
    shape = tuple(ref_w.shape)
    if tuple(weights.shape) == shape[:1] + shape[2:] and _close(weights, ref_w.mean(1)):
        fail("self.attention_weights holds the weights averaged over the heads: keep one map "
             f"per head, shape (batch, heads, Lq, Lk) = {fmt(shape)}.")
    expect_shape(weights, shape, "self.attention_weights")
    if not _close(weights, ref_w):
        sums = weights.detach().double().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            fail("Your output is right but self.attention_weights rows do not sum to 1 over "
                 "the keys: store the weights after the softmax (and before any dropout).")
        fail("Your output is right but self.attention_weights differs from the weights that "
             "produced it: store the weights of the last call, per head, after the softmax.")


def _module_mask(kind, batch, lq, lk, generator):
    """A mask in our convention with no fully masked row, or None."""
    if kind is None:
        return None
    if kind == "causal":
        return torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=max(lk - lq, 0))  # (Lq, Lk)
    keep = torch.rand(batch, 1, 1, lk, generator=generator) > 0.4  # (B, 1, 1, Lk)
    keep[..., 0] = True  # every query keeps key 0
    return keep


def _instantiate(cls, name, *args, **kwargs):
    shown = ", ".join([str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()])
    module = call(cls, *args, what=f"{name}({shown})", **kwargs)
    if not isinstance(module, nn.Module):
        fail(f"{name}({shown}) did not build an nn.Module.")
    return module.eval()


def _expect_linear(module, attr, name, d_in, d_out, bias, hint):
    layer = getattr(module, attr, None)
    if not isinstance(layer, nn.Linear):
        fail(f"{name} has no nn.Linear called {attr}: {hint}")
    if tuple(layer.weight.shape) != (d_out, d_in):
        fail(f"{name}.{attr}.weight has shape {fmt(layer.weight.shape)}, expected "
             f"{fmt((d_out, d_in))}: {hint}")
    if (layer.bias is not None) != bias:
        has = "has" if layer.bias is not None else "has no"
        fail(f"{name}.{attr} {has} bias although bias={bias}: pass bias=bias to nn.Linear.")
    return layer


def _expect_value_error(cls, name, d_model, num_heads):
    try:
        cls(d_model, num_heads)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:  # noqa: BLE001 - any other exception is the wrong one
        fail(f"{name}({d_model}, {num_heads}) raised {type(error).__name__}; d_model not "
             "divisible by num_heads should raise ValueError with a clear sentence.")
    fail(f"{name}({d_model}, {num_heads}) built a module although {d_model} is not divisible "
         f"by {num_heads}: raise ValueError, since every head needs d_model // num_heads features.")


def _training_mode(module, args, ref_out, ref_w, what):
    """The exercises have no dropout: training mode must compute what eval mode computes."""
    module.train()
    try:
        output = call(module, *args, what=f"{what} in training mode")
    finally:
        module.eval()
    weights = getattr(module, "attention_weights", None)
    if isinstance(weights, torch.Tensor) and weights.shape == ref_w.shape:
        sums = weights.detach().double().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            fail("In training mode (module.train()) the rows of self.attention_weights do not "
                 "sum to 1: the weights were stored after a dropout. Store them after the "
                 "softmax and before any dropout (and this exercise asks for no dropout).")
    if not _close(output, ref_out.detach().double()):
        fail("Your module is right in eval mode but its output differs in training mode "
             "(module.train()): is there a dropout, on the attention weights or elsewhere? "
             "This exercise has no dropout, so both modes compute the same function.")


_FROM_SCRATCH = (
    "your module calls a ready-made attention function (the book's scaled_dot_product_attention or "
    "PyTorch's F.scaled_dot_product_attention): this exercise asks you to write the attention step "
    "yourself (scores, scale, mask, softmax, weighted sum)."
)


# -------------------------------------------------------- exercise 3.2: fused projection


def _book_attention(q, k, v, mask):  # a ready-made attention call, refused by the check
    from transformer_book.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, mask)


class _BookFused(_Fused):
    def attend(self, q, k, v, mask, d_model):
        heads, self.attention_weights = _book_attention(q, k, v, mask)
        return self.w_o(_merge(heads))


_CUT = ("Your output matches w_qkv's output cut into ({}) in that order. The packed layout "
        "(that of nn.MultiheadAttention's in_proj_weight) is rows 0:d_model for q, "
        "d_model:2*d_model for k, 2*d_model:3*d_model for v.")
_FUSED = [
    Mistake("Your output matches w_qkv's output read as (batch, L, num_heads, 3, d_head), with "
            "q, k and v interleaved head by head. The packed layout (that of "
            "nn.MultiheadAttention's in_proj_weight) is all of q, then all of k, then all of v: "
            "reshape to (batch, L, 3, num_heads, d_head).", _variant(_Fused, per_head=True)),
    *[Mistake(_CUT.format(", ".join("qkv"[i] for i in order)), _variant(_Fused, order=order))
      for order in itertools.permutations(range(3)) if order != (0, 1, 2)],
    *[Mistake(message, _variant(_Fused, **options)) for options, message in _COMMON],
    Caught(_variant(_Fused, store="mean"), "averaged over the heads"),
    Caught(_variant(_Fused, store="none"), "does not keep the weights"),
    Caught(_variant(_Fused, store="scores"), "do not sum to 1"),
    Caught(_variant(_Fused, detach_output=True), "gradients differ"),
    Caught(_variant(_Fused, ignore_bias=True), "has bias although bias=False"),
    Caught(_variant(_Fused, extra_parameter=True), "Remove the extra parameters"),
    Caught(_variant(_Fused, check_divisible=False), "raise ValueError"),
    Caught(_variant(_Fused, dropout=0.1), "differs in training mode"),
    Caught(_variant(_Fused, dropout=0.1, store_after_dropout=True), "stored after a dropout"),
    Caught(_BookFused, "write the attention step yourself"),
]

# (batch, L, d_model, num_heads, bias, mask kind)
_FUSED_CASES = [
    (2, 5, 12, 3, True, None),
    (3, 7, 20, 4, False, "causal"),
    (2, 6, 16, 4, True, "padding"),
    (1, 1, 8, 2, True, None),
    (2, 4, 6, 1, True, "padding"),
]


@exercise("3.2", "Multi-head attention with one fused QKV projection",
          mistakes={"FusedMultiHeadAttention": _FUSED})
def check_fused_mha(FusedMultiHeadAttention):  # noqa: N803 - the student's class
    expect_class(FusedMultiHeadAttention, nn.Module, "your module class (not an instance)",
                 "check_fused_mha(FusedMultiHeadAttention)")
    generator = torch.Generator().manual_seed(32)
    for case in _FUSED_CASES:
        _fused_case(FusedMultiHeadAttention, *case, generator=generator)
    _expect_value_error(FusedMultiHeadAttention, "FusedMultiHeadAttention", 10, 3)


def _fused_module(cls, d_model, num_heads, bias, generator):
    """The student's module with nn.MultiheadAttention's weights copied in, and that module."""
    name = "FusedMultiHeadAttention"
    torch.manual_seed(0)
    ours = _instantiate(cls, name, d_model, num_heads, bias=bias)
    hint = "the fused projection is nn.Linear(d_model, 3 * d_model, bias=bias)."
    w_qkv = _expect_linear(ours, "w_qkv", name, d_model, 3 * d_model, bias, hint)
    w_o = _expect_linear(ours, "w_o", name, d_model, d_model, bias,
                         "w_o is nn.Linear(d_model, d_model).")
    theirs = nn.MultiheadAttention(d_model, num_heads, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        if bias:  # PyTorch initialises its biases to zero, which would hide a misplaced bias
            theirs.in_proj_bias.normal_(generator=generator)
            theirs.out_proj.bias.normal_(generator=generator)
            w_qkv.bias.copy_(theirs.in_proj_bias)
            w_o.bias.copy_(theirs.out_proj.bias)
        w_qkv.weight.copy_(theirs.in_proj_weight)
        w_o.weight.copy_(theirs.out_proj.weight)
    expected_params = sum(p.numel() for p in theirs.parameters())
    got_params = sum(p.numel() for p in ours.parameters())
    if got_params != expected_params:
        fail(f"{name}({d_model}, {num_heads}, bias={bias}) has {got_params} parameters; "
             f"nn.MultiheadAttention of that size has {expected_params} (w_qkv and w_o "
             "only). Remove the extra parameters.")
    return ours, theirs


def _fused_case(cls, batch, length, d_model, num_heads, bias, mask_kind, generator):
    ours, theirs = _fused_module(cls, d_model, num_heads, bias, generator)
    x = torch.randn(batch, length, d_model, generator=generator, requires_grad=True)
    mask = _module_mask(mask_kind, batch, length, length, generator)
    attn_mask = _torch_attn_mask(mask, batch, num_heads, length, length)
    ref_out, ref_w = theirs(x, x, x, attn_mask=attn_mask, average_attn_weights=False)
    args = (x,) if mask is None else (x, mask)
    what = f"FusedMultiHeadAttention.forward (x {fmt(x.shape)}, mask {mask_kind})"
    with refused([cls], attention_functions(), _FROM_SCRATCH):
        output = call(ours, *args, what=what)
    expect_shape(output, (batch, length, d_model), f"The output of {what}")
    _diagnose_module(output, ours, _FUSED, _twin(ours, args, d_model, num_heads, bias),
                     (ref_out.detach().double(), ref_w.detach().double()),
                     f"The output of {what} differs from nn.MultiheadAttention with the same "
                     "weights. Check the order: project, cut into q, k, v, split heads, scaled "
                     "dot-product attention per head, merge, w_o.")
    with refused([cls], attention_functions(), _FROM_SCRATCH):
        _training_mode(ours, args, ref_out, ref_w, what)
    # gradients reach the input and the fused weight as in PyTorch's module
    grad_out = torch.randn(batch, length, d_model, generator=generator)
    grad_x, grad_w = torch.autograd.grad(ref_out, (x, theirs.in_proj_weight), grad_out)
    mine = None
    if output.requires_grad:
        mine = call(torch.autograd.grad, output, (x, ours.w_qkv.weight), grad_out,
                    allow_unused=True, what="backward through your module")
    if mine is None or mine[0] is None or mine[1] is None or not (
        _close(mine[0], grad_x) and _close(mine[1], grad_w)
    ):
        fail("The output is right but its gradients differ from nn.MultiheadAttention's "
             "(or do not reach x or w_qkv.weight): is part of the computation detached, "
             "done on .data, or outside autograd (e.g. under torch.no_grad)?")


# ------------------------------------------------------------ exercise 3.3: multi-query

_MQA_TABLE = [
    Mistake("Your output matches the shared keys used as (batch, Lk, d_head) against queries "
            "of shape (batch, heads, Lq, d_head): broadcasting lines the batch axis of the keys "
            "up with the heads axis, so head i reads sequence i. unsqueeze(1) the keys and "
            "values to (batch, 1, Lk, d_head).", _variant(_MQA, kv_by_batch=True),
            when=lambda batch, heads: batch == heads),
    *[Mistake(message, _variant(_MQA, **options)) for options, message in _COMMON
      if options != dict(split_bug=True, merge_bug=True)],  # (with one key head, that pair
    # of reshapes cancels out: the output is right, only the stored weights are not)
    Caught(_variant(_MQA, split_bug=True, merge_bug=True), "differs from the weights that "
           "produced it"),
    Caught(_variant(_MQA, kv_width="model"), "projected once, to a single head"),
    Caught(_variant(_MQA, store="mean"), "averaged over the heads"),
    Caught(_variant(_MQA, store="none"), "does not keep the weights"),
    Caught(_variant(_MQA, dropout=0.1), "differs in training mode"),
    Caught(_variant(_MQA, from_query=("key",)), "the keys are computed from `query`"),
    Caught(_variant(_MQA, from_query=("value",)), "the values are computed from `query`"),
    Caught(_variant(_MQA, from_query=("key", "value")), "computed from `query`"),
]

# (batch, Lq, Lk, d_model, num_heads, bias, mask kind); self-attention when Lq == Lk.
# The first case has batch == heads, where keys not unsqueezed to (B, 1, Lk, d_head) still
# run (broadcasting pairs sequence i with head i) and can be recognised.
_MQA_CASES = [
    (3, 4, 7, 12, 3, True, "padding"),
    (2, 5, 5, 12, 3, True, None),
    (2, 6, 6, 20, 5, False, "causal"),
    (1, 1, 3, 8, 2, True, None),
    (2, 3, 5, 8, 1, True, None),
]


@exercise("3.3", "Multi-query attention", mistakes={"MultiQueryAttention": _MQA_TABLE})
def check_multi_query_attention(MultiQueryAttention):  # noqa: N803 - the student's class
    expect_class(MultiQueryAttention, nn.Module, "your module class (not an instance)",
                 "check_multi_query_attention(MultiQueryAttention)")
    generator = torch.Generator().manual_seed(33)
    for case in _MQA_CASES:
        _mqa_case(MultiQueryAttention, *case, generator=generator)
    _expect_value_error(MultiQueryAttention, "MultiQueryAttention", 10, 4)


def _mqa_modules(cls, d_model, num_heads, bias, generator):
    """The student's module with random weights, and nn.MultiheadAttention doing the same
    with the shared key and value projections repeated for every head."""
    name, d_head = "MultiQueryAttention", d_model // num_heads
    torch.manual_seed(0)
    ours = _instantiate(cls, name, d_model, num_heads, bias=bias)
    square = "w_q and w_o are nn.Linear(d_model, d_model)."
    shared = ("in multi-query attention the keys and the values are projected once, to a "
              "single head of d_head = d_model // num_heads features shared by every query "
              "head: nn.Linear(d_model, d_head).")
    w_q = _expect_linear(ours, "w_q", name, d_model, d_model, bias, square)
    w_k = _expect_linear(ours, "w_k", name, d_model, d_head, bias, shared)
    w_v = _expect_linear(ours, "w_v", name, d_model, d_head, bias, shared)
    w_o = _expect_linear(ours, "w_o", name, d_model, d_model, bias, square)
    expected_params = 2 * d_model * d_model + 2 * d_model * d_head
    expected_params += (2 * d_model + 2 * d_head) if bias else 0
    got_params = sum(p.numel() for p in ours.parameters())
    if got_params != expected_params:
        fail(f"{name}({d_model}, {num_heads}, bias={bias}) has {got_params} parameters, "
             f"expected {expected_params} (w_q, w_k, w_v, w_o only).")
    with torch.no_grad():
        for layer in (w_q, w_k, w_v, w_o):
            layer.weight.normal_(generator=generator).div_(math.sqrt(d_model))
            if bias:
                layer.bias.normal_(generator=generator)
    theirs = nn.MultiheadAttention(d_model, num_heads, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        repeat_k, repeat_v = w_k.weight.repeat(num_heads, 1), w_v.weight.repeat(num_heads, 1)
        theirs.in_proj_weight.copy_(torch.cat([w_q.weight, repeat_k, repeat_v]))  # (3d, d)
        theirs.out_proj.weight.copy_(w_o.weight)
        if bias:
            repeat_k, repeat_v = w_k.bias.repeat(num_heads), w_v.bias.repeat(num_heads)
            theirs.in_proj_bias.copy_(torch.cat([w_q.bias, repeat_k, repeat_v]))
            theirs.out_proj.bias.copy_(w_o.bias)
    return ours, theirs


def _mqa_case(cls, batch, lq, lk, d_model, num_heads, bias, mask_kind, generator):
    ours, theirs = _mqa_modules(cls, d_model, num_heads, bias, generator)
    query = torch.randn(batch, lq, d_model, generator=generator)
    if lq == lk:
        key = value = query
    else:
        key = torch.randn(batch, lk, d_model, generator=generator)
        value = torch.randn(batch, lk, d_model, generator=generator)
    mask = _module_mask(mask_kind, batch, lq, lk, generator)
    attn_mask = _torch_attn_mask(mask, batch, num_heads, lq, lk)
    with torch.no_grad():
        ref_out, ref_w = theirs(query, key, value, attn_mask=attn_mask, average_attn_weights=False)
    what = (f"MultiQueryAttention.forward (query {fmt(query.shape)}, key {fmt(key.shape)}, "
            f"mask {mask_kind})")
    try:
        output = call(ours, query, key, value, mask, what=what)
    except Exception as failure:
        if isinstance(failure.__cause__, RuntimeError) and lq != lk:
            _inputs_from_query(ours, query, generator)
        raise
    expect_shape(output, (batch, lq, d_model), f"The output of {what}")
    reference = (ref_out.double(), ref_w.double())
    if _close(output, reference[0]):
        _training_mode(ours, (query, key, value, mask), ref_out, ref_w, what)
    args = (query, key, value, mask)
    _diagnose_module(output, ours, _MQA_TABLE, _twin(ours, args, d_model, num_heads, bias),
                     reference,
                     f"The output of {what} differs from multi-head attention whose heads all "
                     "use your w_k and w_v. Check: queries split into heads, one key and one "
                     "value head broadcast over the query heads, scale 1/sqrt(d_head), merge, "
                     "w_o.", batch, num_heads)


def _inputs_from_query(module, query, generator):
    """After a crash with Lq != Lk: name keys or values computed from the query."""
    shape = query.shape

    def run(*args):
        try:
            with torch.no_grad():
                return module(*args)
        except Exception:  # noqa: BLE001 - a probe: any crash means "cannot tell"
            return None

    key, value = (torch.randn(shape, generator=generator) for _ in range(2))
    base = run(query, key, value)
    if isinstance(base, torch.Tensor):
        for name, args in (
            ("key", (query, torch.randn(shape, generator=generator), value)),
            ("value", (query, key, torch.randn(shape, generator=generator))),
        ):
            changed = run(*args)
            if isinstance(changed, torch.Tensor) and torch.equal(changed, base):
                fail(f"Your module crashed when key and value are longer than query (Lq != Lk), "
                     f"and its output does not depend on `{name}`: the {name}s are computed from "
                     f"`query`. Project `key` with w_k and `value` with w_v.")
