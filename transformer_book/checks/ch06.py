"""Checks for the exercises of chapter 6, LayerNorm vs BatchNorm, and Add & Norm.

Every check compares the student's code with PyTorch's own implementation
(``F.layer_norm``, ``nn.BatchNorm1d``, ``nn.RMSNorm``) on several shapes, dtypes and edge
cases. When the two differ, the check tries the table of usual mistakes in order (the
wrong axis, the unbiased variance, eps outside the square root, ...), each a wrong
function or class with the student's signature, and names the one the student's result
matches.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._core import (
    Caught,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_class,
    expect_close,
    expect_dtype,
    expect_shape,
    expect_unchanged,
    fail,
    name_mistake,
    randn,
    refused,
    same,
    with_weights_of,
)

# --------------------------------------------------------------------------- shared helpers


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
        fail(f"{cls_name} has no parameter `{name}`: create it in __init__ as "
             f"self.{name} = nn.Parameter(torch.{'ones' if init == 1 else 'zeros'}({shape[0]})), "
             "so that it is trained and saved in the state_dict.")
    if tuple(value.shape) != tuple(shape):
        fail(f"{cls_name}.{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (one value per feature).")
    if not torch.equal(value.detach(), torch.full(tuple(shape), float(init), dtype=value.dtype)):
        fail(f"{cls_name}.{name} should start at {'ones' if init == 1 else 'zeros'}, so that a "
             "fresh layer only normalizes; it starts at other values.")
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
        fail(f"{what}: the output does not require grad although its inputs do: the computation "
             "is cut off from autograd (torch.no_grad(), .detach(), .data, .item() or numpy).")


def _compare_grads(mine, theirs, names, what: str) -> None:
    for name, a, b in zip(names, mine, theirs):
        if a is None:
            fail(f"{what}: no gradient reaches {name}: is it detached (.detach(), .data, "
                 "torch.no_grad(), or numpy) on the way to the output?")
        if not same(a, b, atol=1e-4, rtol=1e-3):
            fail(f"{what}: the outputs match but the gradient with respect to {name} does not "
                 f"(largest difference {(a - b).abs().max().item():.3g}): is part of the "
                 "computation detached (.detach(), .data, .item()) or done in place?")


def _float32_only(y, expected, in_float32) -> None:
    """A float64 result that is right only to float32 precision: named."""
    if not same(y, expected, atol=1e-10, rtol=1e-8) and same(y, in_float32, atol=1e-6, rtol=1e-5):
        fail("for a float64 input your output has only float32 precision (it differs from the "
             f"float64 result by {(y - expected).abs().max().item():.1e}): part of it is computed "
             "in float32 (x.float(), a float32 constant or tensor). Compute in the input's dtype.")


# --------------------------------------------------------------------------- exercise 6.1

_LAYER_NORM_BUILTINS = [(F, "layer_norm"), (torch, "layer_norm"), (torch, "native_layer_norm"), (nn.LayerNorm, "forward")]


def _reference_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def _ln_variant(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, dims=None,
                correction=0, eps_outside=False, affine="w x + b", fixed_eps=None):
    """layer_norm with one option per mistake (the defaults give the right answer)."""
    k = len(normalized_shape)
    dims = {None: tuple(range(x.dim() - k, x.dim())), "batch": (0,), "second last": (x.dim() - 2,),
            "all": tuple(range(x.dim())), "last": (-1,)}.get(dims, dims)
    x_hat = _normalize(x, dims, eps if fixed_eps is None else fixed_eps, correction, eps_outside)
    w = weight.double() if weight is not None else 1.0
    b = bias.double() if bias is not None else 0.0
    return {"w x + b": lambda: x_hat * w + b, "none": lambda: x_hat, "no bias": lambda: x_hat * w,
            "no weight": lambda: x_hat + b, "(x + b) w": lambda: (x_hat + b) * w,
            "swapped": lambda: x_hat * b + w if weight is not None and bias is not None
            else x_hat * w + b}[affine]()


def _one_axis(x, normalized_shape, *_):
    return len(normalized_shape) == 1 and x.dim() >= 2


def _affine_given(x, normalized_shape, weight=None, bias=None, *_):
    return weight is not None or bias is not None


_STATS_AXIS = ("your statistics are taken over {}, not over the normalized dimension: LayerNorm "
               "takes the mean and variance of each token's own features, the last "
               "len(normalized_shape) dims.")
_LAYER_NORM = [
    Mistake(lambda x, shape, *_: f"your output is the right one times sqrt((d-1)/d) (= "
            f"{math.sqrt((math.prod(shape) - 1) / math.prod(shape)):.3f} for d = "
            f"{math.prod(shape)}): you used the unbiased variance, divided by d - 1 (torch.var's "
            "default). LayerNorm divides by d: use x.var(..., correction=0) or the mean of the "
            "squared deviations.", partial(_ln_variant, correction=1),
            expect=r"unbiased variance, divided by d - 1"),
    Mistake("your output is right for ordinary tokens but wrong for a token whose features "
            "barely vary: eps is added to the standard deviation, (x - mean) / (std + eps). It "
            "belongs inside the square root: (x - mean) / sqrt(var + eps).",
            partial(_ln_variant, eps_outside=True)),
    Mistake(_STATS_AXIS.format("dim 0 (across the batch, as BatchNorm does)"),
            partial(_ln_variant, dims="batch"), when=_one_axis),
    Mistake(lambda x, *_: _STATS_AXIS.format(f"dim {x.dim() - 2}"),
            partial(_ln_variant, dims="second last"), when=_one_axis,
            expect="your statistics are taken over dim 1, not"),
    Mistake("your mean and variance are taken over the whole tensor, not separately for every "
            "token: reduce over the last len(normalized_shape) dims only, with keepdim=True.",
            partial(_ln_variant, dims="all"), when=_one_axis),
    Mistake(lambda x, shape, *_: "you normalized over the last dimension only, but "
            f"normalized_shape = {tuple(shape)} names the last {len(shape)} dimensions: one mean "
            f"and one variance per group of {math.prod(shape)} values (reduce over "
            f"dim=tuple(range(-{len(shape)}, 0))).", partial(_ln_variant, dims="last"),
            when=lambda x, shape, *_: len(shape) >= 2,
            expect="normalized over the last dimension only"),
    Mistake("your output ignores weight and bias: multiply by weight (gamma) and add bias "
            "(beta) after normalizing.", partial(_ln_variant, affine="none"), when=_affine_given),
    Mistake("your output ignores bias: add it (beta) after scaling by weight.",
            partial(_ln_variant, affine="no bias"), when=_affine_given),
    Mistake("your output ignores weight: multiply the normalized x by it (gamma) before adding "
            "bias.", partial(_ln_variant, affine="no weight"), when=_affine_given),
    Mistake("you added bias before multiplying by weight: y = weight * x_hat + bias, in that "
            "order.", partial(_ln_variant, affine="(x + b) w"), when=_affine_given),
    Mistake("weight and bias are swapped: y = weight * x_hat + bias.",
            partial(_ln_variant, affine="swapped"),
            when=lambda x, shape, weight=None, bias=None, *_: weight is not None and bias is not None),
]


def _affine(y, weight, bias):
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _ln_in_place(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    var = x.var(dim=dims, keepdim=True, correction=0)
    x -= x.mean(dim=dims, keepdim=True)
    return _affine(x / torch.sqrt(var + eps), weight, bias)


def _ln_detached(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True).detach()
    var = x.var(dim=dims, keepdim=True, correction=0).detach()
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


_EPS = [Mistake("with eps=1e-2 your output is the one for eps=1e-5: the eps argument is "
                "ignored.", partial(_ln_variant, fixed_eps=1e-5))]
_LAYER_NORM_CAUGHT = [
    Caught(lambda x, shape, weight=None, bias=None, eps=1e-5: _ln_variant(
        x, shape, weight, bias, eps, dims=tuple(range(1, x.dim()))),
           r"taken over dims \(1, 2\) of a 3-D input.*names the last 1, dims \(2,\)"),
    Caught(lambda x, shape, weight=None, bias=None, eps=1e-5: _ln_variant(
        x.float(), shape, weight, bias, eps).to(x.dtype),
        "float64 input your output has only float32 precision"),
    Caught(partial(_ln_variant, fixed_eps=0.0), r"NaN .* is eps missing"),
    Caught(lambda x, shape, weight=None, bias=None, eps=1e-5: F.layer_norm(x, shape, weight, bias, eps),
           "calls PyTorch's layer norm"),
    Caught(_ln_in_place, "changed its input `x` in place"),
    Caught(_ln_detached, "gradient with respect to x does not"),
]


def _call_layer_norm(layer_norm, x, normalized_shape, weight=None, bias=None, eps=None):
    kwargs = {"weight": weight, "bias": bias}
    if eps is not None:
        kwargs["eps"] = eps
    args = ", ".join(["x", str(tuple(normalized_shape))] + [f"{k}=..." for k, v in kwargs.items() if v is not None])
    before = x.detach().clone()
    with refused([layer_norm], _LAYER_NORM_BUILTINS, "your layer_norm calls PyTorch's layer "
                 "norm (F.layer_norm, torch.layer_norm or nn.LayerNorm): the exercise is to "
                 "write the formula yourself (mean, variance, sqrt)."):
        y = call(layer_norm, x, tuple(normalized_shape), what=f"layer_norm({args})", **kwargs)
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"layer_norm({args}) for x of shape {tuple(x.shape)}")


def _name_axes(y, x, shape, weight, bias, eps) -> None:
    """Probe: statistics over any other set of axes, named with the ones LayerNorm needs."""
    k, dims = len(shape), tuple(range(x.dim() - len(shape), x.dim()))
    for r in range(1, x.dim() + 1):
        for axes in itertools.combinations(range(x.dim()), r):
            if axes != dims and same(y, _ln_variant(x, shape, weight, bias, eps, dims=axes)):
                fail(f"your mean and variance are taken over dims {axes} of a {x.dim()}-D input, "
                     f"but normalized_shape = {tuple(shape)} names the last {k}, dims {dims}: "
                     f"LayerNorm reduces over exactly those, dim=tuple(range(-{k}, 0)), "
                     "separately for every index of the others.")


def _layer_norm_case(layer_norm, what, x, shape, weight, bias) -> None:
    y = _call_layer_norm(layer_norm, x, shape, weight, bias)
    expected = _reference_layer_norm(x, shape, weight, bias)
    if same(y, expected):
        return
    if torch.isnan(y).any():
        if math.prod(shape) == 1:
            fail(f"NaN on {what}: with a single feature, the unbiased variance divides 0 by "
                 "d - 1 = 0. LayerNorm uses the biased variance (divide by d), which is 0 "
                 "here, and the output is just bias.")
        fail(f"NaN on {what}, which holds a token whose features are all equal (variance 0): "
             "is eps missing? (x - mean) / sqrt(var + eps) stays finite when var = 0.")
    name_mistake(y, _LAYER_NORM[:6], x, shape, weight, bias, 1e-5)
    _name_axes(y, x, shape, weight, bias, 1e-5)
    name_mistake(y, _LAYER_NORM[6:], x, shape, weight, bias, 1e-5)
    expect_close(y, expected, f"layer_norm differs from F.layer_norm on {what}")


@exercise("6.1", "Layer norm over several trailing dimensions",
          mistakes={"layer_norm": _LAYER_NORM + _EPS + _LAYER_NORM_CAUGHT})
def check_layer_norm(layer_norm):
    """Compare ``layer_norm(x, normalized_shape, weight, bias, eps)`` with ``F.layer_norm``."""
    expect_callable(layer_norm, "your layer_norm function", "check_layer_norm(layer_norm)")
    # (x, normalized_shape, weight, bias) cases; row 1 of the first is nearly constant
    quiet = randn(2, 3, 5, seed=0, scale=2.0, shift=1.0)
    quiet[0, 1] = quiet[0, 1] * 1e-3  # a token whose features barely vary
    quiet[1, 2] = 3.0  # a constant token: variance exactly 0
    cases = [
        ("a (2, 3, 5) input", quiet, (5,), None, None),
        ("a (4, 7, 6) input with weight and bias", randn(4, 7, 6, seed=1, scale=3.0, shift=-2.0),
         (6,), randn(6, seed=2), randn(6, seed=3)),
        ("a (2, 3, 4, 5) input with normalized_shape (4, 5)", randn(2, 3, 4, 5, seed=4, scale=2.0),
         (4, 5), randn(4, 5, seed=5), randn(4, 5, seed=6)),
        ("a (5, 33) input", randn(5, 33, seed=7, shift=5.0), (33,), None, None),
        ("a single token of one feature, (3, 1)", randn(3, 1, seed=8), (1,), None, randn(1, seed=9)),
    ]
    for case in cases:
        _layer_norm_case(layer_norm, *case)
    # the eps argument is used
    x = randn(3, 8, seed=10, scale=0.05)  # variance 0.0025: eps = 1e-2 matters
    y = _call_layer_norm(layer_norm, x, (8,), eps=1e-2)
    expected = _reference_layer_norm(x, (8,), eps=1e-2)
    if not same(y, expected):
        name_mistake(y, _EPS, x, (8,), None, None, 1e-2)
        expect_close(y, expected, "layer_norm(x, (8,), eps=1e-2) differs from F.layer_norm")
    # float64 stays float64 and precise
    x = randn(2, 4, 10, seed=11, dtype=torch.float64)
    y = _call_layer_norm(layer_norm, x, (10,))
    expect_dtype(y, torch.float64, f"for a float64 input your output is {y.dtype}: keep the "
                 "input's dtype (no .float()).")
    expected = _reference_layer_norm(x, (10,))
    _float32_only(y, expected, _reference_layer_norm(x.float(), (10,)).double())
    expect_close(y, expected, "layer_norm differs from F.layer_norm in float64", atol=1e-10, rtol=1e-8)
    # gradients with respect to x, weight and bias
    x = randn(3, 5, 6, seed=12, scale=2.0).requires_grad_()
    weight = randn(6, seed=13).requires_grad_()
    bias = randn(6, seed=14).requires_grad_()
    upstream = randn(3, 5, 6, seed=15)
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


class _BatchNorm(nn.Module):
    """A right BatchNorm1d whose pieces the wrong ones below change one at a time."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def batch_stats(self, x):
        return x.mean(dim=_bn_dims(x)), x.var(dim=_bn_dims(x), correction=0)

    def update(self, mean, var, n, m_new=None, m_var=None):
        """running = (1 - m) * running + m * batch; running_var with the unbiased variance."""
        m = self.momentum if m_new is None else m_new
        with torch.no_grad():
            self.running_mean.mul_(1 - m).add_(m * mean)
            m = m if m_var is None else m_var
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))

    def normalize(self, x, mean, var):
        return self.affine(x, (x - _bn_view(mean, x)) / torch.sqrt(_bn_view(var, x) + self.eps))

    def affine(self, x, x_hat):
        return x_hat * _bn_view(self.weight, x) + _bn_view(self.bias, x)

    def forward(self, x):
        if not self.training:
            return self.normalize(x, self.running_mean, self.running_var)
        mean, var = self.batch_stats(x)
        self.update(mean, var, x.numel() // x.size(1))
        return self.normalize(x, mean, var)


def _bn(**methods):
    return type("BatchNorm1d", (_BatchNorm,), methods)


def _bn_train(normalize):
    """A BatchNorm1d whose training-mode output is ``normalize(self, x)`` (updates kept)."""

    def forward(self, x):
        if not self.training:
            return _BatchNorm.forward(self, x)
        out = normalize(self, x)
        self.update(*self.batch_stats(x), x.numel() // x.size(1))
        return out

    return _bn(forward=forward)


def _per_position(self, x):
    if x.dim() == 2:
        return self.normalize(x, *self.batch_stats(x))
    mean, var = x.mean(dim=0), x.var(dim=0, correction=0)  # (C, L): per feature and position
    return self.affine(x, (x - mean) / torch.sqrt(var + self.eps))


def _over_features(self, x):
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, keepdim=True, correction=0)
    return self.affine(x, (x - mean) / torch.sqrt(var + self.eps))


def _bn_eps(outside: bool):
    """A BatchNorm1d with eps outside the root, or only where the variance is 0."""

    def normalize(self, x, mean, var):
        mean, var = _bn_view(mean, x), _bn_view(var, x)
        root = var.sqrt() + self.eps if outside else torch.sqrt(var + self.eps * (var == 0))
        return self.affine(x, (x - mean) / root)

    return _bn(normalize=normalize)


def _running_symptom(test):
    return lambda actual, found: bool(test(found))


_RUNNING = [  # found: the running statistics next to what each mistake would leave
    Mistake(" in training mode, running_mean and running_var have not changed: update them in "
            "every training-mode forward pass, running = (1 - momentum) * running + momentum * "
            "batch statistic.", _bn(update=lambda self, *a: None),
            symptom=_running_symptom(lambda f: same(f["mean"], f["old_mean"]) and same(f["var"], f["old_var"]))),
    Mistake(", running_mean = momentum * running + (1 - momentum) * batch: the momentum "
            "convention is reversed. In PyTorch momentum is the weight of the NEW batch "
            "statistic: running = (1 - momentum) * running + momentum * batch.",
            _bn(update=lambda self, mean, var, n: _BatchNorm.update(self, mean, var, n, 1 - self.momentum)),
            symptom=_running_symptom(lambda f: same(f["mean"], f["m"] * f["old_mean"] + (1 - f["m"]) * f["batch_mean"]))),
    Mistake(", running_mean equals the batch mean: it should be a running average, running = "
            "(1 - momentum) * running + momentum * batch_mean.",
            _bn(update=lambda self, mean, var, n: _BatchNorm.update(self, mean, var, n, 1.0)),
            symptom=_running_symptom(lambda f: same(f["mean"], f["batch_mean"]) and not same(f["mean_r"], f["batch_mean"]))),
    Mistake(", running_var holds a running average of the biased batch variance (divided by n). "
            "PyTorch normalizes a training batch with the biased variance but stores the "
            "unbiased one (divided by n - 1) in running_var.",
            _bn(update=lambda self, mean, var, n: _BatchNorm.update(self, mean, var * (n - 1) / n, n)),
            symptom=_running_symptom(lambda f: same(f["mean"], f["mean_r"]) and same(
                f["var"], (1 - f["m"]) * f["old_var"] + f["m"] * f["biased"]))),
    Mistake(", running_var = momentum * running + (1 - momentum) * batch: the momentum "
            "convention is reversed (momentum weighs the new batch statistic).",
            _bn(update=lambda self, mean, var, n: _BatchNorm.update(self, mean, var, n, m_var=1 - self.momentum)),
            symptom=_running_symptom(lambda f: same(f["mean"], f["mean_r"]) and same(
                f["var"], f["m"] * f["old_var"] + (1 - f["m"]) * f["unbiased"]))),
]


def _check_running(student, reference, old_mean, old_var, x, momentum, step: str) -> None:
    mean_s, var_s = student.running_mean, student.running_var
    if mean_s.requires_grad or var_s.requires_grad:
        fail(f"after {step}, running_mean or running_var requires grad: the update is recorded by "
             "autograd. Update them under torch.no_grad() (or from .detach()ed batch statistics).")
    mean_r, var_r = reference.running_mean, reference.running_var
    if same(mean_s, mean_r) and same(var_s, var_r):
        return
    xd = x.detach().double()
    found = dict(mean=mean_s, var=var_s, old_mean=old_mean.double(), old_var=old_var.double(),
                 batch_mean=xd.mean(dim=_bn_dims(x)), mean_r=mean_r, m=momentum,
                 biased=xd.var(dim=_bn_dims(x), correction=0),
                 unbiased=xd.var(dim=_bn_dims(x), correction=1))
    name_mistake(None, _RUNNING, found, prefix=f"after {step}")
    expect_close(mean_s, mean_r, f"after {step}, running_mean differs from nn.BatchNorm1d's")
    expect_close(var_s, var_r, f"after {step}, running_var differs from nn.BatchNorm1d's")


_TRAIN = [  # run from the student's weights and running statistics before the step
    Mistake("in training mode your output uses the running statistics. Training mode normalizes "
            "with the batch's own mean and (biased) variance; the running averages are for eval "
            "mode (self.training tells you which).",
            _bn_train(lambda self, x: self.normalize(x, self.running_mean, self.running_var))),
    Mistake("you normalized with the unbiased batch variance (divided by n - 1). BatchNorm "
            "normalizes a training batch with the biased variance (divided by n); only "
            "running_var stores the unbiased one.",
            _bn_train(lambda self, x: self.normalize(x, x.mean(dim=_bn_dims(x)), x.var(dim=_bn_dims(x))))),
    Mistake("your output ignores weight and bias: y = weight * x_hat + bias, one weight and "
            "bias per feature.",
            _bn_train(lambda self, x: (x - _bn_view(self.batch_stats(x)[0], x)) / torch.sqrt(
                _bn_view(self.batch_stats(x)[1], x) + self.eps))),
    Mistake("your statistics are taken over the features (dim 1), separately for each sample: "
            "that is a layer norm. BatchNorm takes them over the batch (dim 0, and dim 2 for (N, "
            "C, L) inputs), separately for each feature.", _bn_train(_over_features)),
    Mistake("for an (N, C, L) input your statistics are per feature AND per position (over dim "
            "0 only). nn.BatchNorm1d averages over dims 0 and 2 together: one mean and one "
            "variance per feature.", _bn_train(_per_position)),
]
_EVAL = [
    Mistake("your output uses the batch's own statistics. After .eval(), BatchNorm normalizes "
            "with running_mean and running_var (check self.training); that is what makes its "
            "output independent of the batch.",
            _bn(forward=lambda self, x: self.normalize(x, *self.batch_stats(x)) if not self.training
                else _BatchNorm.forward(self, x))),
]
_EPS_BN = [
    Mistake(" and feature 1 quiet: eps is added to the standard deviation, (x - mean) / "
            "(sqrt(var) + eps). It belongs inside the root: (x - mean) / sqrt(var + eps).",
            _bn_eps(outside=True)),
    Mistake(" and feature 1 quiet: eps is used only where the variance is 0. Add it to every "
            "variance: (x - mean) / sqrt(var + eps).", _bn_eps(outside=False)),
]


def _bn_no_eps(self, x, mean, var):
    return self.affine(x, (x - _bn_view(mean, x)) / torch.sqrt(_bn_view(var, x)))


def _bn_updates_in_eval(self, x):
    if not self.training:
        self.update(*self.batch_stats(x), max(2, x.numel() // x.size(1)))
    return _BatchNorm.forward(self, x)


def _bn_plain_attributes(self, num_features, eps=1e-5, momentum=0.1):
    nn.Module.__init__(self)
    self.eps, self.momentum = eps, momentum
    self.weight = nn.Parameter(torch.ones(num_features))
    self.bias = nn.Parameter(torch.zeros(num_features))
    self.running_mean = torch.zeros(num_features)  # a plain attribute
    self.running_var = torch.ones(num_features)


def _bn_graph_update(self, mean, var, n):
    m = self.momentum
    self.running_mean = (1 - m) * self.running_mean + m * mean
    self.running_var = (1 - m) * self.running_var + m * var * n / (n - 1)


_BATCH_NORM_CAUGHT = [
    Caught(_bn(normalize=_bn_no_eps), r"feature 0 is constant.*NaN.*eps is missing"),
    Caught(_bn(forward=_bn_updates_in_eval), r"running statistics changed during an eval-mode forward pass"),
    Caught(_bn(batch_stats=lambda self, x: tuple(t.detach() for t in _BatchNorm.batch_stats(self, x))),
           r"are the batch mean and variance detached"),
    Caught(_bn(__init__=_bn_plain_attributes), r"running_mean is not a buffer"),
    Caught(_bn(update=lambda self, mean, var, n: _BatchNorm.update(self, mean, var, n, 0.1)),
           r"the momentum argument is ignored"),
    Caught(type("BatchNorm1d", (nn.BatchNorm1d,), {}), r"subclasses PyTorch's batch norm"),
    Caught(_bn(update=_bn_graph_update), r"requires grad"),
    Caught(_bn(forward=lambda self, x: F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                                    self.bias, self.training, self.momentum, self.eps)),
           r"calls PyTorch's batch norm"),
]


def _call_bn(module, x, what):
    before = x.detach().clone()
    with refused([type(module)], _BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
        y = call(module, x, what=what)
    expect_unchanged(before, x.detach(), "x")
    return expect_shape(y, x.shape, f"{what} for x of shape {tuple(x.shape)}")


def _buffer(module, name: str, num_features: int, init: float):
    buffers = dict(module.named_buffers(recurse=False))
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        fail(f"BatchNorm1d has no `{name}`: create it in __init__ with self.register_buffer("
             f"'{name}', torch.{'ones' if init == 1 else 'zeros'}({num_features})).")
    if name not in buffers:
        fail(f"BatchNorm1d.{name} is not a buffer: register it with self.register_buffer("
             f"'{name}', ...) so that it is saved in the state_dict and moves with .to(device), "
             "without being trained (a running statistic is not an nn.Parameter).")
    if not same(value, torch.full((num_features,), float(init)), atol=0, rtol=0):
        fail(f"BatchNorm1d.{name} should start as {'ones' if init == 1 else 'zeros'} of shape ({num_features},).")
    return value


def _bn_train_step(student, reference, weight, bias, x, momentum, eps, what, args, step, stage) -> None:
    old = (student.running_mean.detach().clone(), student.running_var.detach().clone())
    state = {name: value.detach().clone() for name, value in student.state_dict().items()}
    y = _call_bn(student, x, what)
    expected = reference(x)
    if not same(y, expected.detach().double()):
        name_mistake(y, _TRAIN, prefix=f"{what}: ", run=with_weights_of(
            student, x.detach(), state=state, training=True,
            build=lambda c: c(weight.numel(), eps=eps, momentum=momentum)))
        expect_close(y, expected.detach().double(), f"{what}: your output differs from "
                     "nn.BatchNorm1d's")
    upstream = randn(*x.shape, seed=90 + step)
    mine = _grads(lambda: y, (x, weight, bias), upstream, what)
    theirs = _grads(lambda: expected, (x, reference.weight, reference.bias), upstream, what)
    if mine[0] is not None and not same(mine[0], theirs[0], atol=1e-4, rtol=1e-3) and same(
        mine[1], theirs[1], atol=1e-4, rtol=1e-3
    ):
        fail(f"{what}: the outputs match but the gradient with respect to x does not: are the "
             "batch mean and variance detached? In training mode the gradient also flows "
             "through the batch statistics.")
    _compare_grads(mine, theirs, ["x", "weight", "bias"], what)
    if momentum != 0.1 and same(
        student.running_mean, 0.9 * old[0].double() + 0.1 * x.detach().double().mean(dim=_bn_dims(x))
    ):
        fail(f"BatchNorm1d({args}): the running statistics were updated with momentum 0.1: the "
             "momentum argument is ignored.")
    _check_running(student, reference, old[0], old[1], x, momentum, stage)


def _bn_eval(student, reference, x, new_w, new_b, eps, what, args) -> None:
    frozen = (student.running_mean.detach().clone(), student.running_var.detach().clone())
    with torch.no_grad():
        y = _call_bn(student, x, what)
        expected = reference(x).double()
        if not (torch.equal(student.running_mean, frozen[0]) and torch.equal(student.running_var, frozen[1])):
            fail(f"{what}: the running statistics changed during an eval-mode forward pass: "
                 "update them only in training mode (if self.training: ...).")
        if not same(y, expected):
            name_mistake(y, _EVAL, prefix=f"{what}: ", run=with_weights_of(
                student, x, build=lambda c: c(new_w.numel(), eps=eps)))
            expect_close(y, expected, f"{what}: your output differs from nn.BatchNorm1d's")
        one = x[:1, :, :1] if x.dim() == 3 else x[:1]
        y_one = _call_bn(student, one, f"BatchNorm1d({args}) in eval mode on a batch of one")
        expect_close(y_one, reference(one).double(), f"BatchNorm1d({args}) in eval mode on a "
                     "batch of one sample differs from nn.BatchNorm1d: in eval mode the running "
                     "statistics are used, so a batch of one is fine")


def _bn_layout(BatchNorm1d, number, layout, C, kwargs, shapes, momentum, eps) -> None:  # noqa: N803
    args = ", ".join([str(C)] + [f"{k}={v}" for k, v in kwargs.items()])
    with refused([BatchNorm1d], _BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
        student = call(BatchNorm1d, C, what=f"BatchNorm1d({args})", **kwargs)
    reference = nn.BatchNorm1d(C, **kwargs)
    weight = _param(student, "weight", (C,), 1, "BatchNorm1d")
    bias = _param(student, "bias", (C,), 0, "BatchNorm1d")
    _buffer(student, "running_mean", C, 0)
    _buffer(student, "running_var", C, 1)
    new_w, new_b = randn(C, seed=20 + number, scale=0.5, shift=1.0), randn(C, seed=30 + number)
    for module_w, module_b in ((weight, bias), (reference.weight, reference.bias)):
        _set_(module_w, new_w)
        _set_(module_b, new_b)
    student.train()
    reference.train()
    for step, shape in enumerate(shapes):  # two training steps: outputs, gradients, running stats
        feature_shift = torch.linspace(-3, 3, C).view(1, C, *([1] * (len(shape) - 2)))
        x = (randn(*shape, seed=40 + 10 * number + step, scale=2.0) + feature_shift).requires_grad_()
        what = f"BatchNorm1d({args}) in training mode, step {step + 1}, {layout}"
        _bn_train_step(student, reference, weight, bias, x, momentum, eps, what, args, step,
                       f"training step {step + 1} ({layout})")
    # evaluation mode: running statistics, no update, any batch size
    student.eval()
    reference.eval()
    feature_shift = torch.linspace(-3, 3, C).view(1, C, *([1] * (len(shapes[0]) - 2)))
    x = randn(*shapes[0], seed=70 + number, scale=2.0) + feature_shift
    _bn_eval(student, reference, x, new_w, new_b, eps, f"BatchNorm1d({args}) in eval mode, {layout}", args)


@exercise("6.2", "BatchNorm1d with running statistics",
          mistakes={"BatchNorm1d": _RUNNING + _TRAIN + _EVAL + _EPS_BN + _BATCH_NORM_CAUGHT})
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
    for number, layout in enumerate(layouts):
        _bn_layout(BatchNorm1d, number, *layout)


def _check_batch_norm_eps(BatchNorm1d) -> None:  # noqa: N803 - the argument is a class
    """A feature whose values are all equal (variance 0) and a quiet one: only eps helps.

    Fails only on the mistakes it recognises; anything else is left to the main checks.
    """
    what = "BatchNorm1d(3) in training mode, on a batch whose feature 0 is constant"
    with refused([BatchNorm1d], _BATCH_NORM_BUILTINS, _BATCH_NORM_MESSAGE):
        student = call(BatchNorm1d, 3, what="BatchNorm1d(3)")
    student.train()
    x = randn(6, 3, seed=120, scale=2.0)
    x[:, 0] = 1.5  # variance exactly 0
    x[:, 1] = 0.01 * x[:, 1]  # variance about 4e-4, not far above eps = 1e-5
    with torch.no_grad():
        y = _call_bn(student, x, what)
        expected = nn.BatchNorm1d(3)(x).double()
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return  # the main checks below say what is wrong
    if not torch.isfinite(y[:, 0]).all():
        fail(f"{what}: your output is NaN (or inf) at that feature. Its variance is 0, so "
             "(x - mean) / sqrt(var) is 0/0: eps is missing. Normalize with "
             "(x - mean) / sqrt(var + eps), eps inside the square root.")
    if not same(y, expected):
        name_mistake(y, _EPS_BN, prefix=what, run=with_weights_of(
            student, x, training=True, build=lambda c: c(3)))


# --------------------------------------------------------------------------- exercise 6.3

_RMS_NORM_BUILTINS = [(F, "rms_norm"), (torch, "rms_norm")]


def _reference_rms_norm(x, weight, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + eps) * weight  # torch without RMSNorm


class _RMSNorm(nn.Module):
    """A right RMSNorm; ``_rms(...)`` changes its formula, one mistake at a time."""

    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def _rms(forward):
    return type("RMSNorm", (_RMSNorm,), {"forward": forward})


def _rms_weight_first(self, x):
    xw = x * self.weight  # scaled before the normalization
    return xw / torch.sqrt((xw**2).mean(dim=-1, keepdim=True) + self.eps)


def _rms_in_float32(self, x):
    x32 = x.float()  # wrong for a float64 input
    return (x32 / torch.sqrt((x32**2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rms_plain_weight(self, normalized_shape, eps=1e-6):
    nn.Module.__init__(self)
    self.eps, self.weight = eps, torch.ones(normalized_shape)


_RMS = [  # named with the student's own weight
    Mistake("you subtracted the mean: that is LayerNorm. RMSNorm does not center; it only "
            "divides by the root mean square, x / sqrt(mean(x**2) + eps).",
            _rms(lambda self, x: _RMSNorm.forward(self, x - x.mean(dim=-1, keepdim=True)))),
    Mistake("you divided by the root of the SUM of squares (the L2 norm). RMSNorm divides by the "
            "root of the MEAN square: sqrt(mean(x**2) + eps), which is sqrt(d) times smaller.",
            _rms(lambda self, x: x / torch.sqrt((x**2).sum(dim=-1, keepdim=True) + self.eps) * self.weight)),
    Mistake("eps is added outside the square root, x / (rms + eps): it belongs inside, "
            "x / sqrt(mean(x**2) + eps).",
            _rms(lambda self, x: x / ((x**2).mean(dim=-1, keepdim=True).sqrt() + self.eps) * self.weight)),
    Mistake("your output ignores weight: multiply the normalized x by it.",
            _rms(lambda self, x: x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + self.eps))),
    Mistake("weight is applied before the normalization, to x: it belongs after, y = weight * x "
            "/ sqrt(mean(x**2) + eps), or the division undoes it.", _rms(_rms_weight_first)),
    Mistake("your output is the one for eps=1e-6: the eps argument is ignored.",
            _rms(lambda self, x: x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + 1e-6) * self.weight),
            when=lambda x, eps: eps != 1e-6),
    Mistake("the mean square is taken over dim 0 (across tokens): RMSNorm reduces over the last "
            "dimension, each token on its own.",
            _rms(lambda self, x: x / torch.sqrt((x**2).mean(dim=0, keepdim=True) + self.eps) * self.weight),
            when=lambda x, eps: x.size(0) > 1, expect="taken over dim 0"),
    Caught(_rms(lambda self, x: x / (x**2).mean(dim=-1, keepdim=True).sqrt() * self.weight),
           r"NaN .* is eps missing"),
    Caught(type("RMSNorm", (_RMSNorm,), {"__init__": _rms_plain_weight}), r"has no parameter `weight`"),
    Caught(_rms(_rms_in_float32), r"float64 input your output has only float32 precision"),
]
if hasattr(nn, "RMSNorm"):
    _RMS.append(Caught(type("RMSNorm", (nn.RMSNorm,), {}), r"subclasses torch.nn.RMSNorm"))


def _rms_case(RMSNorm, what, x, d, eps, message) -> None:  # noqa: N803
    with refused([RMSNorm], _RMS_NORM_BUILTINS, message):
        norm = call(RMSNorm, d, eps=eps, what=f"RMSNorm({d}, eps={eps})")
    weight = _param(norm, "weight", (d,), 1, "RMSNorm")
    w = randn(d, seed=60 + d, scale=0.5, shift=1.0)
    _set_(weight, w)
    before = x.clone()
    with torch.no_grad(), refused([RMSNorm], _RMS_NORM_BUILTINS, message):
        y = call(norm, x, what=f"RMSNorm({d}, eps={eps})(x)")
    expect_unchanged(before, x, "x")
    y = expect_shape(y, x.shape, f"RMSNorm({d}) on {what}")
    expected = _reference_rms_norm(x.double(), w.double(), eps)
    if same(y, expected):
        return
    if torch.isnan(y).any():
        fail(f"NaN on {what}, which holds an all-zero token: is eps missing? "
             "x / sqrt(mean(x**2) + eps) stays finite when x = 0.")
    name_mistake(y, _RMS, x, eps, run=with_weights_of(norm, x, build=lambda c: c(d, eps=eps)), prefix=f"on {what} ")
    expect_close(y, expected, f"RMSNorm differs from torch.nn.RMSNorm on {what}")


def _rms_float64_and_gradients(RMSNorm) -> None:  # noqa: N803
    norm = call(RMSNorm, 10, eps=1e-6, what="RMSNorm(10, eps=1e-6)")
    weight = _param(norm, "weight", (10,), 1, "RMSNorm").data
    x = randn(3, 4, 10, seed=54, dtype=torch.float64)
    with torch.no_grad():
        y = call(norm.double(), x, what="RMSNorm(10).double()(x)")
    expect_dtype(y, torch.float64, f"for a float64 input (and a .double() module) your output is "
                 f"{y.dtype}: keep the dtype.")
    expected = _reference_rms_norm(x, weight.double(), 1e-6)
    _float32_only(y, expected, _reference_rms_norm(x.float(), weight.float(), 1e-6).double())
    expect_close(y, expected, "RMSNorm differs in float64", atol=1e-10, rtol=1e-8)
    norm = call(RMSNorm, 6, eps=1e-6, what="RMSNorm(6, eps=1e-6)")
    weight = _param(norm, "weight", (6,), 1, "RMSNorm")
    _set_(weight, randn(6, seed=55))
    x = randn(2, 5, 6, seed=56, scale=2.0).requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    upstream = randn(2, 5, 6, seed=57)
    mine = _grads(lambda: call(norm, x, what="RMSNorm(6)(x)"), (x, weight), upstream, "RMSNorm")
    theirs = _grads(lambda: _reference_rms_norm(x, w_ref, 1e-6), (x, w_ref), upstream, "reference")
    _compare_grads(mine, theirs, ["x", "weight"], "RMSNorm")


@exercise("6.3", "RMSNorm", mistakes={"RMSNorm": _RMS})
def check_rms_norm(RMSNorm):  # noqa: N803 - the argument is a class
    """Compare ``RMSNorm(normalized_shape, eps)`` with ``torch.nn.RMSNorm`` (or its formula)."""
    expect_class(RMSNorm, nn.Module, "your RMSNorm class", "check_rms_norm(RMSNorm)")
    if hasattr(nn, "RMSNorm") and issubclass(RMSNorm, nn.RMSNorm):
        fail("your RMSNorm subclasses torch.nn.RMSNorm: write it from nn.Module yourself.")
    message = "your RMSNorm calls PyTorch's rms_norm: write the formula yourself (mean of squares, sqrt)."
    quiet = randn(2, 3, 8, seed=50, scale=2.0, shift=1.0)
    quiet[0, 1] *= 1e-4  # a token of tiny magnitude: where eps matters
    quiet[1, 0] = 0.0  # an all-zero token
    cases = [
        ("a (2, 3, 8) input", quiet, 8, 1e-6),
        ("a (5, 33) input", randn(5, 33, seed=51, scale=3.0), 33, 1e-6),
        ("a (4, 1) input (one feature)", randn(4, 1, seed=52), 1, 1e-6),
        ("a (3, 6) input with eps=1e-2", randn(3, 6, seed=53, scale=0.05), 6, 1e-2),
    ]
    for case in cases:
        _rms_case(RMSNorm, *case, message)
    _rms_float64_and_gradients(RMSNorm)


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
        fail("with dropout=0.5 in training mode, the sublayer values your dropout keeps are "
             "not rescaled: they should be multiplied by 1 / (1 - p) = 2, so that the "
             "expected value of dropout(s) is s and training matches evaluation, where "
             "nothing is dropped. Use nn.Dropout, or divide the kept values by (1 - p).")


class _ScaledAddNorm(nn.Module):
    """A right ScaledAddNorm; ``_scaled(...)`` changes its forward, one mistake at a time."""

    def __init__(self, d_model, alpha, dropout=0.0):
        super().__init__()
        self.alpha, self.dropout, self.norm = alpha, nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, x, s):
        return self.norm(self.alpha * x + self.dropout(s))


def _scaled(forward=None, **more):
    return type("ScaledAddNorm", (_ScaledAddNorm,), {**more, **({"forward": forward} if forward else {})})


def _not_rescaled(self, x, s):
    if self.training:
        s = s * (torch.rand_like(s) >= self.dropout.p)  # no 1 / (1 - p)
    return self.norm(self.alpha * x + s)


def _norm_at(name, **options):
    def __init__(self, d_model, alpha, dropout=0.0):
        _ScaledAddNorm.__init__(self, d_model, alpha, dropout)
        del self.norm
        setattr(self, name, nn.LayerNorm(d_model, **options))

    return __init__


_AFTER = ("you added the residual after the norm, x + norm(sublayer_output). In Add & Norm the "
          "residual is added first and the sum is normalized: norm(alpha * x + sublayer_output).")
_BEFORE = ("you normalized x before adding the sublayer output, norm(x) + sublayer_output. The "
           "norm acts on the sum, after the residual is added: norm(alpha * x + sublayer_output).")
_ALPHA_IGNORED = ("your output equals LayerNorm(x + sublayer_output). Either alpha is ignored, or "
                  "it multiplies the whole sum, alpha * (x + sublayer_output), whose overall scale "
                  "the LayerNorm removes again. DeepNorm multiplies the residual only: "
                  "norm(alpha * x + sublayer_output).")
_SCALED = [  # named with the student's own norm weights
    Mistake(_AFTER, _scaled(lambda self, x, s: self.alpha * x + self.norm(self.dropout(s)))),
    Mistake(_AFTER, _scaled(lambda self, x, s: x + self.norm(self.dropout(s)))),
    Mistake(_BEFORE, _scaled(lambda self, x, s: self.norm(self.alpha * x) + self.dropout(s))),
    Mistake(_BEFORE, _scaled(lambda self, x, s: self.norm(x) + self.dropout(s))),
    Mistake("your output is not normalized: apply self.norm to the sum.",
            _scaled(lambda self, x, s: self.alpha * x + self.dropout(s))),
    Mistake("alpha scales the sublayer output; DeepNorm scales the residual x: norm(alpha * x + "
            "sublayer_output).", _scaled(lambda self, x, s: self.norm(x + self.alpha * self.dropout(s))),
            when=lambda alpha: alpha != 1.0),
    Mistake(_ALPHA_IGNORED, _scaled(lambda self, x, s: self.norm(x + self.dropout(s))),
            when=lambda alpha: alpha != 1.0),
    Mistake("the residual x is missing: norm(alpha * x + sublayer_output).",
            _scaled(lambda self, x, s: self.norm(self.dropout(s)))),
    Mistake("the sublayer output is missing: norm(alpha * x + sublayer_output).",
            _scaled(lambda self, x, s: self.norm(self.alpha * x))),
    Caught(_scaled(lambda self, x, s: self.norm(self.alpha * (x + self.dropout(s)))),
           r"or it multiplies the whole sum, alpha \* \(x \+ sublayer_output\)"),
    Caught(_scaled(_not_rescaled), r"not rescaled: .*1 / \(1 - p\) = 2"),
    Caught(_scaled(__init__=_norm_at("norm", elementwise_affine=False)),
           r"no learned gain and shift.*elementwise_affine=False"),
    Caught(_scaled(lambda self, x, s: self.norm(self.dropout(self.alpha * x + s))),
           r"dropout reaches the residual x"),
    Caught(_scaled(lambda self, x, s: self.norm(self.alpha * x + F.dropout(s, self.dropout.p, training=True))),
           r"dropout still active after \.eval\(\)"),
    Caught(_scaled(lambda self, x, s: self.norm(self.alpha * x + s)), r"dropout is not applied"),
    Caught(_scaled(lambda self, x, s: self.layer_norm(self.alpha * x + self.dropout(s)),
                   __init__=_norm_at("layer_norm")), r"no layer norm at `\.norm`"),
]
if "bias" in nn.LayerNorm.__init__.__code__.co_varnames:  # torch >= 2.1
    _SCALED.append(Caught(_scaled(__init__=_norm_at("norm", bias=False)),
                          r"learned gain but no shift.*bias=False"))


def _scaled_norm(block, d: int):
    """The block's `.norm`: a layer norm with a gain and a shift of d features."""
    norm = getattr(block, "norm", None)
    if isinstance(norm, nn.Module) and getattr(norm, "weight", None) is None:
        fail("ScaledAddNorm.norm has no learned gain and shift (`weight` and `bias` are None: "
             "nn.LayerNorm(d_model, elementwise_affine=False)?). The Add & Norm's LayerNorm has "
             "both, gamma and beta: self.norm = LayerNorm(d_model) or nn.LayerNorm(d_model).")
    if not (isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor)):
        fail("ScaledAddNorm has no layer norm at `.norm` with a `weight`: keep it there, as "
             "AddNorm does (self.norm = LayerNorm(d_model) or nn.LayerNorm(d_model)).")
    norm_bias = getattr(norm, "bias", None)
    if norm_bias is None:
        fail("ScaledAddNorm.norm has a learned gain but no shift (`bias` is None: "
             "nn.LayerNorm(d_model, bias=False)?). The Add & Norm's LayerNorm has both, "
             "gamma and beta: nn.LayerNorm(d_model) or the chapter's LayerNorm.")
    if tuple(norm.weight.shape) != (d,) or not isinstance(norm_bias, torch.Tensor) or tuple(norm_bias.shape) != (d,):
        fail(f"ScaledAddNorm.norm should normalize over d_model = {d} features, with weight and bias of shape ({d},).")
    return norm


def _scaled_dropout(ScaledAddNorm, d: int) -> None:  # noqa: N803
    """Dropout: only on the sublayer output, only in training mode, rescaled."""
    block = call(ScaledAddNorm, d, alpha=1.5, dropout=0.5, what=f"ScaledAddNorm({d}, alpha=1.5, dropout=0.5)")
    x = randn(4, 5, d, seed=100, scale=2.0)
    s = randn(4, 5, d, seed=101)
    reference = F.layer_norm(1.5 * x + s, (d,), block.norm.weight.detach(), block.norm.bias.detach())
    block.eval()
    with torch.no_grad():
        y = call(block, x, s, what="ScaledAddNorm in eval mode")
    expect_close(y, reference, "with dropout=0.5, in eval mode, ScaledAddNorm differs from "
                 "LayerNorm(alpha * x + s): is dropout still active after .eval()? Use nn.Dropout "
                 "(or F.dropout(..., training=self.training))")
    block.train()
    with torch.no_grad():
        zero = call(block, x, torch.zeros_like(s), what="ScaledAddNorm in training mode")
        first, second = call(block, x, s), call(block, x, s)
    if not same(zero, F.layer_norm(1.5 * x, (d,), block.norm.weight.detach(), block.norm.bias.detach())):
        fail("with dropout=0.5 in training mode and a sublayer output of zeros, your output is not "
             "norm(alpha * x): dropout reaches the residual x (or the sum). It belongs on the "
             "sublayer output only: norm(alpha * x + dropout(sublayer_output)).")
    if torch.equal(first, second):
        fail("with dropout=0.5 in training mode, two calls give the same output: dropout is not "
             "applied. Apply self.dropout (an nn.Dropout) to the sublayer output.")

    _check_dropout_rescaling(ScaledAddNorm, d, x, s)


@exercise("6.4", "Add & Norm with a scaled residual (DeepNorm)", mistakes={"ScaledAddNorm": _SCALED})
def check_scaled_add_norm(ScaledAddNorm):  # noqa: N803 - the argument is a class
    """``ScaledAddNorm(d_model, alpha, dropout)(x, s)`` must equal ``LayerNorm(alpha * x + dropout(s))``."""
    expect_class(ScaledAddNorm, nn.Module, "your ScaledAddNorm class", "check_scaled_add_norm(ScaledAddNorm)")
    d = 6
    for number, (alpha, shape) in enumerate([(2.0, (2, 5, d)), (1.0, (3, d)), (0.5, (1, 1, d))]):
        block = call(ScaledAddNorm, d, alpha=alpha, what=f"ScaledAddNorm({d}, alpha={alpha})")
        norm = _scaled_norm(block, d)
        w, b = randn(d, seed=80 + number, scale=0.5, shift=1.0), randn(d, seed=85 + number)
        _set_(norm.weight, w)
        _set_(norm.bias, b)
        x = randn(*shape, seed=90 + number, scale=2.0, shift=0.5)
        s = randn(*shape, seed=95 + number, scale=0.7, shift=-1.0)
        what = f"ScaledAddNorm({d}, alpha={alpha})(x, sublayer_output) for shape {shape}"
        with torch.no_grad():
            y = expect_shape(call(block, x, s, what=what), shape, what)
        expected = _normalize(alpha * x.double() + s.double(), (-1,), 1e-5) * w.double() + b.double()
        if not same(y, expected):
            name_mistake(y, _SCALED, alpha, prefix=f"{what}: ",
                         run=with_weights_of(block, x, s, build=lambda c, a=alpha: c(d, a)))
            expect_close(y, expected, f"{what} differs from LayerNorm(alpha * x + sublayer_output)")

    _scaled_dropout(ScaledAddNorm, d)

    # gradients reach x, the sublayer output and the norm's parameters
    block = call(ScaledAddNorm, d, alpha=2.0, what=f"ScaledAddNorm({d}, alpha=2.0)")
    x = randn(2, 3, d, seed=102).requires_grad_()
    s = randn(2, 3, d, seed=103).requires_grad_()
    upstream = randn(2, 3, d, seed=104)
    mine = _grads(lambda: call(block, x, s), (x, s), upstream, "ScaledAddNorm")
    theirs = _grads(lambda: F.layer_norm(2.0 * x + s, (d,)), (x, s), upstream, "reference")
    _compare_grads(mine, theirs, ["x", "sublayer_output"], "ScaledAddNorm")
