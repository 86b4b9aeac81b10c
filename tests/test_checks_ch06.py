"""What the chapter 6 tables cannot express: the right variants pass, other correct
answers pass, the refused built-ins are restored.

Every mistake of the tables in transformer_book/checks/ch06.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_book import LayerNorm
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch06 import (
    _BatchNorm,
    _ln_variant,
    _RMSNorm,
    _ScaledAddNorm,
    check_batch_norm,
    check_layer_norm,
    check_rms_norm,
    check_scaled_add_norm,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_layer_norm(lambda *args, **kwargs: _ln_variant(*args, **kwargs).to(args[0].dtype))
    check_batch_norm(_BatchNorm)
    check_rms_norm(_RMSNorm)
    check_scaled_add_norm(_ScaledAddNorm)
    assert capsys.readouterr().out.count("passed") == 4


@pytest.mark.filterwarnings(r"ignore:var\(\). degrees of freedom:UserWarning")
def test_layer_norm_unbiased_variance_with_one_feature_gets_its_own_message():
    def unbiased_only_when_d_is_1(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        correction = 1 if tuple(normalized_shape) == (1,) else 0
        return _ln_variant(x, normalized_shape, weight, bias, eps, correction=correction)

    with pytest.raises(CheckFailure, match=r"single feature, the unbiased variance divides 0"):
        check_layer_norm(unbiased_only_when_d_is_1)


def test_the_builtin_is_restored_after_the_check():
    with pytest.raises(CheckFailure, match="calls PyTorch's layer norm"):
        check_layer_norm(lambda x, shape, weight=None, bias=None, eps=1e-5: F.layer_norm(x, shape))
    x = torch.randn(2, 3)
    assert torch.allclose(F.layer_norm(x, (3,)), nn.LayerNorm(3)(x))


def test_scaled_add_norm_accepts_the_chapters_layer_norm(capsys):
    class WithChapterNorm(_ScaledAddNorm):
        def __init__(self, d_model, alpha, dropout=0.0):
            super().__init__(d_model, alpha, dropout)
            self.norm = LayerNorm(d_model)

    check_scaled_add_norm(WithChapterNorm)
    assert "passed" in capsys.readouterr().out
