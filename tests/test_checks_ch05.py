"""What the chapter 5 tables cannot express: the right variants pass, other correct
answers pass, an instance is refused.

Every mistake of the tables in transformer_book/checks/ch05.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformer_book.checks import CheckUsageError
from transformer_book.checks.ch05 import (
    _Block,
    _Stack,
    check_gradient_norms,
    check_residual_mlp,
    check_residual_mlp_block,
)


def test_the_variants_pass_as_they_are(capsys):
    check_residual_mlp_block(_Block)
    check_residual_mlp(_Stack)
    assert capsys.readouterr().out.count("passed") == 2


def test_block_checks_refuse_an_instance():
    with pytest.raises(CheckUsageError, match="subclass of Module"):
        check_residual_mlp_block(_Block(4, 8))


def test_block_check_accepts_kaiming_uniform():
    class Uniform(_Block):
        def __init__(self, d_model, hidden):
            super().__init__(d_model, hidden)
            nn.init.kaiming_uniform_(self.fc1.weight, nonlinearity="relu")

    check_residual_mlp_block(Uniform)


def test_probe_check_accepts_autograd_grad():
    def with_autograd(layers, loss):
        params = [list(layer.parameters()) for layer in layers]
        grads = iter(torch.autograd.grad(loss, [p for ps in params for p in ps],
                                         allow_unused=True))
        out = []
        for ps in params:
            total = torch.zeros(())
            for _ in ps:
                g = next(grads)
                if g is not None:
                    total = total + g.pow(2).sum()
            out.append(total.sqrt())
        return torch.stack(out)

    check_gradient_norms(with_autograd)
