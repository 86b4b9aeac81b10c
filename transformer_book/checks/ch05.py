"""Checks for the exercises of chapter 5, residual connections.

Each check runs the student's code on several shapes, computes the reference with the
student's *own* parameters (so that only the wiring is judged, not the random
initialization) and, when the two differ, tries the table of usual mistakes in order,
each written once as a wrong class or function with the student's signature, so that
the failure names the likely misconception.
"""

from __future__ import annotations

import torch
from torch import nn

from ._core import (
    Caught,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_class,
    expect_dtype,
    expect_shape,
    expect_tensor,
    fail,
    name_mistake,
    same,
    with_weights_of,
)

# (d_model, hidden, input shape): several leading shapes, d_model not a power of two.
_BLOCK_CASES = [(4, 8, (3, 4)), (6, 10, (2, 5, 6)), (7, 3, (1, 1, 7)), (5, 16, (5,))]
# (d_model, hidden, depth, input shape)
_STACK_CASES = [(4, 8, 3, (2, 3, 4)), (6, 5, 1, (4, 6)), (7, 16, 5, (1, 2, 7))]


def _input(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Inputs with a non-zero mean and a non-unit spread, so that a LayerNorm changes them."""
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(*shape, generator=generator, dtype=torch.float64) + 0.7
    return x.to(dtype)


# ----------------------------------------------------------------- exercise 5.1 and 5.2


class _Block(nn.Module):
    """The right layers and initialization; the mistakes below get one thing wrong each."""

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

    def forward(self, x):
        return x + self.branch(x)


def _block(forward=None, init=None, name="Block"):
    """A block class with ``forward(self, x)`` and/or ``init(self, d_model, hidden)`` changed."""
    namespace = {} if forward is None else {"forward": forward}
    if init is not None:
        def __init__(self, d_model, hidden):
            _Block.__init__(self, d_model, hidden)
            init(self, d_model, hidden)
        namespace["__init__"] = __init__
    return type(name, (_Block,), namespace)


def _in_place(self, x):
    x += self.branch(x)
    return x


def _other_names(self, d_model, hidden):
    del self.fc1, self.fc2
    self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))


def _default_init(self, d_model, hidden):
    self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)


_BLOCK = [  # named with the student's own weights, in this order
    Mistake("the output equals F(x) with nothing added: the skip connection is missing. "
            "Return x + F(x), so that the block only adds a change to its input.",
            _block(lambda self, x: self.branch(x))),
    Mistake("the output equals ReLU(x + F(x)): a ReLU after the sum, as in the original "
            "ResNet's blocks, cuts the negative part of the skip path, so the block is not the "
            "identity even when F outputs 0. Return x + F(x).",
            _block(lambda self, x: torch.relu(x + self.branch(x)))),
    Mistake("the output equals x + fc2(fc1(x)): the ReLU between fc1 and fc2 is missing, so "
            "the branch is a single linear map.", _block(lambda self, x: x + self.fc2(self.fc1(x)))),
    Mistake("the output equals x + ReLU(fc2(ReLU(fc1(x)))): there is a ReLU after fc2. With it "
            "the branch can only add positive values; the activation goes between fc1 and fc2 "
            "only.", _block(lambda self, x: x + torch.relu(self.branch(x)))),
    Mistake("the output equals 2x + F(x): the input is added twice.",
            _block(lambda self, x: x + x + self.branch(x))),
]
_BLOCK_CAUGHT = [
    Caught(_block(lambda self, x: x.detach() + self.branch(x)), "skip path detached"),
    Caught(_block(_in_place), "changed its input in place"),
    Caught(_block(init=lambda self, d, h: setattr(self, "fc2", nn.Linear(h, h))),
           "fc2` maps 8 -> 8 features, expected 8 -> 4"),
    Caught(_block(lambda self, x: x + self.mlp(x), _other_names), "has no submodule `fc1`"),
    Caught(_block(init=_default_init),
           "fc2's weight is not zero, so the block does not start as the identity"),
    Caught(_block(init=lambda self, d, h: nn.init.zeros_(self.fc1.weight)),
           "fc1's weight is all zeros.*nothing ever learns"),
    Caught(_block(init=lambda self, d, h: nn.init.ones_(self.fc2.bias)),
           "fc2's weight is zero but its bias is not"),
    Caught(_block(init=lambda self, d, h: setattr(self, "fc1", nn.Linear(d, h, bias=False))),
           "`fc1` has no bias"),
    Caught(_block(init=lambda self, d, h: nn.init.kaiming_uniform_(self.fc1.weight, a=5 ** 0.5)),
           r"standard deviation 0\.03.*PyTorch's default nn.Linear init"),
    Caught(_block(init=lambda self, d, h: setattr(self, "fc1", nn.Linear(d, h))),
           r"standard deviation 0\.03.*PyTorch's default nn.Linear init"),  # bias left too
    Caught(_block(init=lambda self, d, h: nn.init.kaiming_normal_(self.fc1.weight,
                                                                  nonlinearity="linear")),
           r"variance 1 / fan_in \(LeCun's init"),
    Caught(_block(init=lambda self, d, h: nn.init.kaiming_normal_(
        self.fc1.weight, mode="fan_out", nonlinearity="relu")), "mode='fan_out'"),
    Caught(_block(init=lambda self, d, h: nn.init.ones_(self.fc1.bias)), "fc1's bias is not zero"),
    Caught(_block(lambda self, x: (x + self.branch(x)).float()), "keep the input's dtype"),
]


def _twin(block, x):
    return with_weights_of(block, x, build=lambda c: c(block.fc1.in_features,
                                                       block.fc1.out_features).to(x.dtype))


def _block_layers(block, d_model: int, hidden: int, where: str):
    """The ``fc1`` and ``fc2`` of a block, with their sizes checked."""
    fc1, fc2 = (getattr(block, name, None) for name in ("fc1", "fc2"))
    for name, layer in [("fc1", fc1), ("fc2", fc2)]:
        if not isinstance(layer, nn.Module):
            fail(f"{where} has no submodule `{name}`: create `self.fc1 = nn.Linear(d_model, "
                 "hidden)` and `self.fc2 = nn.Linear(hidden, d_model)` in __init__ (the check "
                 "looks the layers up by these names).")
    for name, layer, n_in, n_out in [("fc1", fc1, d_model, hidden), ("fc2", fc2, hidden, d_model)]:
        if not isinstance(layer, nn.Linear):
            fail(f"{where}: `{name}` should be an nn.Linear, but it is a {type(layer).__name__}.")
        if (layer.in_features, layer.out_features) != (n_in, n_out):
            fail(f"{where}: `{name}` maps {layer.in_features} -> {layer.out_features} features, "
                 f"expected {n_in} -> {n_out} for d_model={d_model}, hidden={hidden}: "
                 "fc1 widens d_model to hidden and fc2 brings it back to d_model, "
                 "so that the branch keeps the input's shape.")
        if layer.bias is None:
            fail(f"{where}: `{name}` has no bias; keep nn.Linear's default, bias=True.")
    return fc1, fc2


def _randomize(block, seed: int) -> None:
    """Random weights in both layers (fc2 starts at zero), so that every wiring differs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (block.fc1, block.fc2):
            for p in (layer.weight, layer.bias):
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.copy_(0.5 * noise)


def _zero_fc2(block) -> None:
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.zero_()


def _check_block_output(block, x, d_model: int, hidden: int, where: str) -> None:
    before = x.clone()
    out = call(block, x, what=f"{where}'s forward")
    if not torch.equal(x, before):
        fail(f"{where}'s forward changed its input in place (e.g. `x += ...`): the caller's "
             "tensor is overwritten. Return a new tensor, `x + branch`.")
    expect_shape(out, x.shape, f"{where}'s output for an input of shape {tuple(x.shape)}")
    right = _twin(block, x)(_Block)
    if same(out, right):
        return
    name_mistake(out, _BLOCK, run=_twin(block, x), prefix=f"{where}: ")
    worst = (out.detach().to(right.dtype) - right).abs().max().item()
    fail(f"{where}'s output differs from x + fc2(relu(fc1(x))) computed with its own layers "
         f"(d_model={d_model}, hidden={hidden}, input {tuple(x.shape)}; largest difference "
         f"{worst:.3g}).")


# fc1's weight standard deviation under each initialization, for d_model 256, hidden 384
_INIT_D, _INIT_H = 256, 384
_INIT_STDS = {
    "kaiming": (2 / _INIT_D) ** 0.5,
    "lecun": (1 / _INIT_D) ** 0.5,
    "fan_out": (2 / _INIT_H) ** 0.5,
    "default": (1 / (3 * _INIT_D)) ** 0.5,
}


def _check_initialization(block_class) -> None:
    where = f"a fresh ResidualMLPBlock({_INIT_D}, {_INIT_H})"
    torch.manual_seed(5)
    block = call(block_class, _INIT_D, _INIT_H, what=f"ResidualMLPBlock({_INIT_D}, {_INIT_H})")
    fc1, fc2 = _block_layers(block, _INIT_D, _INIT_H, where)
    w1 = fc1.weight.detach().double()
    if (w1 == 0).all():
        fail(f"{where}: fc1's weight is all zeros. With fc2 at zero too, the block is stuck: "
             "fc2's gradient is relu(fc1(x)) = 0 and fc1's gradient passes through fc2 = 0, "
             "so nothing ever learns. Only fc2 starts at zero; fc1 gets Kaiming's init.")
    if (fc2.weight != 0).any():
        fail(f"{where}: fc2's weight is not zero, so the block does not start as the identity. Set "
             "it to zero in __init__ (nn.init.zeros_(self.fc2.weight)), and fc2's bias too.")
    if (fc2.bias != 0).any():
        fail(f"{where}: fc2's weight is zero but its bias is not, so the block adds a constant to "
             "every input instead of starting as the identity: nn.init.zeros_(self.fc2.bias).")
    std = w1.std().item()  # (before fc1's bias: a forgotten init leaves both, name the init)
    closest = min(_INIT_STDS, key=lambda name: abs(_INIT_STDS[name] - std))
    if abs(std - _INIT_STDS["kaiming"]) < 0.05 * _INIT_STDS["kaiming"]:
        if (fc1.bias != 0).any():
            fail(f"{where}: fc1's bias is not zero. The variance-preserving initialization of "
                 "the chapter sets the biases to zero: nn.init.zeros_(self.fc1.bias).")
        return
    hints = {
        "lecun": "variance 1 / fan_in (LeCun's init, or kaiming with nonlinearity='linear'): the "
        "layer before a ReLU needs 2 / fan_in, since the ReLU keeps about half of the mean square.",
        "fan_out": "variance 2 / hidden: kaiming with mode='fan_out' counts the outputs; "
        "the forward signal needs fan_in = d_model (the default mode).",
        "default": "PyTorch's default nn.Linear init (variance 1 / (3 fan_in)), which shrinks the "
        "signal: initialize fc1.weight with nn.init.kaiming_normal_(..., nonlinearity='relu').",
    }
    fail(f"{where}: fc1's weight has standard deviation {std:.4f}, expected sqrt(2 / d_model) = "
         f"{_INIT_STDS['kaiming']:.4f} (Kaiming for the layer before the ReLU). "
         + (f"It looks like {hints[closest]}" if closest in hints else ""))


def _check_fresh_block(block, x, where: str) -> None:
    """As constructed (fc2 at zero), the block is exactly the identity."""
    y = call(block, x, what=f"{where}'s forward")
    expect_shape(y, x.shape, f"{where}'s output for an input of shape {tuple(x.shape)}")
    fc2_zero = (block.fc2.weight == 0).all() and (block.fc2.bias == 0).all()
    if fc2_zero and not same(y, x, atol=0, rtol=0):
        name_mistake(y, _BLOCK, run=_twin(block, x), prefix=f"a fresh {where}: ")
        fail(f"a fresh {where}, whose fc2 is zero, does not return its input: a residual block "
             "whose branch outputs 0 must be the identity, y = x + 0.")


def _check_block_gradients(block, x, where: str) -> None:
    """Gradients reach both layers; with fc2 at zero, d sum(y) / dx is all ones."""
    xg = x.clone().requires_grad_(True)
    call(block, xg, what=f"{where}'s forward").sum().backward()
    for name in ("fc1", "fc2"):
        grad = getattr(block, name).weight.grad
        if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
            fail(f"{where}: `{name}.weight` receives no gradient from the output: is the "
                 "branch computed under torch.no_grad(), or detached?")
    _zero_fc2(block)
    xg = x.clone().requires_grad_(True)
    call(block, xg, what=f"{where}'s forward").sum().backward()
    if xg.grad is None or not same(xg.grad, torch.ones_like(x), atol=1e-6, rtol=0):
        fail(f"{where}: with fc2 at zero, d sum(y) / dx should be all ones "
             "(dy/dx = I + dF/dx = I), but it is not: is the skip path detached "
             "(e.g. `x.detach() + ...`)? The gradient must flow through the skip unchanged.")


@exercise("5.1", "A residual MLP block that starts as the identity",
          mistakes={"block_class": _BLOCK + _BLOCK_CAUGHT})
def check_residual_mlp_block(block_class):
    expect_class(block_class, nn.Module, "your block class",
                 "check_residual_mlp_block(ResidualMLPBlock)")
    for case, (d_model, hidden, shape) in enumerate(_BLOCK_CASES):
        where = f"ResidualMLPBlock({d_model}, {hidden})"
        torch.manual_seed(case)
        block = call(block_class, d_model, hidden, what=where)
        _block_layers(block, d_model, hidden, where)
        x = _input(shape, seed=100 + case)
        _check_fresh_block(block, x, where)
        _randomize(block, seed=case)
        _check_block_output(block, x, d_model, hidden, where)
        _check_block_gradients(block, x, where)
    _check_initialization(block_class)
    # float64 in, float64 out.
    block = call(block_class, 6, 9, what="ResidualMLPBlock(6, 9)").double()
    x = _input((2, 3, 6), seed=7, dtype=torch.float64)
    out = expect_tensor(call(block, x, what="ResidualMLPBlock(6, 9).double()"), "the output")
    expect_dtype(out, torch.float64, f"for a float64 block and input the output is {out.dtype}: "
                 "keep the input's dtype.")


class _Stack(nn.Module):
    """The right stack; the mistakes below change its blocks or its forward."""

    block = _Block

    def __init__(self, d_model, hidden, depth):
        super().__init__()
        self.blocks = nn.ModuleList(self.block(d_model, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _stack(forward=None, **attributes):
    return type("Stack", (_Stack,), {**attributes, **({"forward": forward} if forward else {})})


def _applied(model, x, kind: str):
    """The student's own blocks applied in order, added twice, or in reverse order."""
    h, blocks = x, list(model.blocks)
    with torch.no_grad():
        for block in reversed(blocks) if kind == "reversed" else blocks:
            h = h + block(h) if kind == "doubled" else block(h)
    return h


def _stack_mistake(message: str, kind: str, wrong) -> Mistake:
    return Mistake(message, wrong, symptom=lambda out, model, x: same(out, _applied(model, x, kind)))


def _doubled(self, x):
    for block in self.blocks:
        x = x + block(x)
    return x


def _reversed(self, x):
    for block in reversed(self.blocks):
        x = block(x)
    return x


def _python_list(self, d_model, hidden, depth):
    nn.Module.__init__(self)
    self.blocks = [_Block(d_model, hidden) for _ in range(depth)]


def _shared(self, d_model, hidden, depth):
    nn.Module.__init__(self)
    self.blocks = nn.ModuleList([_Block(d_model, hidden)] * depth)


_STACK = [
    _stack_mistake(": the output equals applying h = h + block(h): the skip is added twice, "
                   "since each ResidualMLPBlock already returns x + F(x). Apply the blocks in "
                   "turn, h = block(h).", "doubled", _stack(_doubled)),
    _stack_mistake(" applies its blocks in order, but the blocks do not compute "
                   "x + fc2(relu(fc1(x))): make check_residual_mlp_block pass first.", "chained",
                   _stack(block=_BLOCK[1].wrong)),
    Mistake(" returns its input unchanged: forward does not apply the blocks.",
            _stack(lambda self, x: x), symptom=lambda out, model, x: same(out, x)),
    _stack_mistake(" applies its blocks in reverse order: the input goes through blocks[0] "
                   "first, then blocks[1], and so on.", "reversed", _stack(_reversed)),
    Caught(_stack(__init__=_shared), "share one set of weights"),
    Caught(_stack(__init__=_python_list), "Python list"),
    Caught(_stack(__init__=lambda self, d, h, n: _Stack.__init__(self, d, h, n - 1)),
           "has 2 blocks, expected depth = 3"),
]


def _stack_blocks(model, depth: int, where: str):
    """``model.blocks``: an nn.ModuleList of ``depth`` distinct, registered blocks."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (list, tuple)):
        fail(f"{where}.blocks is a Python {type(blocks).__name__}: PyTorch does not register the "
             "modules in it, so model.parameters() (and any optimizer) cannot see their "
             "weights. Use nn.ModuleList.")
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        fail(f"{where} has no `blocks` (an nn.ModuleList of ResidualMLPBlock): create it in "
             "__init__.")
    if len(blocks) != depth:
        fail(f"{where} has {len(blocks)} blocks, expected depth = {depth}.")
    if len({id(block) for block in blocks}) != depth:
        fail(f"{where}: the same block object appears several times in `blocks`, so all the "
             "layers share one set of weights (`[block] * depth` repeats one module). "
             "Create a new ResidualMLPBlock for every layer.")
    registered = {id(p) for p in model.parameters()}
    if not all(id(p) in registered for p in blocks.parameters()):
        fail(f"{where}: some of the blocks' weights are missing from model.parameters(): "
             "keep the blocks in an nn.ModuleList assigned to self.blocks.")
    return blocks


@exercise("5.2", "A deep residual MLP", mistakes={"model_class": _STACK})
def check_residual_mlp(model_class):
    expect_class(model_class, nn.Module, "your model class", "check_residual_mlp(ResidualMLP)")
    for case, (d_model, hidden, depth, shape) in enumerate(_STACK_CASES):
        where = f"ResidualMLP({d_model}, {hidden}, depth={depth})"
        torch.manual_seed(case)
        model = call(model_class, d_model, hidden, depth, what=where)
        blocks = _stack_blocks(model, depth, where)
        for i, block in enumerate(blocks):
            _block_layers(block, d_model, hidden, f"{where}.blocks[{i}]")
            _randomize(block, seed=10 * case + i)
        x = _input(shape, seed=200 + case)
        before = x.clone()
        out = call(model, x, what=f"{where}'s forward")
        if not torch.equal(x, before):
            fail(f"{where}'s forward changed its input in place: return new tensors instead.")
        expect_shape(out, shape, f"{where}'s output for an input of shape {tuple(shape)}")
        with torch.no_grad():  # the reference, block by block
            right = x
            for block in blocks:
                right = right + block.fc2(torch.relu(block.fc1(right)))
        if not same(out, right):
            name_mistake(out, _STACK, model, x, prefix=where, general=f"{where}'s output differs "
                         "from applying its blocks in order, h = block(h) for each block.")
        # Identity mapping: with every fc2 at zero the whole stack is the identity.
        for block in blocks:
            _zero_fc2(block)
        out = call(model, x, what=f"{where}'s forward")
        if not same(out, x, atol=1e-6, rtol=0):
            if same(out, x * 2.0**depth):
                fail(f"{where} with every fc2 at zero returns 2**depth * x: the skip is added "
                     "twice (h = h + block(h) around blocks that already add x). Use h = block(h).")
            fail(f"{where} with every fc2 at zero does not return its input: a stack of "
                 "residual blocks whose sublayers output 0 must be the identity.")


# ----------------------------------------------------------------------- exercise 5.3


def _probe_models():
    """(layers, loss function, input shape, dtype) for the cases the probe is tried on."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7),
                        nn.ReLU(),
                        nn.Linear(7, 7, bias=False),
                        nn.Tanh(),
                        nn.Linear(7, 4),
                        nn.Linear(4, 3))

    def mlp_loss(x):
        return (mlp(x) ** 2).mean()

    def residual_layers(dtype):
        # An embedding, a norm and a sublayer used in a residual step, a head, and a layer
        # the loss never uses (its norm is 0).
        torch.manual_seed(1)
        layers = nn.ModuleList([nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 6),
                                nn.Linear(6, 4), nn.Linear(6, 6)]).to(dtype)

        def loss(x):
            h = layers[0](x)  # (n, 6)
            h = h + torch.relu(layers[2](layers[1](h)))  # (n, 6)
            return (layers[3](h) - 1.0).pow(2).sum()

        return layers, loss

    return [
        (list(mlp), mlp_loss, (8, 5), torch.float32),
        (*residual_layers(torch.float32), (4, 6), torch.float32),
        (*residual_layers(torch.float64), (3, 6), torch.float64),
    ]


def _stale_gradients(layers, seed: int) -> None:
    """Fill every .grad as if an earlier backward pass had left gradients behind."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        for p in layer.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


def _per_layer(layers, values) -> torch.Tensor:
    """The norm of each layer's ``values`` (a tensor or None per parameter, in order) together,
    sqrt(sum of squares), in float64."""
    norms, i = [], 0
    for layer in layers:
        total = torch.zeros((), dtype=torch.float64)
        for _ in layer.parameters():
            if values[i] is not None:
                total = total + values[i].detach().double().pow(2).sum()
            i += 1
        norms.append(total.sqrt())
    return torch.stack(norms)


def _norms(layers, values):
    """For the wrong probes below: one norm per layer of ``values(p)``."""
    out = []
    for layer in layers:
        squares = [values(p).pow(2).sum() for p in layer.parameters() if values(p) is not None]
        out.append(torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0))
    return torch.stack([v.float() for v in out])


def _fresh_backward(layers, loss):
    layers = list(layers)
    for layer in layers:
        layer.zero_grad()
    loss.backward()
    return layers


def _no_zero_grad(layers, loss):
    loss.backward()
    return _norms(layers, lambda p: p.grad)


def _zero_grad_after_backward(layers, loss):
    loss.backward()
    for layer in layers:
        layer.zero_grad(set_to_none=False)
    return _norms(layers, lambda p: p.grad)


def _sum_of_norms(layers, loss):
    out = []
    for layer in _fresh_backward(layers, loss):
        norms = [p.grad.norm() for p in layer.parameters() if p.grad is not None]
        out.append(torch.stack(norms).sum() if norms else torch.tensor(0.0))
    return torch.stack([v.float() for v in out])


def _fresh(values, order: int = 1):
    """A probe that zeroes the gradients, runs backward, and takes the norms of ``values``."""
    return lambda layers, loss: _norms(_fresh_backward(layers, loss)[::order], values)


_PROBE = [
    Mistake("the result includes gradients left in .grad by an earlier backward pass: "
            "backward() adds to .grad, it does not overwrite it. Zero the gradients before "
            "loss.backward() (or use torch.autograd.grad, which leaves .grad alone).",
            _no_zero_grad, when=lambda stale: stale),
    Mistake("every norm is 0: the gradients were cleared after backward and before they were "
            "read (zero_grad in the wrong place), or never computed.", _zero_grad_after_backward),
    Mistake("these are the norms of the layers' weights, not of their gradients: use p.grad "
            "(after loss.backward()) or torch.autograd.grad(loss, params).",
            lambda layers, loss: _norms(layers, lambda p: p.detach())),
    Mistake("the norms are in reverse order: entry i belongs to layers[i], the first layer "
            "first, even though backpropagation visits the layers from the last one.",
            _fresh(lambda p: p.grad, order=-1)),
    Mistake("only the weight matrices are counted: include every parameter of the layer, "
            "biases and norm gains too.", _fresh(lambda p: p.grad if p.dim() > 1 else None)),
    Mistake("these are squared norms: take the square root of the sum of squares.",
            lambda layers, loss: _fresh(lambda p: p.grad)(layers, loss) ** 2),
    Mistake("you added up the norms of a layer's parameters; the norm of the layer's gradient is "
            "sqrt(sum over parameters of (grad ** 2).sum()), not a sum of norms.", _sum_of_norms),
    Caught(lambda layers, loss: torch.stack([
        p.grad.norm().float() for layer in _fresh_backward(layers, loss)
        for p in layer.parameters()]), "one per parameter tensor"),
    Caught(lambda layers, loss: torch.stack([  # a layer the loss never uses has no .grad
        torch.stack([p.grad.norm() for p in layer.parameters()]).norm()
        for layer in _fresh_backward(layers, loss)]), "raised"),
]


def _probe_case(gradient_norms, layers, loss_fn, x, stale: bool, case: int) -> None:
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.grad = None
    if stale:
        _stale_gradients(layers, seed=case)
    old = [None if p.grad is None else p.grad.clone() for p in params]
    loss = loss_fn(x)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    right = _per_layer(layers, grads)
    kinds = ", ".join(type(layer).__name__ for layer in layers)
    out = call(gradient_norms, layers, loss, what=f"gradient_norms on layers [{kinds}]")
    out = expect_tensor(out, "the result of gradient_norms (a 1-D tensor, one entry per layer)")
    n_layers = len(layers)
    if out.dim() != 1 or out.shape[0] != n_layers:
        if out.numel() == len(params):
            fail(f"gradient_norms returned {out.numel()} values for {n_layers} layers: one per "
                 "parameter tensor. Combine all the parameters of a layer into one number, "
                 "sqrt(sum over its parameters of (grad ** 2).sum()).")
        fail(f"gradient_norms returned shape {tuple(out.shape)} for {n_layers} layers; "
             f"expected ({n_layers},), one norm per layer in the order given.")
    if not torch.isfinite(out.detach()).all():
        fail("gradient_norms returned NaN or inf: a layer without parameters, or whose "
             "parameters the loss does not use, should get 0.")
    if same(out, right, atol=1e-6, rtol=1e-4):
        return
    def replay(wrong):  # the wrong probe on the same model, with the same gradients left over
        for param, grad in zip(params, old):
            param.grad = None if grad is None else grad.clone()
        with torch.enable_grad():  # (name_mistake runs it under no_grad)
            return wrong(layers, loss_fn(x))

    name_mistake(out, _PROBE, stale, run=replay)
    worst = (out.detach().double() - right).abs().max().item()
    fail("gradient_norms differs from the norm of dloss/dparameters per layer "
         f"(case {case + 1}, largest difference {worst:.3g}).")


@exercise("5.3", "A per-layer gradient-norm probe", mistakes={"gradient_norms": _PROBE})
def check_gradient_norms(gradient_norms):
    expect_callable(gradient_norms, "your gradient-norm function",
                    "check_gradient_norms(gradient_norms)")
    for case, (layers, loss_fn, shape, dtype) in enumerate(_probe_models()):
        x = _input(shape, seed=300 + case, dtype=dtype)
        for stale in (False, True):
            _probe_case(gradient_norms, layers, loss_fn, x, stale, case)
