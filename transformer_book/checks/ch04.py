"""Checks for the exercises of chapter 4, Masking.

Masks follow the book's convention: boolean, True where a query may attend to a key,
broadcastable to the scores' shape ``(batch, heads, Lq, Lk)``. Each check is its cases,
a reference and a table of mistakes (each a wrong implementation with the student's
signature, tried in table order); shape slips and properties are checked before.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from ._core import (
    Caught,
    Hint,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_dtype,
    expect_tensor,
    fail,
    first_difference,
    name_mistake,
)

# ----------------------------------------------------------------------------- helpers


def _expect_bool_mask(mask, shape, what: str) -> torch.Tensor:
    """A boolean tensor of exactly ``shape``, or a failure that says why not."""
    mask = expect_tensor(mask, what)
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            fail(f"{what} has dtype {mask.dtype}; it must be torch.bool. A float mask is not a "
                 "filter: PyTorch adds a float mask to the scores, so 1.0 and 0.0 would nudge "
                 "the scores instead of blocking keys. Build the mask with a comparison "
                 "(`<`, `==`) or `&`, which give bool tensors.")
        fail(f"{what} has dtype {mask.dtype}; it must be torch.bool (True = may attend), "
             "e.g. the result of a comparison, or `.bool()`.")
    if tuple(mask.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}.")
    return mask


# ----------------------------------------------------------------------------- 4.1


def _lengths_variant(lengths, max_len=None, *, compare="<", dtype=None, axes="keys",
                     longest="max"):
    """padding_mask_from_lengths with one option per mistake (defaults: the right answer)."""
    if max_len is None:
        max_len = int(lengths.max() if longest == "max" else lengths[0])
    if longest == "ignore max_len":
        max_len = int(lengths.max())
    positions, n = torch.arange(max_len), lengths[:, None]
    mask = {"<": positions < n, ">=": positions >= n, "<=": positions <= n,
            "< n - 1": positions < n - 1}[compare]  # (batch, L)
    mask = {"keys": mask[:, None, None, :], "none": mask, "queries": mask[:, None, :, None]}[axes]
    return mask if dtype is None else mask.to(dtype)


_LENGTHS = [
    Mistake("is True at padding and False at real tokens: the polarity is inverted. In this "
            "book (and in F.scaled_dot_product_attention) True means 'may attend', so real "
            "tokens are True.", partial(_lengths_variant, compare=">=")),
    Mistake("marks one position too many in each row: `<=` instead of `<`? A sequence of "
            "length n occupies positions 0 ... n-1, so position n is already padding.",
            partial(_lengths_variant, compare="<=")),
    Mistake("marks one real token too few in each row: positions 0 ... n-1 are real for a "
            "sequence of length n (compare with `< lengths`).",
            partial(_lengths_variant, compare="< n - 1")),
    Caught(partial(_lengths_variant, axes="none"),
           r"shape \(3, 5\), expected \(3, 1, 1, 5\): add a head axis and a query axis"),
    Caught(partial(_lengths_variant, axes="queries"), "it is on the query axis"),
    Caught(partial(_lengths_variant, dtype=torch.float32),
           "dtype torch.float32; it must be torch.bool. A float mask is not a filter"),
    Caught(partial(_lengths_variant, dtype=torch.long), "dtype torch.int64"),
    Caught(partial(_lengths_variant, longest="ignore max_len"), "it must have max_len = 5"),
    Caught(partial(_lengths_variant, longest="first"),
           r"the length of the first sequence: .*sorted longest first"),
]


def _lengths_shape(got, expected, lengths, max_len, length, where) -> None:
    """The usual shape slips of a bool padding mask, named."""
    if got.dtype != torch.bool or tuple(got.shape) == tuple(expected.shape):
        return
    batch, shape = len(lengths), tuple(got.shape)
    if shape == (batch, length):
        fail(f"your mask (for {where}) has shape {shape}, expected {tuple(expected.shape)}: add "
             "a head axis and a query axis, `mask[:, None, None, :]`, so that it broadcasts "
             "against scores of shape (batch, heads, Lq, Lk). Without them (batch, L) lines "
             "up with (Lq, Lk).")
    if got.dim() == 4 and got.shape[0] == batch and got.shape[-1] == 1:
        fail(f"your mask (for {where}) has shape {shape}: it is on the query axis. Padding "
             "hides keys, the last axis of the scores (batch, heads, Lq, Lk), so the shape is "
             "(batch, 1, 1, L).")
    if max_len is None and got.dim() == 4 and got.shape[-1] == int(lengths[0]):
        fail(f"your mask (for {where}) has {got.shape[-1]} positions, the length of the first "
             "sequence: does your code assume the lengths are sorted longest first? A batch "
             "can come in any order; with max_len left out, use the longest length, "
             f"lengths.max() = {length}.")
    if got.dim() == 4 and got.shape[-1] == int(lengths.max()) != length:
        fail(f"your mask (for {where}) has {got.shape[-1]} positions, the longest length; it "
             f"must have max_len = {length}: a padded batch can be longer than its longest "
             "sequence, and the mask has to match the token tensor.")


@exercise("4.1", "A padding mask from lengths",
          mistakes={"padding_mask_from_lengths": _LENGTHS})
def check_padding_mask_from_lengths(padding_mask_from_lengths):
    expect_callable(padding_mask_from_lengths, "your mask function",
                    "check_padding_mask_from_lengths(padding_mask_from_lengths)")
    cases = [
        (torch.tensor([3, 1, 4]), 5),  # odd length, every row padded
        (torch.tensor([2]), 2),  # batch 1, no padding at all
        (torch.tensor([0, 6, 2, 6]), 6),  # an empty sequence and two full ones
        (torch.tensor([1, 7]), 9),  # max_len longer than the longest sequence
        (torch.tensor([4, 2, 3]), None),  # max_len left out: the longest length, 4
        (torch.tensor([2, 5, 3]), None),  # ...and the longest is not the first
        (torch.tensor([2, 4, 1]), 6),  # not sorted longest first
    ]
    for lengths, max_len in cases:
        length = int(lengths.max()) if max_len is None else max_len
        expected = _lengths_variant(lengths, length)
        args = (lengths.clone(),) if max_len is None else (lengths.clone(), max_len)
        got = call(padding_mask_from_lengths, *args, what="padding_mask_from_lengths")
        where = f"lengths {lengths.tolist()}, max_len {max_len}"
        got = expect_tensor(got, f"your mask (for {where})")
        _lengths_shape(got, expected, lengths, max_len, length, where)
        got = _expect_bool_mask(got, expected.shape, f"your mask (for {where})")
        if not torch.equal(got, expected):
            name_mistake(got, _LENGTHS, lengths, length, prefix=f"your mask (for {where}) ",
                         general=f"your mask (for {where}) differs from the reference: "
                         f"{first_difference(got, expected)}. Position p of sequence b is a "
                         "real token exactly when p < lengths[b].")


# ----------------------------------------------------------------------------- 4.2


def _packed_reference(segment_ids: torch.Tensor) -> torch.Tensor:
    """Written as loops on purpose: an independent statement of the rule."""
    batch, length = segment_ids.shape
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(i + 1):
                real = bool(segment_ids[b, j] != 0)
                mask[b, 0, i, j] = real and bool(segment_ids[b, j] == segment_ids[b, i])
    return mask


def _packed_parts(segment_ids: torch.Tensor):
    length = segment_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (batch, 1, L, L)
    real = (segment_ids != 0)[:, None, None, :]  # (batch, 1, 1, L)
    shape = same.shape
    return causal.expand(shape), same, real.expand(shape)


def _segments(*documents_per_row) -> torch.Tensor:
    """Rows built from document lengths; a trailing 0 entry is the padding length."""
    rows = []
    for documents in documents_per_row:
        *docs, padding = documents
        row = [doc for doc, size in enumerate(docs, 1) for _ in range(size)] + [0] * padding
        rows.append(row)
    return torch.tensor(rows)


def _random_segments(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        row, doc = [], 1
        padding = int(torch.randint(0, length // 2, (1,), generator=generator))
        while len(row) < length - padding:
            size = int(torch.randint(1, 5, (1,), generator=generator))
            row += [doc] * min(size, length - padding - len(row))
            doc += 1
        rows.append(row + [0] * padding)
    return torch.tensor(rows)


def _packed_variant(segment_ids, combine=lambda c, s, r: c & s & r):
    """packed_causal_mask with the three masks (causal, same document, real key) combined
    by ``combine`` (the default gives the right answer)."""
    return combine(*_packed_parts(segment_ids))


def _packed(combine):
    return partial(_packed_variant, combine=combine)


def _no_head_axis_on_same(segment_ids):  # (batch, L, L) & (batch, 1, 1, L): batch x batch
    causal, same, real = _packed_parts(segment_ids)
    return causal[:, 0] & same[:, 0] & real


_OR = ("lets through keys that only one of the masks allows: the masks are combined with "
       "`|` (OR). A key must pass all three (causal, same document, not padding), so combine "
       "them with `&` (AND).")
_PACKED = [
    Mistake("is the exact opposite of the expected one: the polarity is inverted. True means "
            "'may attend'.", _packed(lambda c, s, r: ~(c & s & r))),
    *[Mistake(_OR, _packed(combine)) for combine in (
        lambda c, s, r: c | s | r,
        lambda c, s, r: c | (s & r),
        lambda c, s, r: (c & r) | s,
        lambda c, s, r: (c & s) | r,
        lambda c, s, r: c | s,
        lambda c, s, r: (c | s) & r,
        lambda c, s, r: (c | r) & s,
        lambda c, s, r: (s | r) & c,
    )],
    Mistake("lets a token attend to later tokens of its document: the causal mask is missing, "
            "so the decoder would peek at the tokens it has to predict.",
            _packed(lambda c, s, r: s & r)),
    Mistake("lets a token attend to earlier documents in the same row: compare segment ids so "
            "that only pairs in the same document remain.", _packed(lambda c, s, r: c & r)),
    Mistake("lets padding positions attend to other padding positions: the padding mask "
            "(segment id 0 = padding) is missing. A padding key must be blocked for every "
            "query.", _packed(lambda c, s, r: c & s)),
    Mistake("blocks the diagonal: a token may attend to itself (key j <= query i, not j < i); "
            "otherwise the first token of every document has nothing to attend to.",
            _packed(lambda c, s, r: c.tril(-1) & s & r), expect=r"blocks the diagonal.*not j < i"),
    Caught(_no_head_axis_on_same,
           r"shape \(2, 2, 7, 7\).*every sequence gets paired with every other"),
    Caught(_packed(lambda c, s, r: (c & s & r)[:, 0]), "add the head axis"),
    Caught(_packed(lambda c, s, r: (c & s & r).float()), "A float mask is not a filter"),
    Caught(_packed(lambda c, s, r: c.transpose(-2, -1) & s & r), "peeks at the future"),
]


def _packed_shape(got, expected, batch: int, length: int) -> None:
    if got.dtype != torch.bool or tuple(got.shape) == tuple(expected.shape):
        return
    if tuple(got.shape) == (batch, batch, length, length) and batch > 1:
        fail(f"your mask has shape {tuple(got.shape)}, expected {tuple(expected.shape)}: a "
             "(batch, L, L) tensor was combined with a (batch, 1, 1, L) one. Broadcasting "
             "lines shapes up from the right, so (batch, L, L) acts as (1, batch, L, L) and "
             "every sequence gets paired with every other. Give the same-document mask its "
             "head axis first: `same[:, None]`.")
    if tuple(got.shape) == (batch, length, length):
        fail(f"your mask has shape {tuple(got.shape)}, expected {tuple(expected.shape)}: add "
             "the head axis, (batch, 1, L, L), so that it broadcasts over heads.")


def _packed_leaks(got, expected, segment_ids, where) -> None:
    """What a mask no mistake of the table explains lets through, in words."""
    causal, same, _ = _packed_parts(segment_ids)
    if (got & ~causal).any():
        fail(f"your mask (for {where}) allows some keys after their query "
             f"({first_difference(got, expected)}): the decoder peeks at the future.")
    if (got & ~same).any():
        fail(f"your mask (for {where}) allows pairs from different documents "
             f"({first_difference(got, expected)}).")
    fail(f"your mask (for {where}) differs from the reference: "
         f"{first_difference(got, expected)}. A query i may attend a key j when j <= i, "
         "both are in the same document and the key is not padding.")


@exercise("4.2", "A decoder mask for packed sequences", mistakes={"packed_causal_mask": _PACKED})
def check_packed_causal_mask(packed_causal_mask):
    expect_callable(packed_causal_mask, "your mask function",
                    "check_packed_causal_mask(packed_causal_mask)")
    generator = torch.Generator().manual_seed(4)
    cases = [
        _segments((3, 2, 2), (2, 4, 1)),  # two documents per row, different layouts
        _segments((1, 1, 1, 2), (5, 0), (2, 1, 2, 0)),  # one-token documents; rows without padding
        _segments((5, 0)),  # batch 1, a single document: a plain causal mask
        _random_segments(generator, 3, 11),
        _random_segments(generator, 2, 16),
    ]
    for segment_ids in cases:
        batch, length = segment_ids.shape
        expected = _packed_reference(segment_ids)
        where = f"segment_ids {segment_ids.tolist()}"
        got = call(packed_causal_mask, segment_ids.clone(), what="packed_causal_mask")
        got = expect_tensor(got, f"your mask (for {where})")
        _packed_shape(got, expected, batch, length)
        got = _expect_bool_mask(got, expected.shape, f"your mask (for {where})")
        if not torch.equal(got, expected):
            name_mistake(got, _PACKED, segment_ids, prefix=f"your mask (for {where}) ")
            _packed_leaks(got, expected, segment_ids, where)


# ----------------------------------------------------------------------------- 4.3


def _masked_softmax_reference(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1):
    # chapter 2's finite fill: no -inf, so no 0/0 forwards or backwards
    weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)
    return weights.masked_fill(~mask, 0.0)  # empty rows, uniform after the softmax, become 0


def _ms_variant(scores, mask, *, fill="finfo", zero=True, dim=-1, invert=False):
    """masked_softmax with one option per mistake (the defaults give the right answer)."""
    mask = ~mask if invert else mask
    if fill == "after":  # the mask applied after the softmax
        return torch.softmax(scores, dim=-1) * mask
    value = {"finfo": torch.finfo(scores.dtype).min, "-inf": float("-inf"), "-1e9": -1e9}[fill]
    weights = torch.softmax(scores.masked_fill(~mask, value), dim=dim)
    return weights.masked_fill(~mask, 0.0) if zero else weights


def _uniform_empty_rows(values, scores, mask) -> bool:
    empty = ~mask.expand(scores.shape).any(dim=-1, keepdim=True).expand(scores.shape)
    atol = 2e-3 if scores.dtype == torch.float16 else 1e-6
    uniform = torch.full_like(values, 1.0 / scores.size(-1))
    return bool(empty.any()) and torch.allclose(values[empty], uniform[empty], atol=atol)


def _softmax_cases(generator: torch.Generator):
    def randn(*shape, dtype=torch.float32, scale=3.0, shift=0.0):
        return (scale * torch.randn(*shape, generator=generator) + shift).to(dtype)

    lengths = torch.tensor([5, 2, 0])  # the last sequence is all padding
    padding = (torch.arange(5) < lengths[:, None])[:, None, None, :]  # (3, 1, 1, 5)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()  # (4, 4)
    left = torch.tensor([[False, False, True, True]])[:, None, None, :]  # left padding
    random = torch.rand(2, 1, 3, 7, generator=generator) < 0.5  # some rows fully masked
    random[0, 0, 0] = False
    return [
        (randn(3, 2, 4, 5), padding),  # a padding mask; one sequence fully masked
        (randn(4, 4), causal),  # a square causal mask: the wrong axis is not a shape error
        (randn(1, 2, 4, 4), left & causal),  # left padding: the first two rows are empty
        (randn(2, 3, 3, 7), random),  # Lq != Lk, an arbitrary mask
        (randn(2, 2, 4, 4, dtype=torch.float16), left & causal),  # half precision
        (randn(2, 3, 7, scale=3e4, shift=-6e4), random[0]),  # scores far below a -1e4 fill
    ]


_MASKED_SOFTMAX = [
    Mistake("are uniform in rows where every key is blocked: filling with a large negative "
            "number (-1e9, finfo.min) makes every score of such a row equal, so the softmax "
            "spreads the row evenly over keys that are all blocked. Those rows must be all "
            "zeros.", partial(_ms_variant, fill="-1e9", zero=False), symptom=_uniform_empty_rows),
    Mistake("are zero at blocked keys but the rows no longer sum to 1: the mask was applied "
            "after the softmax. Block the scores (-inf) before the softmax, so the allowed "
            "keys share all of the weight.", partial(_ms_variant, fill="after")),
    Mistake("put all the weight on the blocked keys: the mask polarity is inverted. True "
            "means 'may attend'.", partial(_ms_variant, invert=True)),
    Mistake("are normalised over the queries: the softmax goes over the keys, the last axis "
            "(dim=-1).", partial(_ms_variant, dim=-2), expect=r"normalised over the queries.*dim=-1"),
]


def _nan_to_num(scores, mask):
    additive = torch.zeros_like(scores).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores + additive, dim=-1).nan_to_num(0.0)


def _where_isnan(scores, mask):
    weights = _ms_variant(scores, mask, fill="-inf", zero=False)
    return torch.where(torch.isnan(weights), 0.0, weights)


_HIDDEN_NAN = r"backward pass goes through NaN.*set_detect_anomaly.*SoftmaxBackward0.*finfo"
_MASKED_SOFTMAX_CAUGHT = [
    Caught(partial(_ms_variant, fill="-inf", zero=False),
           "NaN in rows where every key is blocked: .* 0/0"),
    Caught(partial(_ms_variant, zero=False), "uniform in rows where every key is blocked"),
    Caught(lambda s, m: _ms_variant(s + (~m) * float("-inf"), m),
           "NaN in rows that do have allowed keys: .*0 \\* -inf is NaN"),
    Caught(_nan_to_num, "gradient with respect to the scores is NaN"),
    Caught(lambda s, m: _masked_softmax_reference(s.detach(), m),
           "not connected to the scores in the autograd graph"),
    Caught(partial(_ms_variant, fill="-1e9"), "-1e9 does not fit in float16"),
    Caught(partial(_ms_variant, fill="-inf"), _HIDDEN_NAN),
    Caught(_where_isnan, _HIDDEN_NAN),
    Caught(lambda s, m: _ms_variant(s.float(), m), "have dtype torch.float32 for torch.float16 scores"),
    Caught(lambda s, m: torch.softmax(s.masked_fill(~m, -1e4), -1).masked_fill(~m, 0.0),
           "differ from softmax over the allowed keys"),
]
_FLOAT16_HINT = Hint(Exception, "overflow", "masked_softmax crashed on float16 scores: a "
                     "constant like -1e9 does not fit in float16 (its largest magnitude is "
                     "65504). Fill with torch.finfo(scores.dtype).min, which fits every dtype, "
                     "and zero the blocked positions after the softmax.")


def _check_no_hidden_nan(masked_softmax, scores, mask, upstream, where: str) -> None:
    """Probe: no step of the backward pass produces NaN (anomaly detection on)."""
    fresh = scores.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns with the forward's traceback
        with torch.autograd.set_detect_anomaly(True):
            got = call(masked_softmax, fresh, mask, what="masked_softmax")
            try:
                torch.autograd.grad((got * upstream).sum(), fresh)
            except RuntimeError as error:
                if "nan" not in str(error).lower():
                    raise
                found = str(error).split(".")[0]
                fail(f"your weights and their gradient (for {where}) come out finite, but "
                     "the backward pass goes through NaN on the way (under "
                     f"torch.autograd.set_detect_anomaly(True): {found}). A softmax over a "
                     "row of -inf is NaN, its backward is NaN too, and a later masked_fill "
                     "or torch.where only happens to throw that NaN away. Fill the blocked "
                     "scores with a finite value, torch.finfo(scores.dtype).min, as the "
                     "chapter does, then zero the blocked positions after the softmax.")


def _masked_softmax_forward(got, scores, mask, where: str, atol: float) -> None:
    """The weights: shape, dtype, NaN, then the mistakes of the table, then the reference."""
    got = expect_tensor(got, f"your weights (for {where})")
    if tuple(got.shape) != tuple(scores.shape):
        fail(f"your weights (for {where}) have shape {tuple(got.shape)}, expected the shape of "
             f"the scores, {tuple(scores.shape)}.")
    expect_dtype(got, scores.dtype, f"your weights (for {where}) have dtype {got.dtype} for "
                 f"{scores.dtype} scores: keep the scores' dtype.")
    allowed = mask.expand(scores.shape)
    empty = ~allowed.any(dim=-1, keepdim=True).expand(scores.shape)  # rows with no key
    values = got.detach().float()
    if torch.isnan(values[~empty]).any():
        fail(f"your weights (for {where}) are NaN in rows that do have allowed keys: did you "
             "make an additive mask by multiplying, like `(~mask) * float('-inf')`? "
             "0 * -inf is NaN. Use masked_fill or torch.where to put -inf where blocked.")
    if torch.isnan(values).any():
        fail(f"your weights (for {where}) are NaN in rows where every key is blocked: the "
             "softmax of a row of -inf is 0/0. Fill the blocked scores with a finite "
             "value, torch.finfo(scores.dtype).min, instead of -inf (the chapter's way), "
             "and set the blocked positions to 0 after the softmax.")
    expected = _masked_softmax_reference(scores.detach(), mask).float()
    if torch.allclose(values, expected, atol=atol, equal_nan=True):
        return
    name_mistake(values, _MASKED_SOFTMAX, scores.detach(), mask, pick=lambda w: w.float(),
                 prefix=f"your weights (for {where}) ", atol=atol, rtol=1e-5)
    if (values[~allowed] != 0).any():
        fail(f"your weights (for {where}) are not zero at blocked keys: a blocked key must "
             "get exactly zero weight.")
    worst = (values - expected).abs().max().item()
    fail(f"your weights (for {where}) differ from softmax over the allowed keys "
         f"(largest difference {worst:.3g}).")


def _masked_softmax_backward(masked_softmax, got, scores, mask, upstream, where, atol) -> None:
    """The gradient: connected, finite, NaN-free on the way, equal to the reference's."""
    if not got.requires_grad:
        fail(f"your weights (for {where}) are not connected to the scores in the autograd "
             "graph: no gradient would reach the queries and keys. Avoid .detach() or "
             "building the result from new tensors.")
    (grad,) = torch.autograd.grad((got * upstream).sum(), scores)
    if torch.isnan(grad).any():
        fail(f"your weights (for {where}) are right, but their gradient with respect to the "
             "scores is NaN in the rows where every key is blocked: hiding the softmax's NaN "
             "afterwards (nan_to_num) does not stop backward from going through it, and an "
             "added -inf mask hands that NaN on to the scores. Put -inf in with masked_fill "
             "(or torch.where), so that blocked scores get no gradient.")
    # ...and no step of it may produce NaN, even one that a later masked_fill or
    # torch.where discards: run the backward again under anomaly detection
    _check_no_hidden_nan(masked_softmax, scores, mask, upstream, where)
    scores_ref = scores.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(
        (_masked_softmax_reference(scores_ref, mask) * upstream).sum(), scores_ref)
    if not torch.allclose(grad.float(), grad_ref.float(), atol=10 * atol, rtol=1e-3):
        worst = (grad.float() - grad_ref.float()).abs().max().item()
        fail(f"the gradient of your weights (for {where}) differs from the reference "
             f"(largest difference {worst:.3g}): is part of the computation detached?")


