"""The chapter 4 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_book import causal_mask, padding_mask, scaled_dot_product_attention
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch04 import (
    _masked_softmax_reference,
    _packed_reference,
    check_masked_softmax,
    check_packed_causal_mask,
    check_padding_mask_from_lengths,
    check_run_torch_mha,
)

# ----------------------------------------------------------------------------- 4.1


def _from_lengths(compare, dtype=None, axes=(slice(None), None, None, slice(None))):
    """A wrong answer family for 4.1: positions `compare` lengths, reshaped by `axes`."""

    def padding_mask_from_lengths(lengths, max_len=None):
        length = int(lengths.max()) if max_len is None else max_len
        mask = compare(torch.arange(length), lengths[:, None])[axes]
        return mask if dtype is None else mask.to(dtype)

    return padding_mask_from_lengths


def _longest_only(lengths, max_len=None):
    return (torch.arange(int(lengths.max())) < lengths[:, None])[:, None, None, :]


def _first_is_longest(lengths, max_len=None):
    if max_len is None:
        max_len = int(lengths[0])  # WRONG: the batch need not be sorted
    return (torch.arange(max_len) < lengths[:, None])[:, None, None, :]


LENGTH_MISTAKES = {
    "inverted": (_from_lengths(lambda p, n: p >= n), "polarity is inverted"),
    "<= instead of <": (_from_lengths(lambda p, n: p <= n), r"one position too many.*`<=`"),
    "one short": (_from_lengths(lambda p, n: p < n - 1), "one real token too few"),
    "no broadcast axes": (
        _from_lengths(lambda p, n: p < n, axes=(slice(None), slice(None))),
        r"shape \(3, 5\), expected \(3, 1, 1, 5\): add a head axis and a query axis",
    ),
    "query axis": (
        _from_lengths(lambda p, n: p < n, axes=(slice(None), None, slice(None), None)),
        "it is on the query axis",
    ),
    "float mask": (
        _from_lengths(lambda p, n: p < n, dtype=torch.float32),
        "dtype torch.float32; it must be torch.bool. A float mask is not a filter",
    ),
    "int mask": (_from_lengths(lambda p, n: p < n, dtype=torch.long), "dtype torch.int64"),
    "ignores max_len": (_longest_only, "it must have max_len = 5"),
    "assumes sorted longest first": (
        _first_is_longest,
        r"the length of the first sequence: .*sorted longest first",
    ),
}


@pytest.mark.parametrize("mistake", LENGTH_MISTAKES)
def test_padding_mask_from_lengths_names_the_mistake(mistake):
    wrong, message = LENGTH_MISTAKES[mistake]
    with pytest.raises(CheckFailure, match=message):
        check_padding_mask_from_lengths(wrong)


# ----------------------------------------------------------------------------- 4.2


def _packed(combine, head_axis=True):
    """A wrong answer family for 4.2: the three masks combined by `combine`."""

    def packed_causal_mask(segment_ids):
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (batch, L, L)
        if head_axis:
            same = same[:, None]
        real = padding_mask(segment_ids, 0)  # (batch, 1, 1, L)
        return combine(causal_mask(segment_ids.size(1)), same, real)

    return packed_causal_mask


PACKED_MISTAKES = {
    "inverted": (_packed(lambda c, s, r: ~(c & s & r)), "polarity is inverted"),
    "or instead of and": (_packed(lambda c, s, r: c | s & r), r"combined with `\|` \(OR\)"),
    "or, then and": (_packed(lambda c, s, r: (c | s) & r), r"combined with `\|` \(OR\)"),
    "no causal mask": (_packed(lambda c, s, r: s & r), "peek at the tokens it has to predict"),
    "no document mask": (_packed(lambda c, s, r: c & r), "earlier documents in the same row"),
    "no padding mask": (
        _packed(lambda c, s, r: c & s),
        "padding positions attend to other padding",
    ),
    "strict triangle": (
        _packed(lambda c, s, r: c.tril(-1) & s & r),
        r"blocks the diagonal.*not j < i",
    ),
    "batch paired with batch": (
        _packed(lambda c, s, r: c & s & r, head_axis=False),
        r"shape \(2, 2, 7, 7\).*every sequence gets paired with every other",
    ),
    "no head axis": (_packed(lambda c, s, r: (c & s & r)[:, 0]), "add the head axis"),
    "float mask": (_packed(lambda c, s, r: (c & s & r).float()), "A float mask is not a filter"),
    "transposed causal": (_packed(lambda c, s, r: c.T & s & r), "peeks at the future"),
}


@pytest.mark.parametrize("mistake", PACKED_MISTAKES)
def test_packed_causal_mask_names_the_mistake(mistake):
    wrong, message = PACKED_MISTAKES[mistake]
    with pytest.raises(CheckFailure, match=message):
        check_packed_causal_mask(wrong)


def test_packed_reference_equals_attention_over_each_document_alone():
    """The check's reference mask, used with PyTorch's SDPA, treats documents separately."""
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    q, k, v = torch.randn(3, 2, 4, 8, 6).unbind(0)  # each (batch, heads, L, d)
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=_packed_reference(segment_ids))
    for b in range(2):
        for doc in segment_ids[b].unique().tolist():
            if doc == 0:
                continue
            rows = (segment_ids[b] == doc).nonzero().flatten()
            alone = F.scaled_dot_product_attention(
                q[b, :, rows], k[b, :, rows], v[b, :, rows], is_causal=True
            )
            torch.testing.assert_close(packed[b, :, rows], alone, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- 4.3

INF = float("-inf")


def _after_softmax(scores, mask):
    return torch.softmax(scores, dim=-1) * mask


def _nan_rows(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, INF), dim=-1)


def _minus_1e9(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)


def _finfo_min(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)


def _multiplied(scores, mask):
    return torch.softmax(scores + (~mask) * INF, dim=-1).masked_fill(~mask, 0.0)


def _nan_to_num(scores, mask):
    additive = torch.zeros_like(scores).masked_fill(~mask, INF)
    return torch.softmax(scores + additive, dim=-1).nan_to_num(0.0)


def _inverted(scores, mask):
    return torch.softmax(scores.masked_fill(mask, INF), dim=-1).masked_fill(mask, 0.0)


def _over_queries(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, INF), dim=-2).masked_fill(~mask, 0.0)


def _detached(scores, mask):
    return _masked_softmax_reference(scores.detach(), mask)


def _minus_1e9_zeroed(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1).masked_fill(~mask, 0.0)


def _inf_then_zeroed(scores, mask):  # finite forwards and backwards, NaN in between
    return torch.softmax(scores.masked_fill(~mask, INF), dim=-1).masked_fill(~mask, 0.0)


def _inf_then_where_isnan(scores, mask):
    weights = torch.softmax(scores.masked_fill(~mask, INF), dim=-1)
    return torch.where(torch.isnan(weights), 0.0, weights)


HIDDEN_NAN = r"backward pass goes through NaN.*set_detect_anomaly.*SoftmaxBackward0.*finfo"

SOFTMAX_MISTAKES = {
    "mask after the softmax": (_after_softmax, "the mask was applied after the softmax"),
    "NaN rows": (_nan_rows, "NaN in rows where every key is blocked: .* 0/0"),
    "-1e9: uniform rows": (_minus_1e9, "uniform in rows where every key is blocked"),
    "finfo.min: uniform rows": (_finfo_min, "uniform in rows where every key is blocked"),
    "0 * -inf": (_multiplied, "NaN in rows that do have allowed keys: .*0 \\* -inf is NaN"),
    "NaN gradient": (_nan_to_num, "gradient with respect to the scores is NaN"),
    "inverted": (_inverted, "polarity is inverted"),
    "softmax over the queries": (_over_queries, r"normalised over the queries.*dim=-1"),
    "detached": (_detached, "not connected to the scores in the autograd graph"),
    "-1e9 in float16": (_minus_1e9_zeroed, "-1e9 does not fit in float16"),
    "-inf, NaN discarded by masked_fill": (_inf_then_zeroed, HIDDEN_NAN),
    "-inf, NaN discarded by torch.where": (_inf_then_where_isnan, HIDDEN_NAN),
}


@pytest.mark.parametrize("mistake", SOFTMAX_MISTAKES)
def test_masked_softmax_names_the_mistake(mistake):
    wrong, message = SOFTMAX_MISTAKES[mistake]
    with pytest.raises(CheckFailure, match=message):
        check_masked_softmax(wrong)


def test_masked_softmax_accepts_other_correct_answers(capsys):
    def zero_after_finfo_min(scores, mask):  # chapter 2's way
        return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1) * mask

    def where_any(scores, mask):  # zero the empty rows explicitly
        weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
        return torch.where(mask, weights, 0.0)

    for answer in (zero_after_finfo_min, where_any):
        check_masked_softmax(answer)
    assert capsys.readouterr().out.count("passed") == 2


def test_masked_softmax_reference_matches_the_package_attention():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8)
    mask = torch.rand(2, 1, 5, 6) < 0.5
    mask[0, 0, 0] = False  # one empty row
    _, weights = scaled_dot_product_attention(q, k, k, mask=mask)
    reference = _masked_softmax_reference(q @ k.transpose(-2, -1) / 8**0.5, mask)
    torch.testing.assert_close(reference, weights, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- 4.4


def _converted(convert, returns_tuple=False):
    """A wrong answer family for 4.4: `convert(mask, batch, heads, Lq, Lk)` -> attn_mask."""

    def run_torch_mha(torch_mha, query, key, value, mask):
        shape = (query.size(0), torch_mha.num_heads, query.size(1), key.size(1))
        result = torch_mha(query, key, value, attn_mask=convert(mask, *shape))
        return result if returns_tuple else result[0]

    return run_torch_mha


def _flat(mask, b, h, lq, lk):
    return mask.expand(b, h, lq, lk).reshape(b * h, lq, lk)


TORCH_MISTAKES = {
    "not inverted": (_converted(_flat), "True = BLOCKED.*Invert it: ~mask"),
    "heads first": (
        _converted(lambda m, b, h, lq, lk: (~m.expand(b, h, lq, lk))[:, 0].repeat(h, 1, 1)),
        r"masks of the wrong sequences.*b \* num_heads \+ h",
    ),
    "float mask": (
        _converted(lambda m, b, h, lq, lk: (~_flat(m, b, h, lq, lk)).float()),
        "comes from a float mask",
    ),
    "key length taken from the query": (
        lambda torch_mha, query, key, value, mask: torch_mha(
            query,
            key,
            value,
            attn_mask=~_flat(
                mask, query.size(0), torch_mha.num_heads, query.size(1), query.size(1)
            ),
        )[0],
        r"raised RuntimeError: .* Lq = 4 and Lk = 6: .*take Lk from key.size\(1\)",
    ),
    "returns the tuple": (
        _converted(lambda m, b, h, lq, lk: ~_flat(m, b, h, lq, lk), returns_tuple=True),
        "returns a tuple",
    ),
}


@pytest.mark.parametrize("mistake", TORCH_MISTAKES)
def test_run_torch_mha_names_the_mistake(mistake):
    wrong, message = TORCH_MISTAKES[mistake]
    with pytest.raises(CheckFailure, match=message):
        check_run_torch_mha(wrong)


def test_run_torch_mha_accepts_key_padding_mask_for_padding(capsys):
    """Another correct answer: padding-only masks through key_padding_mask."""

    def run_torch_mha(torch_mha, query, key, value, mask):
        if mask.dim() == 4 and mask.size(1) == 1 and mask.size(2) == 1:
            blocked = ~mask[:, 0, 0]  # (batch, Lk)
            return torch_mha(query, key, value, key_padding_mask=blocked)[0]
        shape = (query.size(0), torch_mha.num_heads, query.size(1), key.size(1))
        return torch_mha(query, key, value, attn_mask=~_flat(mask, *shape))[0]

    check_run_torch_mha(run_torch_mha)
    assert "passed" in capsys.readouterr().out
