"""Checks for the exercises of chapter 6, LayerNorm vs BatchNorm, and Add & Norm.

Every check compares the student's code with PyTorch's own implementation
(``F.layer_norm``, ``nn.BatchNorm1d``, ``nn.RMSNorm``) on several shapes, dtypes and edge
cases. When the two differ, the check first computes what each usual mistake would have
produced (the wrong axis, the unbiased variance, eps outside the square root, ...) and,
if the student's result matches one of them, names that mistake.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._core import (
    call,
    diagnose,
    exercise,
    expect_callable,
    expect_class,
    expect_close,
    expect_shape,
    expect_unchanged,
    fail,
    forbidden,
    same,
)

# --------------------------------------------------------------------------- shared helpers


def _randn(*shape, seed: int, scale=1.0, shift=0.0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x * torch.as_tensor(scale, dtype=torch.float64) + torch.as_tensor(shift, dtype=torch.float64)).to(dtype)


def _normalize(x, dims, eps, correction=0, eps_outside=False, center=True):
    """(x - mean) / sqrt(var + eps) over ``dims``, in float64, with optional mistakes."""
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True) if center else torch.zeros((), dtype=x.dtype)
    var = x.var(dim=dims, keepdim=True, correction=correction) if center else (x**2).mean(dim=dims, keepdim=True)
    if eps_outside:
        return (x - mean) / (var.sqrt() + eps)
    return (x - mean) / torch.sqrt(var + eps)


def _param(module, name: str, shape, init: float, cls_name: str):
    value = getattr(module, name, None)
    if not isinstance(value, nn.Parameter):
        fail(
            f"{cls_name} has no parameter `{name}`: create it in __init__ as "
            f"self.{name} = nn.Parameter(torch.{'ones' if init == 1 else 'zeros'}({shape[0]})), "
            "so that it is trained and saved in the state_dict."
        )
    if tuple(value.shape) != tuple(shape):
        fail(f"{cls_name}.{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (one value per feature).")
    if not torch.equal(value.detach(), torch.full(tuple(shape), float(init), dtype=value.dtype)):
        fail(
            f"{cls_name}.{name} should start at {'ones' if init == 1 else 'zeros'}, so that a fresh "
            "layer only normalizes; it starts at other values."
        )
    return value


def _set_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value)


def _grads(fn, inputs, upstream, what: str):
    """Gradients of (fn() * upstream).sum() with respect to ``inputs`` (None where unused)."""
    out = fn()
    _expect_graph(out, what)
    return torch.autograd.grad((out * upstream).sum(), inputs, allow_unused=True)


def _expect_graph(out, what: str) -> None:
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        fail(
            f"{what}: the output does not require grad although its inputs do: the computation "
            "is cut off from autograd (torch.no_grad(), .detach(), .data, .item() or numpy)."
        )


def _compare_grads(mine, theirs, names, what: str) -> None:
    for name, a, b in zip(names, mine, theirs):
        if a is None:
            fail(
                f"{what}: no gradient reaches {name}: is it detached (.detach(), .data, "
                "torch.no_grad(), or numpy) on the way to the output?"
            )
        if not same(a, b, atol=1e-4, rtol=1e-3):
            fail(
                f"{what}: the outputs match but the gradient with respect to {name} does not "
                f"(largest difference {(a - b).abs().max().item():.3g}): is part of the "
                "computation detached (.detach(), .data, .item()) or done in place?"
            )


# --------------------------------------------------------------------------- exercise 6.1

_LAYER_NORM_BUILTINS = [(F, "layer_norm"), (torch, "layer_norm"), (torch, "native_layer_norm"), (nn.LayerNorm, "forward")]


def _reference_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def _call_layer_norm(layer_norm, x, normalized_shape, weight=None, bias=None, eps=None):
    kwargs = {"weight": weight, "bias": bias}
    if eps is not None:
        kwargs["eps"] = eps
    args = ", ".join(["x", str(tuple(normalized_shape))] + [f"{k}=..." for k, v in kwargs.items() if v is not None])
    before = x.detach().clone()
    with forbidden(
        _LAYER_NORM_BUILTINS,
        "your layer_norm calls PyTorch's layer norm (F.layer_norm, torch.layer_norm or "
        "nn.LayerNorm): the exercise is to write the formula yourself (mean, variance, sqrt).",
    ):
        y = call(layer_norm, x, tuple(normalized_shape), what=f"layer_norm({args})", **kwargs)
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"layer_norm({args}) for x of shape {tuple(x.shape)}")


def _layer_norm_mistakes(x, normalized_shape, weight, bias, eps):
    """(wrong result, message) for the usual mistakes, on input x."""
    k = len(normalized_shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    w = weight.double() if weight is not None else 1.0
    b = bias.double() if bias is not None else 0.0
    d = math.prod(normalized_shape)

    def affine(x_hat):
        return x_hat * w + b

    mistakes = [
        (
            affine(_normalize(x, dims, eps, correction=1)),
            f"your output is the right one times sqrt((d-1)/d) (= {math.sqrt((d - 1) / d):.3f} for "
            f"d = {d}): you used the unbiased variance, divided by d - 1 (torch.var's default). "
            "LayerNorm divides by d: use x.var(..., correction=0) or the mean of the squared "
            "deviations.",
        ),
        (
            affine(_normalize(x, dims, eps, eps_outside=True)),
            "your output is right for ordinary tokens but wrong for a token whose features "
            "barely vary: eps is added to the standard deviation, (x - mean) / (std + eps). It "
            "belongs inside the square root: (x - mean) / sqrt(var + eps).",
        ),
    ]
    if k == 1 and x.dim() >= 2:
        for axis, name in [(0, "dim 0 (across the batch, as BatchNorm does)"), (x.dim() - 2, f"dim {x.dim() - 2}")]:
            mistakes.append(
                (
                    affine(_normalize(x, (axis,), eps)),
                    f"your statistics are taken over {name}, not over the normalized "
                    "dimension: LayerNorm takes the mean and variance of each token's own "
                    "features, the last len(normalized_shape) dims.",
                )
            )
        mistakes.append(
            (
                affine(_normalize(x, tuple(range(x.dim())), eps)),
                "your mean and variance are taken over the whole tensor, not separately for "
                "every token: reduce over the last len(normalized_shape) dims only, with "
                "keepdim=True.",
            )
        )
    if k >= 2:
        mistakes.append(
            (
                affine(_normalize(x, (-1,), eps)),
                f"you normalized over the last dimension only, but normalized_shape = "
                f"{tuple(normalized_shape)} names the last {k} dimensions: one mean and one "
                f"variance per group of {d} values (reduce over dim=tuple(range(-{k}, 0))).",
            )
        )
    # any other set of axes: name the ones used and the ones LayerNorm needs
    for r in range(1, x.dim() + 1):
        for axes in itertools.combinations(range(x.dim()), r):
            if axes == dims:
                continue
            mistakes.append(
                (
                    affine(_normalize(x, axes, eps)),
                    f"your mean and variance are taken over dims {axes} of a "
                    f"{x.dim()}-D input, but normalized_shape = {tuple(normalized_shape)} names "
                    f"the last {k}, dims {dims}: LayerNorm reduces over exactly those, "
                    f"dim=tuple(range(-{k}, 0)), separately for every index of the others.",
                )
            )
    if weight is not None or bias is not None:
        x_hat = _normalize(x, dims, eps)
        mistakes += [
            (x_hat, "your output ignores weight and bias: multiply by weight (gamma) and add bias (beta) after normalizing."),
            (x_hat * w, "your output ignores bias: add it (beta) after scaling by weight."),
            (x_hat + b, "your output ignores weight: multiply the normalized x by it (gamma) before adding bias."),
            ((x_hat + b) * w, "you added bias before multiplying by weight: y = weight * x_hat + bias, in that order."),
        ]
        if weight is not None and bias is not None:
            mistakes.append((x_hat * b + w, "weight and bias are swapped: y = weight * x_hat + bias."))
    return mistakes


@exercise("6.1", "Layer norm over several trailing dimensions")
def check_layer_norm(layer_norm):
    """Compare ``layer_norm(x, normalized_shape, weight, bias, eps)`` with ``F.layer_norm``."""
    expect_callable(layer_norm, "your layer_norm function", "check_layer_norm(layer_norm)")

    # (x, normalized_shape, weight, bias, eps) cases; row 1 of the first is nearly constant
    quiet = _randn(2, 3, 5, seed=0, scale=2.0, shift=1.0)
    quiet[0, 1] = quiet[0, 1] * 1e-3  # a token whose features barely vary
    quiet[1, 2] = 3.0  # a constant token: variance exactly 0
    d6 = (6,)
    cases = [
        ("a (2, 3, 5) input", quiet, (5,), None, None, None),
        ("a (4, 7, 6) input with weight and bias", _randn(4, 7, 6, seed=1, scale=3.0, shift=-2.0),
         d6, _randn(6, seed=2), _randn(6, seed=3), None),
        ("a (2, 3, 4, 5) input with normalized_shape (4, 5)", _randn(2, 3, 4, 5, seed=4, scale=2.0),
         (4, 5), _randn(4, 5, seed=5), _randn(4, 5, seed=6), None),
        ("a (5, 33) input", _randn(5, 33, seed=7, shift=5.0), (33,), None, None, None),
        ("a single token of one feature, (3, 1)", _randn(3, 1, seed=8), (1,), None, _randn(1, seed=9), None),
    ]
    for what, x, shape, weight, bias, eps in cases:
        y = _call_layer_norm(layer_norm, x, shape, weight, bias, eps)
        expected = _reference_layer_norm(x, shape, weight, bias)
        if same(y, expected):
            continue
        if torch.isnan(y).any():
            if math.prod(shape) == 1:
                fail(
                    f"NaN on {what}: with a single feature, the unbiased variance divides 0 by "
                    "d - 1 = 0. LayerNorm uses the biased variance (divide by d), which is 0 "
                    "here, and the output is just bias."
                )
            fail(
                f"NaN on {what}, which holds a token whose features are all equal (variance 0): "
                "is eps missing? (x - mean) / sqrt(var + eps) stays finite when var = 0."
            )
        diagnose(y, _layer_norm_mistakes(x, shape, weight, bias, 1e-5))
        expect_close(y, expected, f"layer_norm differs from F.layer_norm on {what}")

    # the eps argument is used
    x = _randn(3, 8, seed=10, scale=0.05)  # variance 0.0025: eps = 1e-2 matters
    y = _call_layer_norm(layer_norm, x, (8,), eps=1e-2)
    expected = _reference_layer_norm(x, (8,), eps=1e-2)
    if not same(y, expected):
        diagnose(
            y,
            [(_reference_layer_norm(x, (8,)), "with eps=1e-2 your output is the one for eps=1e-5: the eps argument is ignored.")],
        )
        expect_close(y, expected, "layer_norm(x, (8,), eps=1e-2) differs from F.layer_norm")

    # float64 stays float64 and precise
    x = _randn(2, 4, 10, seed=11, dtype=torch.float64)
    y = _call_layer_norm(layer_norm, x, (10,))
    if y.dtype != torch.float64:
        fail(f"for a float64 input your output is {y.dtype}: keep the input's dtype (no .float()).")
    expected = _reference_layer_norm(x, (10,))
    if not same(y, expected, atol=1e-10, rtol=1e-8) and same(
        y, _reference_layer_norm(x.float(), (10,)).double(), atol=1e-6, rtol=1e-5
    ):
        fail(
            "for a float64 input your output has only float32 precision (it differs from the "
            f"float64 result by {(y - expected).abs().max().item():.1e}): part of it is "
            "computed in float32 (x.float(), a float32 constant or tensor). Compute in the "
            "input's dtype."
        )
    expect_close(y, expected, "layer_norm differs from F.layer_norm in float64", atol=1e-10, rtol=1e-8)

    # gradients with respect to x, weight and bias
    x = _randn(3, 5, 6, seed=12, scale=2.0).requires_grad_()
    weight = _randn(6, seed=13).requires_grad_()
    bias = _randn(6, seed=14).requires_grad_()
    upstream = _randn(3, 5, 6, seed=15)
    mine = _grads(lambda: _call_layer_norm(layer_norm, x, (6,), weight, bias), (x, weight, bias), upstream, "layer_norm")
    theirs = _grads(lambda: _reference_layer_norm(x, (6,), weight, bias), (x, weight, bias), upstream, "F.layer_norm")
    _compare_grads(mine, theirs, ["x", "weight", "bias"], "layer_norm")


# --------------------------------------------------------------------------- exercise 6.2

_BATCH_NORM_BUILTINS = [(F, "batch_norm"), (torch, "batch_norm"), (torch, "native_batch_norm")]
_BATCH_NORM_MESSAGE = (
    "your BatchNorm1d calls PyTorch's batch norm (F.batch_norm or torch.batch_norm): the "
    "exercise is to compute the statistics and update the running averages yourself."
)


def _bn_dims(x: torch.Tensor):
    return (0,) if x.dim() == 2 else (0, 2)


def _bn_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1) if x.dim() == 2 else v.view(1, -1, 1)


def _bn_apply(x, mean, var, weight, bias, eps):
    x = x.double()
    return (x - _bn_view(mean.double(), x)) / torch.sqrt(_bn_view(var.double(), x) + eps) * _bn_view(
        weight.double(), x
    ) + _bn_view(bias.double(), x)


def _call_bn(module, x, what):
    before = x.detach().clone()
    with forbidden(_BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
        y = call(module, x, what=what)
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"{what} for x of shape {tuple(x.shape)}")


def _buffer(module, name: str, num_features: int, init: float):
    buffers = dict(module.named_buffers(recurse=False))
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        fail(
            f"BatchNorm1d has no `{name}`: create it in __init__ with "
            f"self.register_buffer('{name}', torch.{'ones' if init == 1 else 'zeros'}({num_features}))."
        )
    if name not in buffers:
        fail(
            f"BatchNorm1d.{name} is not a buffer: register it with self.register_buffer('{name}', ...) "
            "so that it is saved in the state_dict and moves with .to(device), without being "
            "trained (a running statistic is not an nn.Parameter)."
        )
    if tuple(value.shape) != (num_features,) or not torch.equal(
        value, torch.full((num_features,), float(init), dtype=value.dtype)
    ):
        fail(f"BatchNorm1d.{name} should start as {'ones' if init == 1 else 'zeros'} of shape ({num_features},).")
    return value


def _check_running(student, reference, old_mean, old_var, x, momentum, step: str) -> None:
    mean_s, var_s = student.running_mean, student.running_var
    if mean_s.requires_grad or var_s.requires_grad:
        fail(
            f"after {step}, running_mean or running_var requires grad: the update is recorded by "
            "autograd. Update them under torch.no_grad() (or from .detach()ed batch statistics)."
        )
    mean_r, var_r = reference.running_mean, reference.running_var
    if same(mean_s, mean_r) and same(var_s, var_r):
        return
    dims = _bn_dims(x)
    xd = x.detach().double()
    batch_mean = xd.mean(dim=dims)
    unbiased, biased = xd.var(dim=dims, correction=1), xd.var(dim=dims, correction=0)
    old_mean, old_var = old_mean.double(), old_var.double()
    m = momentum
    if same(mean_s, old_mean) and same(var_s, old_var):
        fail(
            f"after {step} in training mode, running_mean and running_var have not changed: update "
            "them in every training-mode forward pass, running = (1 - momentum) * running + "
            "momentum * batch statistic."
        )
    if same(mean_s, m * old_mean + (1 - m) * batch_mean):
        fail(
            f"after {step}, running_mean = momentum * running + (1 - momentum) * batch: the momentum "
            "convention is reversed. In PyTorch momentum is the weight of the NEW batch statistic: "
            "running = (1 - momentum) * running + momentum * batch."
        )
    if same(mean_s, batch_mean) and not same(mean_r, batch_mean):
        fail(
            f"after {step}, running_mean equals the batch mean: it should be a running average, "
            "running = (1 - momentum) * running + momentum * batch_mean."
        )
    if same(mean_s, mean_r):
        if same(var_s, (1 - m) * old_var + m * biased):
            fail(
                f"after {step}, running_var holds a running average of the biased batch variance "
                "(divided by n). PyTorch normalizes a training batch with the biased variance but "
                "stores the unbiased one (divided by n - 1) in running_var."
            )
        if same(var_s, m * old_var + (1 - m) * unbiased):
            fail(
                f"after {step}, running_var = momentum * running + (1 - momentum) * batch: the "
                "momentum convention is reversed (momentum weighs the new batch statistic)."
            )
    expect_close(mean_s, mean_r, f"after {step}, running_mean differs from nn.BatchNorm1d's")
    expect_close(var_s, var_r, f"after {step}, running_var differs from nn.BatchNorm1d's")


def _check_train_output(y, x, student_running, weight, bias, eps, expected, what):
    if same(y, expected):
        return
    dims = _bn_dims(x)
    xd = x.detach().double()
    w, b = weight.detach(), bias.detach()
    mean = xd.mean(dim=dims)
    running_mean, running_var = student_running
    mistakes = [
        (
            _bn_apply(x, running_mean, running_var, w, b, eps),
            f"{what}: in training mode your output uses the running statistics. Training mode "
            "normalizes with the batch's own mean and (biased) variance; the running averages are "
            "for eval mode (self.training tells you which).",
        ),
        (
            _bn_apply(x, mean, xd.var(dim=dims, correction=1), w, b, eps),
            f"{what}: you normalized with the unbiased batch variance (divided by n - 1). "
            "BatchNorm normalizes a training batch with the biased variance (divided by n); only "
            "running_var stores the unbiased one.",
        ),
        (
            _bn_apply(x, mean, xd.var(dim=dims, correction=0), torch.ones_like(w), torch.zeros_like(b), eps),
            f"{what}: your output ignores weight and bias: y = weight * x_hat + bias, one weight "
            "and bias per feature.",
        ),
        (
            (xd - xd.mean(dim=1, keepdim=True)) / torch.sqrt(xd.var(dim=1, keepdim=True, correction=0) + eps)
            * _bn_view(w.double(), x) + _bn_view(b.double(), x),
            f"{what}: your statistics are taken over the features (dim 1), separately for each "
            "sample: that is a layer norm. BatchNorm takes them over the batch (dim 0, and dim 2 "
            "for (N, C, L) inputs), separately for each feature.",
        ),
    ]
    if x.dim() == 3:
        mistakes.append(
            (
                (xd - xd.mean(dim=0, keepdim=True)) / torch.sqrt(xd.var(dim=0, keepdim=True, correction=0) + eps)
                * _bn_view(w.double(), x) + _bn_view(b.double(), x),
                f"{what}: for an (N, C, L) input your statistics are per feature AND per position "
                "(over dim 0 only). nn.BatchNorm1d averages over dims 0 and 2 together: one mean "
                "and one variance per feature.",
            )
        )
    diagnose(y, mistakes)
    expect_close(y, expected, f"{what}: your output differs from nn.BatchNorm1d's")


@exercise("6.2", "BatchNorm1d with running statistics")
def check_batch_norm(BatchNorm1d):  # noqa: N803 - the argument is a class
    """Train and eval ``BatchNorm1d(num_features, eps, momentum)`` next to ``nn.BatchNorm1d``."""
    expect_class(BatchNorm1d, nn.Module, "your BatchNorm1d class", "check_batch_norm(BatchNorm1d)")
    if issubclass(BatchNorm1d, getattr(nn.modules.batchnorm, "_NormBase", nn.BatchNorm1d)):
        fail("your BatchNorm1d subclasses PyTorch's batch norm: write it from nn.Module yourself.")

    layouts = [
        ("(N, C) input", 5, {}, [(8, 5), (8, 5)], 0.1, 1e-5),
        ("(N, C, L) input", 3, {}, [(4, 3, 7), (2, 3, 5)], 0.1, 1e-5),
        ("(N, C) input with eps=1e-3, momentum=0.3", 4, {"eps": 1e-3, "momentum": 0.3}, [(6, 4), (6, 4)], 0.3, 1e-3),
    ]
    _check_batch_norm_eps(BatchNorm1d)
    for number, (layout, C, kwargs, shapes, momentum, eps) in enumerate(layouts):
        args = ", ".join([str(C)] + [f"{k}={v}" for k, v in kwargs.items()])
        with forbidden(_BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
            student = call(BatchNorm1d, C, what=f"BatchNorm1d({args})", **kwargs)
        reference = nn.BatchNorm1d(C, **kwargs)
        weight = _param(student, "weight", (C,), 1, "BatchNorm1d")
        bias = _param(student, "bias", (C,), 0, "BatchNorm1d")
        _buffer(student, "running_mean", C, 0)
        _buffer(student, "running_var", C, 1)
        new_w, new_b = _randn(C, seed=20 + number, scale=0.5, shift=1.0), _randn(C, seed=30 + number)
        for module_w, module_b in ((weight, bias), (reference.weight, reference.bias)):
            _set_(module_w, new_w)
            _set_(module_b, new_b)
        student.train()
        reference.train()

        # two training steps: outputs, gradients, running statistics
        for step, shape in enumerate(shapes):
            feature_shift = torch.linspace(-3, 3, C).view(1, C, *([1] * (len(shape) - 2)))
            x = (_randn(*shape, seed=40 + 10 * number + step, scale=2.0) + feature_shift).requires_grad_()
            old = (student.running_mean.detach().clone(), student.running_var.detach().clone())
            what = f"BatchNorm1d({args}) in training mode, step {step + 1}, {layout}"
            y = _call_bn(student, x, what)
            expected = reference(x)
            _check_train_output(y, x, old, weight, bias, eps, expected.detach().double(), what)
            upstream = _randn(*shape, seed=90 + step)
            _expect_graph(y, what)
            mine = torch.autograd.grad((y * upstream).sum(), (x, weight, bias), allow_unused=True)
            theirs = torch.autograd.grad((expected * upstream).sum(), (x, reference.weight, reference.bias))
            if mine[0] is not None and not same(mine[0], theirs[0], atol=1e-4, rtol=1e-3) and same(
                mine[1], theirs[1], atol=1e-4, rtol=1e-3
            ):
                fail(
                    f"{what}: the outputs match but the gradient with respect to x does not: are "
                    "the batch mean and variance detached? In training mode the gradient also "
                    "flows through the batch statistics."
                )
            _compare_grads(mine, theirs, ["x", "weight", "bias"], what)
            if momentum != 0.1 and same(
                student.running_mean, 0.9 * old[0].double() + 0.1 * x.detach().double().mean(dim=_bn_dims(x))
            ):
                fail(f"BatchNorm1d({args}): the running statistics were updated with momentum 0.1: the momentum argument is ignored.")
            _check_running(student, reference, old[0], old[1], x, momentum, f"training step {step + 1} ({layout})")

        # evaluation mode: running statistics, no update, any batch size
        student.eval()
        reference.eval()
        shape = shapes[0]
        feature_shift = torch.linspace(-3, 3, C).view(1, C, *([1] * (len(shape) - 2)))
        x = _randn(*shape, seed=70 + number, scale=2.0) + feature_shift
        frozen = (student.running_mean.detach().clone(), student.running_var.detach().clone())
        what = f"BatchNorm1d({args}) in eval mode, {layout}"
        with torch.no_grad():
            y = _call_bn(student, x, what)
            expected = reference(x).double()
            if not (torch.equal(student.running_mean, frozen[0]) and torch.equal(student.running_var, frozen[1])):
                fail(
                    f"{what}: the running statistics changed during an eval-mode forward pass: "
                    "update them only in training mode (if self.training: ...)."
                )
            if not same(y, expected):
                batch_stats = _bn_apply(
                    x, x.double().mean(dim=_bn_dims(x)), x.double().var(dim=_bn_dims(x), correction=0), new_w, new_b, eps
                )
                diagnose(
                    y,
                    [(
                        batch_stats,
                        f"{what}: your output uses the batch's own statistics. After .eval(), "
                        "BatchNorm normalizes with running_mean and running_var (check "
                        "self.training); that is what makes its output independent of the batch.",
                    )],
                )
                expect_close(y, expected, f"{what}: your output differs from nn.BatchNorm1d's")
            one = x[:1, :, :1] if x.dim() == 3 else x[:1]
            y_one = _call_bn(student, one, f"BatchNorm1d({args}) in eval mode on a batch of one")
            expect_close(
                y_one,
                reference(one).double(),
                f"BatchNorm1d({args}) in eval mode on a batch of one sample differs from "
                "nn.BatchNorm1d: in eval mode the running statistics are used, so a batch of one is fine",
            )



def _check_batch_norm_eps(BatchNorm1d) -> None:  # noqa: N803 - the argument is a class
    """A feature whose values are all equal (variance 0) and a quiet one: only eps helps.

    Fails only on the mistakes it recognises; anything else is left to the main checks.
    """
    what = "BatchNorm1d(3) in training mode, on a batch whose feature 0 is constant"
    with forbidden(_BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
        student = call(BatchNorm1d, 3, what="BatchNorm1d(3)")
    student.train()
    x = _randn(6, 3, seed=120, scale=2.0)
    x[:, 0] = 1.5  # variance exactly 0
    x[:, 1] = 0.01 * x[:, 1]  # variance about 4e-4, not far above eps = 1e-5
    with torch.no_grad():
        y = _call_bn(student, x, what)
        expected = nn.BatchNorm1d(3)(x).double()
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return  # the main checks below say what is wrong
    if not torch.isfinite(y[:, 0]).all():
        fail(
            f"{what}: your output is NaN (or inf) at that feature. Its variance is 0, so "
            "(x - mean) / sqrt(var) is 0/0: eps is missing. Normalize with "
            "(x - mean) / sqrt(var + eps), eps inside the square root."
        )
    if same(y, expected):
        return
    xd = x.double()
    mean, var = xd.mean(dim=0), xd.var(dim=0, correction=0)
    diagnose(
        y,
        [
            (
                (xd - mean) / (var.sqrt() + 1e-5),
                f"{what} and feature 1 quiet: eps is added to the standard deviation, "
                "(x - mean) / (sqrt(var) + eps). It belongs inside the root: "
                "(x - mean) / sqrt(var + eps).",
            ),
            (
                (xd - mean) / torch.sqrt(var + 1e-5 * (var > 0)),
                f"{what} and feature 1 quiet: eps is used only where the variance is 0. "
                "Add it to every variance: (x - mean) / sqrt(var + eps).",
            ),
        ],
    )


# --------------------------------------------------------------------------- exercise 6.3

_RMS_NORM_BUILTINS = [(F, "rms_norm"), (torch, "rms_norm")]


def _reference_rms_norm(x, weight, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + eps) * weight  # torch without RMSNorm


@exercise("6.3", "RMSNorm")
def check_rms_norm(RMSNorm):  # noqa: N803 - the argument is a class
    """Compare ``RMSNorm(normalized_shape, eps)`` with ``torch.nn.RMSNorm`` (or its formula)."""
    expect_class(RMSNorm, nn.Module, "your RMSNorm class", "check_rms_norm(RMSNorm)")
    if hasattr(nn, "RMSNorm") and issubclass(RMSNorm, nn.RMSNorm):
        fail("your RMSNorm subclasses torch.nn.RMSNorm: write it from nn.Module yourself.")
    message = "your RMSNorm calls PyTorch's rms_norm: write the formula yourself (mean of squares, sqrt)."

    quiet = _randn(2, 3, 8, seed=50, scale=2.0, shift=1.0)
    quiet[0, 1] *= 1e-4  # a token of tiny magnitude: where eps matters
    quiet[1, 0] = 0.0  # an all-zero token
    cases = [
        ("a (2, 3, 8) input", quiet, 8, 1e-6),
        ("a (5, 33) input", _randn(5, 33, seed=51, scale=3.0), 33, 1e-6),
        ("a (4, 1) input (one feature)", _randn(4, 1, seed=52), 1, 1e-6),
        ("a (3, 6) input with eps=1e-2", _randn(3, 6, seed=53, scale=0.05), 6, 1e-2),
    ]
    for what, x, d, eps in cases:
        with forbidden(_RMS_NORM_BUILTINS, message):
            norm = call(RMSNorm, d, eps=eps, what=f"RMSNorm({d}, eps={eps})")
        weight = _param(norm, "weight", (d,), 1, "RMSNorm")
        w = _randn(d, seed=60 + d, scale=0.5, shift=1.0)
        _set_(weight, w)
        before = x.clone()
        with torch.no_grad(), forbidden(_RMS_NORM_BUILTINS, message):
            y = call(norm, x, what=f"RMSNorm({d}, eps={eps})(x)")
        expect_unchanged(before, x, "x")
        y = expect_shape(y, x.shape, f"RMSNorm({d}) on {what}")
        expected = _reference_rms_norm(x.double(), w.double(), eps)
        if same(y, expected):
            continue
        if torch.isnan(y).any():
            fail(
                f"NaN on {what}, which holds an all-zero token: is eps missing? "
                "x / sqrt(mean(x**2) + eps) stays finite when x = 0."
            )
        xd, wd = x.double(), w.double()
        ms = (xd**2).mean(dim=-1, keepdim=True)
        diagnose(
            y,
            [
                (
                    _normalize(xd, (-1,), eps) * wd,
                    f"on {what} you subtracted the mean: that is LayerNorm. RMSNorm does not "
                    "center; it only divides by the root mean square, x / sqrt(mean(x**2) + eps).",
                ),
                (
                    xd / torch.sqrt((xd**2).sum(dim=-1, keepdim=True) + eps) * wd,
                    f"on {what} you divided by the root of the SUM of squares (the L2 norm). RMSNorm "
                    "divides by the root of the MEAN square: sqrt(mean(x**2) + eps), which is "
                    "sqrt(d) times smaller.",
                ),
                (
                    xd / (ms.sqrt() + eps) * wd,
                    f"on {what} eps is added outside the square root, x / (rms + eps): it belongs "
                    "inside, x / sqrt(mean(x**2) + eps).",
                ),
                (
                    xd / torch.sqrt(ms + eps),
                    f"on {what} your output ignores weight: multiply the normalized x by it.",
                ),
                (
                    xd * wd / torch.sqrt(((xd * wd) ** 2).mean(dim=-1, keepdim=True) + eps),
                    f"on {what} weight is applied before the normalization, to x: it belongs "
                    "after, y = weight * x / sqrt(mean(x**2) + eps), or the division undoes it.",
                ),
                (
                    _reference_rms_norm(xd, wd, 1e-6) if eps != 1e-6 else None,
                    f"on {what} your output is the one for eps=1e-6: the eps argument is ignored.",
                ),
                (
                    xd / torch.sqrt((xd**2).mean(dim=0, keepdim=True) + eps) * wd if x.size(0) > 1 else None,
                    f"on {what} the mean square is taken over dim 0 (across tokens): RMSNorm "
                    "reduces over the last dimension, each token on its own.",
                ),
            ],
        )
        expect_close(y, expected, f"RMSNorm differs from torch.nn.RMSNorm on {what}")

    # float64 and gradients
    norm = call(RMSNorm, 10, eps=1e-6, what="RMSNorm(10, eps=1e-6)")
    weight = _param(norm, "weight", (10,), 1, "RMSNorm").data
    x = _randn(3, 4, 10, seed=54, dtype=torch.float64)
    with torch.no_grad():
        y = call(norm.double(), x, what="RMSNorm(10).double()(x)")
    if y.dtype != torch.float64:
        fail(f"for a float64 input (and a .double() module) your output is {y.dtype}: keep the dtype.")
    expected = _reference_rms_norm(x, weight.double(), 1e-6)
    if not same(y, expected, atol=1e-10, rtol=1e-8):
        in_float32 = _reference_rms_norm(x.float(), weight.float(), 1e-6).double()
        if same(y, in_float32, atol=1e-6, rtol=1e-5):
            fail(
                "for a float64 input your output has only float32 precision (it differs from "
                f"the float64 result by {(y - expected).abs().max().item():.1e}): part of it is "
                "computed in float32 (x.float(), a float32 constant or tensor). Compute in "
                "the input's dtype."
            )
    expect_close(y, expected, "RMSNorm differs in float64", atol=1e-10, rtol=1e-8)
    norm = call(RMSNorm, 6, eps=1e-6, what="RMSNorm(6, eps=1e-6)")
    weight = _param(norm, "weight", (6,), 1, "RMSNorm")
    _set_(weight, _randn(6, seed=55))
    x = _randn(2, 5, 6, seed=56, scale=2.0).requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    upstream = _randn(2, 5, 6, seed=57)
    mine = _grads(lambda: call(norm, x, what="RMSNorm(6)(x)"), (x, weight), upstream, "RMSNorm")
    theirs = _grads(lambda: _reference_rms_norm(x, w_ref, 1e-6), (x, w_ref), upstream, "reference")
    _compare_grads(mine, theirs, ["x", "weight"], "RMSNorm")


# --------------------------------------------------------------------------- exercise 6.4


def _check_dropout_rescaling(ScaledAddNorm, d, x, s) -> None:  # noqa: N803
    """With the norm replaced by the identity, the kept sublayer values must be s / (1 - p)."""
    block = call(ScaledAddNorm, d, alpha=1.5, dropout=0.5, what=f"ScaledAddNorm({d}, alpha=1.5, dropout=0.5)")
    block.train()
    block.norm = nn.Identity()  # what reaches the norm: alpha * x + dropout(s)
    with torch.no_grad():
        out = call(block, x, s, what="ScaledAddNorm in training mode")
    branch = (out - 1.5 * x).double()
    sd = s.double()
    dropped = branch.abs() < 1e-5
    if not dropped.any() or dropped.all():
        return  # not plain dropout on s: the other checks judge it
    if (((branch - 2 * sd).abs() < 1e-5) | dropped).all():
        return  # kept values scaled by 1 / (1 - p) = 2
    if (((branch - sd).abs() < 1e-5) | dropped).all():
        fail(
            "with dropout=0.5 in training mode, the sublayer values your dropout keeps are "
            "not rescaled: they should be multiplied by 1 / (1 - p) = 2, so that the "
            "expected value of dropout(s) is s and training matches evaluation, where "
            "nothing is dropped. Use nn.Dropout, or divide the kept values by (1 - p)."
        )


@exercise("6.4", "Add & Norm with a scaled residual (DeepNorm)")
def check_scaled_add_norm(ScaledAddNorm):  # noqa: N803 - the argument is a class
    """``ScaledAddNorm(d_model, alpha, dropout)(x, s)`` must equal ``LayerNorm(alpha * x + dropout(s))``."""
    expect_class(ScaledAddNorm, nn.Module, "your ScaledAddNorm class", "check_scaled_add_norm(ScaledAddNorm)")
    d = 6
    for number, (alpha, shape) in enumerate([(2.0, (2, 5, d)), (1.0, (3, d)), (0.5, (1, 1, d))]):
        block = call(ScaledAddNorm, d, alpha=alpha, what=f"ScaledAddNorm({d}, alpha={alpha})")
        norm = getattr(block, "norm", None)
        if isinstance(norm, nn.Module) and getattr(norm, "weight", None) is None:
            fail(
                "ScaledAddNorm.norm has no learned gain and shift (`weight` and `bias` are "
                "None: nn.LayerNorm(d_model, elementwise_affine=False)?). The Add & Norm's "
                "LayerNorm has both, gamma and beta: self.norm = LayerNorm(d_model) or "
                "nn.LayerNorm(d_model)."
            )
        if not (isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor)):
            fail(
                "ScaledAddNorm has no layer norm at `.norm` with a `weight`: keep it there, as "
                "AddNorm does (self.norm = LayerNorm(d_model) or nn.LayerNorm(d_model))."
            )
        norm_bias = getattr(norm, "bias", None)
        if norm_bias is None:
            fail(
                "ScaledAddNorm.norm has a learned gain but no shift (`bias` is None: "
                "nn.LayerNorm(d_model, bias=False)?). The Add & Norm's LayerNorm has both, "
                "gamma and beta: nn.LayerNorm(d_model) or the chapter's LayerNorm."
            )
        if tuple(norm.weight.shape) != (d,) or not isinstance(norm_bias, torch.Tensor) or tuple(norm_bias.shape) != (d,):
            fail(f"ScaledAddNorm.norm should normalize over d_model = {d} features, with weight and bias of shape ({d},).")
        w, b = _randn(d, seed=80 + number, scale=0.5, shift=1.0), _randn(d, seed=85 + number)
        _set_(norm.weight, w)
        _set_(norm.bias, b)
        x = _randn(*shape, seed=90 + number, scale=2.0, shift=0.5)
        s = _randn(*shape, seed=95 + number, scale=0.7, shift=-1.0)
        what = f"ScaledAddNorm({d}, alpha={alpha})(x, sublayer_output) for shape {shape}"
        with torch.no_grad():
            y = expect_shape(call(block, x, s, what=what), shape, what)
        xd, sd, wd, bd = x.double(), s.double(), w.double(), b.double()

        def ln(t, wd=wd, bd=bd):
            return _normalize(t, (-1,), 1e-5) * wd + bd

        expected = ln(alpha * xd + sd)
        if same(y, expected):
            continue
        after = (
            "you added the residual after the norm, x + norm(sublayer_output). In Add & Norm "
            "the residual is added first and the sum is normalized: norm(alpha * x + sublayer_output)."
        )
        before = (
            "you normalized x before adding the sublayer output, norm(x) + sublayer_output. The "
            "norm acts on the sum, after the residual is added: norm(alpha * x + sublayer_output)."
        )
        candidates = [
            (alpha * xd + ln(sd), f"{what}: {after}"),
            (xd + ln(sd), f"{what}: {after}"),
            (ln(alpha * xd) + sd, f"{what}: {before}"),
            (ln(xd) + sd, f"{what}: {before}"),
            (alpha * xd + sd, f"{what}: your output is not normalized: apply self.norm to the sum."),
        ]
        if alpha != 1.0:
            candidates += [
                (ln(xd + alpha * sd), f"{what}: alpha scales the sublayer output; DeepNorm scales the residual x: norm(alpha * x + sublayer_output)."),
                (
                    ln(xd + sd),
                    f"{what}: your output equals LayerNorm(x + sublayer_output). Either alpha "
                    "is ignored, or it multiplies the whole sum, alpha * (x + sublayer_output), "
                    "whose overall scale the LayerNorm removes again. DeepNorm multiplies the "
                    "residual only: norm(alpha * x + sublayer_output).",
                ),
            ]
        candidates += [
            (ln(sd), f"{what}: the residual x is missing: norm(alpha * x + sublayer_output)."),
            (ln(alpha * xd), f"{what}: the sublayer output is missing: norm(alpha * x + sublayer_output)."),
        ]
        diagnose(y, candidates)
        expect_close(y, expected, f"{what} differs from LayerNorm(alpha * x + sublayer_output)")

    # dropout: only on the sublayer output, only in training mode
    block = call(ScaledAddNorm, d, alpha=1.5, dropout=0.5, what=f"ScaledAddNorm({d}, alpha=1.5, dropout=0.5)")
    x = _randn(4, 5, d, seed=100, scale=2.0)
    s = _randn(4, 5, d, seed=101)
    reference = F.layer_norm(1.5 * x + s, (d,), block.norm.weight.detach(), block.norm.bias.detach())
    block.eval()
    with torch.no_grad():
        y = call(block, x, s, what="ScaledAddNorm in eval mode")
    expect_close(
        y,
        reference,
        "with dropout=0.5, in eval mode, ScaledAddNorm differs from LayerNorm(alpha * x + s): is "
        "dropout still active after .eval()? Use nn.Dropout (or F.dropout(..., training=self.training))",
    )
    block.train()
    with torch.no_grad():
        zero = call(block, x, torch.zeros_like(s), what="ScaledAddNorm in training mode")
        first, second = call(block, x, s), call(block, x, s)
    if not same(zero, F.layer_norm(1.5 * x, (d,), block.norm.weight.detach(), block.norm.bias.detach())):
        fail(
            "with dropout=0.5 in training mode and a sublayer output of zeros, your output is not "
            "norm(alpha * x): dropout reaches the residual x (or the sum). It belongs on the "
            "sublayer output only: norm(alpha * x + dropout(sublayer_output))."
        )
    if torch.equal(first, second):
        fail(
            "with dropout=0.5 in training mode, two calls give the same output: dropout is not "
            "applied. Apply self.dropout (an nn.Dropout) to the sublayer output."
        )

    _check_dropout_rescaling(ScaledAddNorm, d, x, s)

    # gradients reach x, the sublayer output and the norm's parameters
    block = call(ScaledAddNorm, d, alpha=2.0, what=f"ScaledAddNorm({d}, alpha=2.0)")
    x = _randn(2, 3, d, seed=102).requires_grad_()
    s = _randn(2, 3, d, seed=103).requires_grad_()
    upstream = _randn(2, 3, d, seed=104)
    mine = _grads(lambda: call(block, x, s), (x, s), upstream, "ScaledAddNorm")
    theirs = _grads(lambda: F.layer_norm(2.0 * x + s, (d,)), (x, s), upstream, "reference")
    _compare_grads(mine, theirs, ["x", "sublayer_output"], "ScaledAddNorm")