@exercise("4.3", "A masked softmax that survives empty rows",
          mistakes={"masked_softmax": _MASKED_SOFTMAX + _MASKED_SOFTMAX_CAUGHT})
def check_masked_softmax(masked_softmax):
    expect_callable(masked_softmax, "your masked softmax", "check_masked_softmax(masked_softmax)")
    generator = torch.Generator().manual_seed(43)
    for scores, mask in _softmax_cases(generator):
        where = f"scores {tuple(scores.shape)} {scores.dtype}, mask {tuple(mask.shape)}"
        half = scores.dtype == torch.float16
        atol = 2e-3 if half else 1e-6
        scores = scores.clone().requires_grad_(True)
        got = call(masked_softmax, scores, mask, what="masked_softmax",
                   hints=[_FLOAT16_HINT] if half else ())
        _masked_softmax_forward(got, scores, mask, where, atol)
        # the backward pass must stay finite too: a NaN gradient ruins the parameters
        upstream = torch.randn(scores.shape, generator=generator).to(scores.dtype)
        _masked_softmax_backward(masked_softmax, got, scores, mask, upstream, where, atol)


# ----------------------------------------------------------------------------- 4.4


def _mha_variant(torch_mha, query, key, value, mask, *, convert="inverted", need_weights=True):
    """run_torch_mha with one option per mistake (the defaults give the right answer)."""
    shape = (query.size(0), torch_mha.num_heads, query.size(1), key.size(1))
    flat = mask.expand(shape).reshape(shape[0] * shape[1], *shape[2:])
    attn_mask = {
        "inverted": lambda: ~flat,
        "as is": lambda: flat,
        "heads first": lambda: ~mask.expand(shape).transpose(0, 1).reshape(flat.shape),
        "float": lambda: (~flat).float(),
        "float as is": lambda: flat.float(),
    }[convert]()
    return torch_mha(query, key, value, attn_mask=attn_mask, need_weights=need_weights)[0]


