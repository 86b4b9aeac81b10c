"""Checks for the exercises of chapter 4, Masking.

Masks follow the book's convention: boolean, True where a query may attend to a key,
broadcastable to the scores' shape ``(batch, heads, Lq, Lk)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._core import CheckFailure, call, exercise, expect_callable, expect_tensor, fail

# ----------------------------------------------------------------------------- helpers


def _expect_bool_mask(mask, shape, what: str) -> torch.Tensor:
    """A boolean tensor of exactly ``shape``, or a failure that says why not."""
    mask = expect_tensor(mask, what)
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            fail(
                f"{what} has dtype {mask.dtype}; it must be torch.bool. A float mask is not a "
                "filter: PyTorch adds a float mask to the scores, so 1.0 and 0.0 would nudge "
                "the scores instead of blocking keys. Build the mask with a comparison "
                "(`<`, `==`) or `&`, which give bool tensors."
            )
        fail(
            f"{what} has dtype {mask.dtype}; it must be torch.bool (True = may attend), "
            "e.g. the result of a comparison, or `.bool()`."
        )
    if tuple(mask.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}.")
    return mask


def _first_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    index = tuple(int(i) for i in (got != expected).nonzero()[0])
    return f"at index {index} you have {bool(got[index])}, expected {bool(expected[index])}"


# ----------------------------------------------------------------------------- 4.1


def _mask_from_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    positions = torch.arange(max_len)  # (L,)
    return (positions < lengths[:, None])[:, None, None, :]  # (batch, 1, 1, L)


@exercise("4.1", "A padding mask from lengths")
def check_padding_mask_from_lengths(padding_mask_from_lengths):
    expect_callable(
        padding_mask_from_lengths,
        "your mask function",
        "check_padding_mask_from_lengths(padding_mask_from_lengths)",
    )
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
        expected = _mask_from_lengths(lengths, length)
        args = (lengths.clone(),) if max_len is None else (lengths.clone(), max_len)
        got = call(padding_mask_from_lengths, *args, what="padding_mask_from_lengths")
        where = f"lengths {lengths.tolist()}, max_len {max_len}"
        got = expect_tensor(got, f"your mask (for {where})")
        batch = len(lengths)
        if got.dtype == torch.bool and tuple(got.shape) != tuple(expected.shape):
            if tuple(got.shape) == (batch, length):
                fail(
                    f"your mask (for {where}) has shape {tuple(got.shape)}, expected "
                    f"{tuple(expected.shape)}: add a head axis and a query axis, "
                    "`mask[:, None, None, :]`, so that it broadcasts against scores of shape "
                    "(batch, heads, Lq, Lk). Without them (batch, L) lines up with (Lq, Lk)."
                )
            if got.dim() == 4 and got.shape[0] == batch and got.shape[-1] == 1:
                fail(
                    f"your mask (for {where}) has shape {tuple(got.shape)}: it is on the query "
                    "axis. Padding hides keys, the last axis of the scores "
                    "(batch, heads, Lq, Lk), so the shape is (batch, 1, 1, L)."
                )
            if max_len is None and got.dim() == 4 and got.shape[-1] == int(lengths[0]):
                fail(
                    f"your mask (for {where}) has {got.shape[-1]} positions, the length of "
                    "the first sequence: does your code assume the lengths are sorted "
                    "longest first? A batch can come in any order; with max_len left out, "
                    f"use the longest length, lengths.max() = {length}."
                )
            if got.dim() == 4 and got.shape[-1] == int(lengths.max()) != length:
                fail(
                    f"your mask (for {where}) has {got.shape[-1]} positions, the longest length; "
                    f"it must have max_len = {length}: a padded batch can be longer than its "
                    "longest sequence, and the mask has to match the token tensor."
                )
        got = _expect_bool_mask(got, expected.shape, f"your mask (for {where})")
        if torch.equal(got, expected):
            continue
        positions = torch.arange(length)
        if torch.equal(got, ~expected):
            fail(
                f"your mask (for {where}) is True at padding and False at real tokens: the "
                "polarity is inverted. In this book (and in F.scaled_dot_product_attention) "
                "True means 'may attend', so real tokens are True."
            )
        if torch.equal(got, (positions <= lengths[:, None])[:, None, None, :]):
            fail(
                f"your mask (for {where}) marks one position too many in each row: `<=` "
                "instead of `<`? A sequence of length n occupies positions 0 ... n-1, so "
                "position n is already padding."
            )
        if torch.equal(got, (positions < lengths[:, None] - 1)[:, None, None, :]):
            fail(
                f"your mask (for {where}) marks one real token too few in each row: positions "
                "0 ... n-1 are real for a sequence of length n (compare with `< lengths`)."
            )
        fail(
            f"your mask (for {where}) differs from the reference: {_first_difference(got, expected)}. "
            "Position p of sequence b is a real token exactly when p < lengths[b]."
        )


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


@exercise("4.2", "A decoder mask for packed sequences")
def check_packed_causal_mask(packed_causal_mask):
    expect_callable(
        packed_causal_mask, "your mask function", "check_packed_causal_mask(packed_causal_mask)"
    )
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
        if got.dtype == torch.bool and tuple(got.shape) != tuple(expected.shape):
            if tuple(got.shape) == (batch, batch, length, length) and batch > 1:
                fail(
                    f"your mask has shape {tuple(got.shape)}, expected {tuple(expected.shape)}: "
                    "a (batch, L, L) tensor was combined with a (batch, 1, 1, L) one. "
                    "Broadcasting lines shapes up from the right, so (batch, L, L) acts as "
                    "(1, batch, L, L) and every sequence gets paired with every other. Give "
                    "the same-document mask its head axis first: `same[:, None]`."
                )
            if tuple(got.shape) == (batch, length, length):
                fail(
                    f"your mask has shape {tuple(got.shape)}, expected {tuple(expected.shape)}: "
                    "add the head axis, (batch, 1, L, L), so that it broadcasts over heads."
                )
        got = _expect_bool_mask(got, expected.shape, f"your mask (for {where})")
        if torch.equal(got, expected):
            continue
        causal, same, real = _packed_parts(segment_ids)
        future = ~causal
        if torch.equal(got, ~expected):
            fail(
                f"your mask (for {where}) is the exact opposite of the expected one: the "
                "polarity is inverted. True means 'may attend'."
            )
        combined_with_or = [
            causal | same | real,
            causal | (same & real),
            (causal & real) | same,
            (causal & same) | real,
            causal | same,
            (causal | same) & real,
            (causal | real) & same,
            (same | real) & causal,
        ]
        if any(torch.equal(got, candidate) for candidate in combined_with_or):
            fail(
                f"your mask (for {where}) lets through keys that only one of the masks allows: "
                "the masks are combined with `|` (OR). A key must pass all three (causal, same "
                "document, not padding), so combine them with `&` (AND)."
            )
        if torch.equal(got, same & real):
            fail(
                f"your mask (for {where}) lets a token attend to later tokens of its document: "
                "the causal mask is missing, so the decoder would peek at the tokens it has to "
                "predict."
            )
        if torch.equal(got, causal & real):
            fail(
                f"your mask (for {where}) lets a token attend to earlier documents in the same "
                "row: compare segment ids so that only pairs in the same document remain."
            )
        if torch.equal(got, causal & same):
            fail(
                f"your mask (for {where}) lets padding positions attend to other padding "
                "positions: the padding mask (segment id 0 = padding) is missing. A padding key "
                "must be blocked for every query."
            )
        if torch.equal(got, expected & ~torch.eye(length, dtype=torch.bool)):
            fail(
                f"your mask (for {where}) blocks the diagonal: a token may attend to itself "
                "(key j <= query i, not j < i); otherwise the first token of every document "
                "has nothing to attend to."
            )
        if (got & future).any():
            fail(
                f"your mask (for {where}) allows some keys after their query "
                f"({_first_difference(got, expected)}): the decoder peeks at the future."
            )
        if (got & ~same).any():
            fail(
                f"your mask (for {where}) allows pairs from different documents "
                f"({_first_difference(got, expected)})."
            )
        fail(
            f"your mask (for {where}) differs from the reference: "
            f"{_first_difference(got, expected)}. A query i may attend a key j when j <= i, "
            "both are in the same document and the key is not padding."
        )


# ----------------------------------------------------------------------------- 4.3


def _masked_softmax_reference(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1):
    # chapter 2's finite fill: no -inf, so no 0/0 forwards or backwards
    weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)
    return weights.masked_fill(~mask, 0.0)  # empty rows, uniform after the softmax, become 0


def _softmax_cases(generator: torch.Generator):
    def randn(*shape, dtype=torch.float32):
        return (3 * torch.randn(*shape, generator=generator)).to(dtype)

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
    ]


def _check_no_hidden_nan(masked_softmax, scores, mask, upstream, where: str) -> None:
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
                fail(
                    f"your weights and their gradient (for {where}) come out finite, but "
                    "the backward pass goes through NaN on the way (under "
                    f"torch.autograd.set_detect_anomaly(True): {found}). A softmax over a "
                    "row of -inf is NaN, its backward is NaN too, and a later masked_fill "
                    "or torch.where only happens to throw that NaN away. Fill the blocked "
                    "scores with a finite value, torch.finfo(scores.dtype).min, as the "
                    "chapter does, then zero the blocked positions after the softmax."
                )


@exercise("4.3", "A masked softmax that survives empty rows")
def check_masked_softmax(masked_softmax):
    expect_callable(masked_softmax, "your masked softmax", "check_masked_softmax(masked_softmax)")
    generator = torch.Generator().manual_seed(43)
    for scores, mask in _softmax_cases(generator):
        where = f"scores {tuple(scores.shape)} {scores.dtype}, mask {tuple(mask.shape)}"
        half = scores.dtype == torch.float16
        atol = 2e-3 if half else 1e-6
        scores = scores.clone().requires_grad_(True)
        try:
            got = call(masked_softmax, scores, mask, what="masked_softmax")
        except CheckFailure as failure:
            if half and "overflow" in str(failure.__cause__):
                fail(
                    "masked_softmax crashed on float16 scores: a constant like -1e9 does not "
                    "fit in float16 (its largest magnitude is 65504). Fill with "
                    "torch.finfo(scores.dtype).min, which fits every dtype, and zero the "
                    "blocked positions after the softmax."
                )
            raise
        got = expect_tensor(got, f"your weights (for {where})")
        if tuple(got.shape) != tuple(scores.shape):
            fail(
                f"your weights (for {where}) have shape {tuple(got.shape)}, expected the "
                f"shape of the scores, {tuple(scores.shape)}."
            )
        expected = _masked_softmax_reference(scores.detach(), mask)
        allowed = mask.expand(scores.shape)
        empty = ~allowed.any(dim=-1, keepdim=True).expand(scores.shape)  # rows with no key
        values = got.detach().float()

        def close(candidate, values=values, atol=atol):
            return torch.allclose(values, candidate.float(), atol=atol, equal_nan=True)

        if torch.isnan(values[~empty]).any():
            fail(
                f"your weights (for {where}) are NaN in rows that do have allowed keys: did you "
                "make an additive mask by multiplying, like `(~mask) * float('-inf')`? "
                "0 * -inf is NaN. Use masked_fill or torch.where to put -inf where blocked."
            )
        if torch.isnan(values).any():
            fail(
                f"your weights (for {where}) are NaN in rows where every key is blocked: the "
                "softmax of a row of -inf is 0/0. Fill the blocked scores with a finite "
                "value, torch.finfo(scores.dtype).min, instead of -inf (the chapter's way), "
                "and set the blocked positions to 0 after the softmax."
            )
        if empty.any():
            uniform = torch.full_like(values, 1.0 / scores.size(-1))
            if torch.allclose(values[empty], uniform[empty], atol=atol):
                fail(
                    f"your weights (for {where}) are uniform in rows where every key is "
                    "blocked: filling with a large negative number (-1e9, finfo.min) makes "
                    "every score of such a row equal, so the softmax spreads the row evenly "
                    "over keys that are all blocked. Those rows must be all zeros."
                )
        plain = torch.softmax(scores.detach().float(), dim=-1)
        if close(plain * allowed):
            fail(
                f"your weights (for {where}) are zero at blocked keys but the rows no longer "
                "sum to 1: the mask was applied after the softmax. Block the scores (-inf) "
                "before the softmax, so the allowed keys share all of the weight."
            )
        if close(_masked_softmax_reference(scores.detach(), ~mask)):
            fail(
                f"your weights (for {where}) put all the weight on the blocked keys: the mask "
                "polarity is inverted. True means 'may attend'."
            )
        if close(_masked_softmax_reference(scores.detach(), mask, dim=-2)):
            fail(
                f"your weights (for {where}) are normalised over the queries: the softmax "
                "goes over the keys, the last axis (dim=-1)."
            )
        if (values[~allowed] != 0).any():
            fail(
                f"your weights (for {where}) are not zero at blocked keys: a blocked key must "
                "get exactly zero weight."
            )
        if not close(expected):
            worst = (values - expected.float()).abs().max().item()
            fail(
                f"your weights (for {where}) differ from softmax over the allowed keys "
                f"(largest difference {worst:.3g})."
            )
        # the backward pass must stay finite too: a NaN gradient ruins the parameters
        upstream = torch.randn(scores.shape, generator=generator).to(scores.dtype)
        if not got.requires_grad:
            fail(
                f"your weights (for {where}) are not connected to the scores in the autograd "
                "graph: no gradient would reach the queries and keys. Avoid .detach() or "
                "building the result from new tensors."
            )
        (grad,) = torch.autograd.grad((got * upstream).sum(), scores)
        if torch.isnan(grad).any():
            fail(
                f"your weights (for {where}) are right, but their gradient with respect to the "
                "scores is NaN in the rows where every key is blocked: hiding the softmax's NaN "
                "afterwards (nan_to_num) does not stop backward from going through it, and an "
                "added -inf mask hands that NaN on to the scores. Put -inf in with masked_fill "
                "(or torch.where), so that blocked scores get no gradient."
            )
        # ...and no step of it may produce NaN, even one that a later masked_fill or
        # torch.where discards: run the backward again under anomaly detection
        _check_no_hidden_nan(masked_softmax, scores, mask, upstream, where)
        scores_ref = scores.detach().clone().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(
            (_masked_softmax_reference(scores_ref, mask) * upstream).sum(), scores_ref
        )
        if not torch.allclose(grad.float(), grad_ref.float(), atol=10 * atol, rtol=1e-3):
            worst = (grad.float() - grad_ref.float()).abs().max().item()
            fail(
                f"the gradient of your weights (for {where}) differs from the reference "
                f"(largest difference {worst:.3g}): is part of the computation detached?"
            )


# ----------------------------------------------------------------------------- 4.4


def _torch_mask(mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int):
    """The reference conversion: book mask -> nn.MultiheadAttention's 3-D attn_mask."""
    return ~mask.expand(batch, heads, q_len, k_len).reshape(batch * heads, q_len, k_len)


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


