"""The chapter 5 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
from notebook_code import namespace
from torch import nn

from transformer_book.checks import CheckFailure, CheckUsageError
from transformer_book.checks.ch05 import (
    check_gradient_norms,
    check_residual_mlp,
    check_residual_mlp_block,
)

NOTEBOOK = "05_residual_connections.ipynb"


@pytest.fixture(scope="module")
def solutions():
    return namespace(f"solutions/{NOTEBOOK}")


def test_block_checks_refuse_an_instance(solutions):
    with pytest.raises(CheckUsageError, match="subclass of Module"):
        check_residual_mlp_block(solutions["ResidualMLPBlock"](4, 8))


# ------------------------------------------------------------ exercise 5.1: wrong blocks


class _Block(nn.Module):
    """The right layers and initialization; subclasses get one thing wrong each."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def branch(self, z):
        return self.fc2(torch.relu(self.fc1(z)))


class _RightBlock(_Block):
    def forward(self, x):
        return x + self.branch(x)


class NoSkip(_Block):
    def forward(self, x):
        return self.branch(x)


class ReluAfterSum(_Block):
    def forward(self, x):
        return torch.relu(x + self.branch(x))


class NoActivation(_Block):
    def forward(self, x):
        return x + self.fc2(self.fc1(x))


class ReluAfterFc2(_Block):
    def forward(self, x):
        return x + torch.relu(self.branch(x))


class SkipTwice(_Block):
    def forward(self, x):
        return x + x + self.branch(x)


class DetachedSkip(_Block):
    def forward(self, x):
        return x.detach() + self.branch(x)


class InPlace(_Block):
    def forward(self, x):
        x += self.branch(x)
        return x


class WrongWidth(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        self.fc2 = nn.Linear(hidden, hidden)


class OtherNames(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model)
        )

    def forward(self, x):
        return x + self.mlp(x)


class DefaultInit(_RightBlock):  # forgets the initialization altogether
    def __init__(self, d_model, hidden):
        nn.Module.__init__(self)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)