def _mha_mistake(message: str, convert: str, **more) -> Mistake:
    """Named when the output is nn.MultiheadAttention's with this mask, with or without
    need_weights (PyTorch may treat rows with no key differently in the two paths)."""
    wrong = partial(_mha_variant, convert=convert)

    def symptom(got, *args):
        with torch.no_grad():
            return any(torch.allclose(got, wrong(*args, need_weights=need), atol=1e-5,
                                      equal_nan=True) for need in (False, True))

    return Mistake(message, wrong, symptom=symptom, **more)


_FLOAT_MASK = ("comes from a float mask: nn.MultiheadAttention adds a float attn_mask to the "
               "scores (0 keeps, -inf blocks), so 0/1 values do not block anything. Pass a "
               "bool mask, True where blocked.")
_MHA = [
    _mha_mistake("is what nn.MultiheadAttention gives with the mask as it is: "
                 "nn.MultiheadAttention's boolean attn_mask means True = BLOCKED, the opposite "
                 "of this book and of F.scaled_dot_product_attention. Invert it: ~mask.",
                 "as is"),
    _mha_mistake("uses the masks of the wrong sequences: the 3-D attn_mask of "
                 "nn.MultiheadAttention has batch * heads entries ordered batch first (entry "
                 "b * num_heads + h), which is what mask.expand(batch, heads, Lq, Lk).reshape("
                 "batch * heads, Lq, Lk) gives; `.repeat(num_heads, 1, 1)` puts the heads "
                 "first.", "heads first", expect=r"masks of the wrong sequences.*b \* num_heads \+ h"),
    _mha_mistake(_FLOAT_MASK, "float"),
    _mha_mistake(_FLOAT_MASK, "float as is"),
]


