"""What the chapter 1 tables cannot express: the references and the variants themselves.

Every mistake of the tables in transformer_book/checks/ch01.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import torch

from transformer_book.checks.ch01 import (
    _additive_reference,
    _additive_scores,
    _additive_variant,
    _gap_variant,
    _pool_variant,
    _positions_variant,
    check_additive_attention,
    check_attention_pool,
    check_positions,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_additive_attention(_additive_variant)
    check_attention_pool(_pool_variant)
    check_positions(_gap_variant, _positions_variant)
    assert capsys.readouterr().out.count("passed") == 3


def test_additive_reference_is_the_loop_formula():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    query, key, value = randn(2, 3, 4), randn(2, 5, 6), randn(2, 5, 7)
    w_q, w_k, w_s = randn(8, 4), randn(8, 6), randn(8)
    out, weights = _additive_reference(query, key, value, w_q, w_k, w_s)
    vectorised = torch.softmax(_additive_scores(query, key, w_q, w_k, w_s), dim=-1)
    assert torch.allclose(weights, vectorised, atol=1e-12)
    assert torch.allclose(out, vectorised @ value, atol=1e-12)