class BothZero(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        nn.init.zeros_(self.fc1.weight)


class Fc2BiasLeft(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        self.fc2.bias.data = nn.Linear(hidden, d_model).bias.data


class Fc1DefaultInit(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        self.fc1 = nn.Linear(d_model, hidden)
        nn.init.zeros_(self.fc1.bias)


class LeCunFc1(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="linear")


class FanOutFc1(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_out", nonlinearity="relu")


class Fc1BiasLeft(_RightBlock):
    def __init__(self, d_model, hidden):
        super().__init__(d_model, hidden)
        self.fc1.bias.data = nn.Linear(d_model, hidden).bias.data


@pytest.mark.parametrize(
    "block, message",
    [
        (NoSkip, "skip connection is missing"),
        (ReluAfterSum, r"ReLU\(x \+ F\(x\)\): a ReLU after the sum"),
        (NoActivation, "ReLU between fc1 and fc2 is missing"),
        (ReluAfterFc2, "there is a ReLU after fc2"),
        (SkipTwice, "the input is added twice"),
        (DetachedSkip, "skip path detached"),
        (InPlace, "changed its input in place"),
        (WrongWidth, "fc2` maps 8 -> 8 features, expected 8 -> 4"),
        (OtherNames, "has no submodule `fc1`"),
        (DefaultInit, "fc2's weight is not zero, so the block does not start as the identity"),
        (BothZero, "fc1's weight is all zeros.*nothing ever learns"),
        (Fc2BiasLeft, "fc2's weight is zero but its bias is not"),
        (Fc1DefaultInit, r"standard deviation 0\.03.*PyTorch's default nn.Linear init"),
        (LeCunFc1, r"variance 1 / fan_in \(LeCun's init"),
        (FanOutFc1, "mode='fan_out'"),
        (Fc1BiasLeft, "fc1's bias is not zero"),
    ],
)
def test_block_check_names_the_mistake(block, message):
    with pytest.raises(CheckFailure, match=message):
        check_residual_mlp_block(block)


def test_block_check_accepts_kaiming_uniform():
    class Uniform(_RightBlock):
        def __init__(self, d_model, hidden):
            super().__init__(d_model, hidden)
            nn.init.kaiming_uniform_(self.fc1.weight, nonlinearity="relu")

    check_residual_mlp_block(Uniform)


# ------------------------------------------------------------ exercise 5.2: wrong stacks



class SharedBlocks(nn.Module):
    def __init__(self, d_model, hidden, depth):
        super().__init__()
        self.blocks = nn.ModuleList([_RightBlock(d_model, hidden)] * depth)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class PythonList(nn.Module):
    def __init__(self, d_model, hidden, depth):
        super().__init__()
        self.blocks = [_RightBlock(d_model, hidden) for _ in range(depth)]

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class DoubleSkip(nn.Module):
    def __init__(self, d_model, hidden, depth):
        super().__init__()
        self.blocks = nn.ModuleList(_RightBlock(d_model, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class OneBlockShort(DoubleSkip):
    def __init__(self, d_model, hidden, depth):
        super().__init__(d_model, hidden, depth - 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ReversedOrder(DoubleSkip):
    def forward(self, x):
        for block in reversed(self.blocks):
            x = block(x)
        return x


class BlocksNotApplied(DoubleSkip):
    def forward(self, x):
        return x


class StackOfWrongBlocks(nn.Module):
    def __init__(self, d_model, hidden, depth):
        super().__init__()
        self.blocks = nn.ModuleList(ReluAfterSum(d_model, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(
    "model, message",
    [
        (SharedBlocks, "share one set of weights"),
        (PythonList, "Python list"),
        (DoubleSkip, "skip is added twice"),
        (OneBlockShort, "has 2 blocks, expected depth = 3"),
        (BlocksNotApplied, "returns its input unchanged: forward does not apply the blocks"),
        (ReversedOrder, "applies its blocks in reverse order"),
        (StackOfWrongBlocks, "make check_residual_mlp_block pass first"),
    ],
)
def test_stack_check_names_the_mistake(model, message):
    with pytest.raises(CheckFailure, match=message):
        check_residual_mlp(model)


# ------------------------------------------------------------ exercise 5.3: wrong probes


def _norms(layers, values):
    out = []
    for layer in layers:
        squares = [values(p).pow(2).sum() for p in layer.parameters() if values(p) is not None]
        out.append(torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0))
    return torch.stack([v.float() for v in out])


def no_zero_grad(layers, loss):
    loss.backward()
    return _norms(layers, lambda p: p.grad)


def zero_grad_after_backward(layers, loss):
    loss.backward()
    for layer in layers:
        layer.zero_grad(set_to_none=False)
    return _norms(layers, lambda p: p.grad)


def weight_norms(layers, loss):
    return _norms(layers, lambda p: p.detach())


def reversed_order(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return _norms(layers[::-1], lambda p: p.grad)


def weights_only(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return _norms(layers, lambda p: p.grad if p.dim() > 1 else None)


def squared(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return _norms(layers, lambda p: p.grad) ** 2


def sum_of_norms(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    out = []
    for layer in layers:
        norms = [p.grad.norm() for p in layer.parameters() if p.grad is not None]
        out.append(torch.stack(norms).sum() if norms else torch.tensor(0.0))
    return torch.stack([v.float() for v in out])


def per_parameter(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return torch.stack([p.grad.norm().float() for layer in layers for p in layer.parameters()])


def crashes_on_unused(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return torch.stack(
        [torch.stack([p.grad.norm() for p in layer.parameters()]).norm() for layer in layers]
    )


@pytest.mark.parametrize(
    "probe, message",
    [
        (no_zero_grad, "gradients left in .grad by an earlier backward pass"),
        (zero_grad_after_backward, "every norm is 0"),
        (weight_norms, "norms of the layers' weights, not of their gradients"),
        (reversed_order, "reverse order"),
        (weights_only, "only the weight matrices are counted"),
        (squared, "squared norms"),
        (sum_of_norms, "not a sum of norms"),
        (per_parameter, "one per parameter tensor"),
        (crashes_on_unused, "raised"),
    ],
)
def test_probe_check_names_the_mistake(probe, message):
    with pytest.raises(CheckFailure, match=message):
        check_gradient_norms(probe)


def test_probe_check_accepts_autograd_grad():
    def with_autograd(layers, loss):
        layers = list(layers)
        params = [list(layer.parameters()) for layer in layers]
        flat = [p for ps in params for p in ps]
        grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
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