def _repeated(torch_mha, query, key, value, mask):
    b, h, lq, lk = query.size(0), torch_mha.num_heads, query.size(1), key.size(1)
    return torch_mha(query, key, value, attn_mask=(~mask.expand(b, h, lq, lk))[:, 0].repeat(
        h, 1, 1))[0]


def _key_length_from_query(torch_mha, query, key, value, mask):
    b, h, lq = query.size(0), torch_mha.num_heads, query.size(1)
    attn_mask = ~mask.expand(b, h, lq, lq).reshape(b * h, lq, lq)
    return torch_mha(query, key, value, attn_mask=attn_mask)[0]


_MHA_CAUGHT = [
    Caught(_repeated, r"masks of the wrong sequences.*b \* num_heads \+ h"),
    Caught(_key_length_from_query,
           r"raised RuntimeError: .* Lq = 4 and Lk = 6: .*take Lk from key.size\(1\)"),
    Caught(lambda mha, q, k, v, m: (_mha_variant(mha, q, k, v, m), None), "returns a tuple"),
]


def _mha_cases(generator: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    pad = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).bool()
    pad7 = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]]).bool()[:, None, None, :]
    causal7 = torch.ones(7, 7, dtype=torch.bool).tril()
    per_head = torch.rand(2, 4, 3, 5, generator=generator) < 0.6
    per_head[..., 0] = True  # every query keeps at least one key
    # (d_model, heads, query, key, mask)
    return [
        (8, 2, randn(2, 5, 8), None, torch.ones(5, 5, dtype=torch.bool).tril()),  # causal
        (8, 2, randn(3, 4, 8), randn(3, 6, 8), pad[:, None, None, :]),  # cross, Lq != Lk
        (12, 3, randn(2, 7, 12), None, pad7 & causal7),  # decoder: padding & causal
        (8, 4, randn(2, 3, 8), randn(2, 5, 8), per_head),  # a different mask per head
        (6, 3, randn(1, 4, 6), None, torch.ones(1, 1, 1, 4, dtype=torch.bool)),  # batch 1
    ]


