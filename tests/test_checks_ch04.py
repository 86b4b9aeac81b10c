"""What the chapter 4 tables cannot express: references, variants, other correct answers.

Every mistake of the tables in transformer_book/checks/ch04.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transformer_book import scaled_dot_product_attention
from transformer_book.checks.ch04 import (
    _lengths_variant,
    _masked_softmax_reference,
    _mha_variant,
    _ms_variant,
    _packed_reference,
    _packed_variant,
    check_masked_softmax,
    check_packed_causal_mask,
    check_padding_mask_from_lengths,
    check_run_torch_mha,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_padding_mask_from_lengths(_lengths_variant)
    check_packed_causal_mask(_packed_variant)
    check_masked_softmax(_ms_variant)
    check_run_torch_mha(_mha_variant)
    assert capsys.readouterr().out.count("passed") == 4


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


def test_run_torch_mha_accepts_key_padding_mask_for_padding(capsys):
    """Another correct answer: padding-only masks through key_padding_mask."""

    def run_torch_mha(torch_mha, query, key, value, mask):
        if mask.dim() == 4 and mask.size(1) == 1 and mask.size(2) == 1:
            blocked = ~mask[:, 0, 0]  # (batch, Lk)
            return torch_mha(query, key, value, key_padding_mask=blocked)[0]
        return _mha_variant(torch_mha, query, key, value, mask)

    check_run_torch_mha(run_torch_mha)
    assert "passed" in capsys.readouterr().out