@exercise("4.4", "Book masks for nn.MultiheadAttention")
def check_run_torch_mha(run_torch_mha):
    expect_callable(run_torch_mha, "your function", "check_run_torch_mha(run_torch_mha)")
    generator = torch.Generator().manual_seed(44)
    for d_model, heads, query, key, mask in _mha_cases(generator):
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(d_model + heads)
            mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
        key = query if key is None else key
        batch, q_len, k_len = query.size(0), query.size(1), key.size(1)
        where = (
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, mask {tuple(mask.shape)}, "
            f"{heads} heads"
        )
        try:
            got = call(run_torch_mha, mha, query, key, key, mask.clone(), what="run_torch_mha")
        except CheckFailure as failure:
            if q_len != k_len and isinstance(failure.__cause__, RuntimeError):
                fail(
                    f"{failure} Here the query and the keys have different lengths, "
                    f"Lq = {q_len} and Lk = {k_len}: the mask is (batch * heads, Lq, Lk), "
                    "so take Lk from key.size(1), not from the query."
                )
            raise
        if isinstance(got, tuple):
            fail(
                f"your function returns a tuple (for {where}): nn.MultiheadAttention returns "
                "(output, weights); return only the output."
            )
        got = expect_tensor(got, f"your output (for {where})")

        def run(attn_mask, need_weights=False, mha=mha, query=query, key=key):
            with torch.no_grad():
                return mha(query, key, key, attn_mask=attn_mask, need_weights=need_weights)[0]

        shape = (batch, heads, q_len, k_len)
        expected = run(_torch_mask(mask, *shape))
        if tuple(got.shape) != tuple(expected.shape):
            fail(
                f"your output (for {where}) has shape {tuple(got.shape)}, expected "
                f"{tuple(expected.shape)} (batch, Lq, d_model)."
            )
        got = got.detach()
        if torch.allclose(got, expected, atol=1e-5):
            continue

        def same(candidate_mask, got=got, run=run):
            # with need_weights=True and False, PyTorch may treat rows with no key differently
            return any(
                torch.allclose(got, run(candidate_mask, need_weights), atol=1e-5, equal_nan=True)
                for need_weights in (False, True)
            )

        if same(~_torch_mask(mask, *shape)):
            fail(
                f"your output (for {where}) is what nn.MultiheadAttention gives with the mask "
                "as it is: nn.MultiheadAttention's boolean attn_mask means True = BLOCKED, the "
                "opposite of this book and of F.scaled_dot_product_attention. Invert it: ~mask."
            )
        heads_first = ~mask.expand(shape).transpose(0, 1).reshape(batch * heads, q_len, k_len)
        if same(heads_first):
            fail(
                f"your output (for {where}) uses the masks of the wrong sequences: the 3-D "
                "attn_mask of nn.MultiheadAttention has batch * heads entries ordered batch "
                "first (entry b * num_heads + h), which is what "
                "mask.expand(batch, heads, Lq, Lk).reshape(batch * heads, Lq, Lk) gives; "
                "`.repeat(num_heads, 1, 1)` puts the heads first."
            )
        for float_mask in (_torch_mask(mask, *shape).float(), (~_torch_mask(mask, *shape)).float()):
            if same(float_mask):
                fail(
                    f"your output (for {where}) comes from a float mask: nn.MultiheadAttention "
                    "adds a float attn_mask to the scores (0 keeps, -inf blocks), so 0/1 values "
                    "do not block anything. Pass a bool mask, True where blocked."
                )
        if torch.isnan(got).any():
            fail(
                f"your output (for {where}) contains NaN: nn.MultiheadAttention gives NaN for a "
                "query whose keys are all blocked. Every query here has an allowed key, so "
                "the mask passed must be wrong (inverted, or for the wrong sequence or head?)."
            )
        worst = (got - expected).abs().max().item()
        fail(
            f"your output (for {where}) differs from nn.MultiheadAttention with the correctly "
            f"converted mask (largest difference {worst:.3g}). The mask must be broadcast to "
            "(batch, heads, Lq, Lk), inverted, and reshaped to (batch * heads, Lq, Lk)."
        )