def _mha_case(run_torch_mha, d_model, heads, query, key, mask) -> None:
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(d_model + heads)
        mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
    key = query if key is None else key
    q_len, k_len = query.size(1), key.size(1)
    where = (f"query {tuple(query.shape)}, key {tuple(key.shape)}, mask {tuple(mask.shape)}, "
             f"{heads} heads")
    hint = Hint(RuntimeError, "", f"Here the query and the keys have different lengths, Lq = "
                f"{q_len} and Lk = {k_len}: the mask is (batch * heads, Lq, Lk), so take Lk "
                "from key.size(1), not from the query.")
    got = call(run_torch_mha, mha, query, key, key, mask.clone(), what="run_torch_mha",
               hints=[hint] if q_len != k_len else ())
    if isinstance(got, tuple):
        fail(f"your function returns a tuple (for {where}): nn.MultiheadAttention returns "
             "(output, weights); return only the output.")
    got = expect_tensor(got, f"your output (for {where})")
    with torch.no_grad():
        expected = _mha_variant(mha, query, key, key, mask, need_weights=False)
    if tuple(got.shape) != tuple(expected.shape):
        fail(f"your output (for {where}) has shape {tuple(got.shape)}, expected "
             f"{tuple(expected.shape)} (batch, Lq, d_model).")
    got = got.detach()
    if torch.allclose(got, expected, atol=1e-5):
        return
    name_mistake(got, _MHA, mha, query, key, key, mask, prefix=f"your output (for {where}) ")
    if torch.isnan(got).any():
        fail(f"your output (for {where}) contains NaN: nn.MultiheadAttention gives NaN for a "
             "query whose keys are all blocked. Every query here has an allowed key, so "
             "the mask passed must be wrong (inverted, or for the wrong sequence or head?).")
    worst = (got - expected).abs().max().item()
    fail(f"your output (for {where}) differs from nn.MultiheadAttention with the correctly "
         f"converted mask (largest difference {worst:.3g}). The mask must be broadcast to "
         "(batch, heads, Lq, Lk), inverted, and reshaped to (batch * heads, Lq, Lk).")


@exercise("4.4", "Book masks for nn.MultiheadAttention",
          mistakes={"run_torch_mha": _MHA + _MHA_CAUGHT})
def check_run_torch_mha(run_torch_mha):
    expect_callable(run_torch_mha, "your function", "check_run_torch_mha(run_torch_mha)")
    generator = torch.Generator().manual_seed(44)
    for d_model, heads, query, key, mask in _mha_cases(generator):
        _mha_case(run_torch_mha, d_model, heads, query, key, mask)
