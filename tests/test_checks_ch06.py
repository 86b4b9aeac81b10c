"""The chapter 6 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_book import LayerNorm
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch06 import (
    check_batch_norm,
    check_layer_norm,
    check_rms_norm,
    check_scaled_add_norm,
)

# --------------------------------------------------------------------------- 6.1 layer_norm


def _dims(normalized_shape):
    return tuple(range(-len(normalized_shape), 0))


def _affine(y, weight, bias):
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def ln_unbiased(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    y = (x - x.mean(dim=dims, keepdim=True)) / torch.sqrt(x.var(dim=dims, keepdim=True) + eps)
    return _affine(y, weight, bias)


def ln_eps_outside(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    std = x.var(dim=dims, keepdim=True, correction=0).sqrt()
    return _affine((x - x.mean(dim=dims, keepdim=True)) / (std + eps), weight, bias)


def ln_no_eps(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    std = x.var(dim=dims, keepdim=True, correction=0).sqrt()
    return _affine((x - x.mean(dim=dims, keepdim=True)) / std, weight, bias)


def ln_batch_axis(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    mean, var = x.mean(dim=0, keepdim=True), x.var(dim=0, keepdim=True, correction=0)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def ln_last_dim_only(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True, correction=0)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def ln_no_affine(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + eps)


def ln_fixed_eps(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, correction=0)
    return _affine((x - mean) / torch.sqrt(var + 1e-5), weight, bias)


def ln_builtin(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def ln_in_place(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    var = x.var(dim=dims, keepdim=True, correction=0)
    x -= x.mean(dim=dims, keepdim=True)
    return _affine(x / torch.sqrt(var + eps), weight, bias)


def ln_detached_stats(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    mean = x.mean(dim=dims, keepdim=True).detach()
    var = x.var(dim=dims, keepdim=True, correction=0).detach()
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def ln_all_but_batch(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(1, x.dim()))  # WRONG: every dimension after the batch
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=0)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def ln_in_float32(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims, x32 = _dims(normalized_shape), x.float()  # WRONG for a float64 input
    mean = x32.mean(dim=dims, keepdim=True)
    var = x32.var(dim=dims, keepdim=True, correction=0)
    return _affine(((x32 - mean) / torch.sqrt(var + eps)).to(x.dtype), weight, bias)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (ln_all_but_batch, r"taken over dims \(1, 2\) of a 3-D input.*names the last 1, dims \(2,\)"),
        (ln_in_float32, r"float64 input your output has only float32 precision"),
        (ln_unbiased, r"unbiased variance, divided by d - 1"),
        (ln_eps_outside, r"eps is added to the standard deviation"),
        (ln_no_eps, r"NaN .* is eps missing"),
        (ln_batch_axis, r"statistics are taken over dim 0"),
        (ln_last_dim_only, r"normalized over the last dimension only"),
        (ln_no_affine, r"ignores weight and bias"),
        (ln_fixed_eps, r"the eps argument is ignored"),
        (ln_builtin, r"calls PyTorch's layer norm"),
        (ln_in_place, r"changed its input `x` in place"),
        (ln_detached_stats, r"gradient with respect to x does not"),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_layer_norm_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_layer_norm(wrong)


def _formula_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, correction=0)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def test_layer_norm_the_formula_passes(capsys):
    check_layer_norm(_formula_layer_norm)
    assert "passed" in capsys.readouterr().out


@pytest.mark.filterwarnings(r"ignore:var\(\). degrees of freedom:UserWarning")
def test_layer_norm_unbiased_variance_with_one_feature_gets_its_own_message():
    def unbiased_only_when_d_is_1(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        wrong = normalized_shape == (1,)
        return (ln_unbiased if wrong else _formula_layer_norm)(x, normalized_shape, weight, bias, eps)

    with pytest.raises(CheckFailure, match=r"single feature, the unbiased variance divides 0"):
        check_layer_norm(unbiased_only_when_d_is_1)


def test_layer_norm_a_crash_becomes_one_sentence():
    def crashes(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        raise ValueError("boom")

    with pytest.raises(CheckFailure, match=r"raised ValueError: boom"):
        check_layer_norm(crashes)


def test_the_builtin_is_restored_after_the_check():
    with pytest.raises(CheckFailure):
        check_layer_norm(ln_builtin)
    x = torch.randn(2, 3)
    assert torch.allclose(F.layer_norm(x, (3,)), nn.LayerNorm(3)(x))


# --------------------------------------------------------------------------- 6.2 BatchNorm1d


class BatchNormBase(nn.Module):
    """A correct BatchNorm1d whose pieces the wrong versions below override one at a time."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @staticmethod
    def dims(x):
        return (0,) if x.dim() == 2 else (0, 2)

    @staticmethod
    def shape(x):
        return (1, -1) if x.dim() == 2 else (1, -1, 1)

    def batch_stats(self, x):
        return x.mean(dim=self.dims(x)), x.var(dim=self.dims(x), correction=0)

    def update(self, mean, var, n):
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))

    def use_batch_stats(self):
        return self.training

    def forward(self, x):
        if self.use_batch_stats():
            mean, var = self.batch_stats(x)
            if self.training:
                self.update(mean, var, x.numel() // x.size(1))
        else:
            mean, var = self.running_mean, self.running_var
            if not self.training:
                self.eval_hook(mean, var, x)
        s = self.shape(x)
        x_hat = (x - mean.view(s)) / torch.sqrt(var.view(s) + self.eps)
        return x_hat * self.weight.view(s) + self.bias.view(s)

    def eval_hook(self, mean, var, x):
        pass


def test_the_base_of_the_wrong_versions_is_right(capsys):
    check_batch_norm(BatchNormBase)
    assert "passed" in capsys.readouterr().out


class BNNoRunningUpdate(BatchNormBase):
    def update(self, mean, var, n):
        pass


class BNUpdatesInEval(BatchNormBase):
    def eval_hook(self, mean, var, x):
        self.update(*self.batch_stats(x), max(2, x.numel() // x.size(1)))


class BNUnbiasedNormalization(BatchNormBase):
    def batch_stats(self, x):
        return x.mean(dim=self.dims(x)), x.var(dim=self.dims(x), correction=1)

    def update(self, mean, var, n):
        super().update(mean, var * (n - 1) / n, n)  # running_var itself stays right


class BNBiasedRunningVar(BatchNormBase):
    def update(self, mean, var, n):
        super().update(mean, var * (n - 1) / n, n)


class BNMomentumReversed(BatchNormBase):
    def update(self, mean, var, n):
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(m).add_((1 - m) * mean)
            self.running_var.mul_(m).add_((1 - m) * var * n / (n - 1))


class BNBatchStatsInEval(BatchNormBase):
    def use_batch_stats(self):
        return True


class BNRunningStatsInTraining(BatchNormBase):
    def use_batch_stats(self):
        return False

    def eval_hook(self, mean, var, x):
        pass

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.update(*self.batch_stats(x), x.numel() // x.size(1))
        return out


class BNPerPosition(BatchNormBase):
    @staticmethod
    def dims(x):
        return (0,)

    @staticmethod
    def shape(x):
        return (1, -1) if x.dim() == 2 else (1, -1, 1)

    def batch_stats(self, x):
        if x.dim() == 2:
            return super().batch_stats(x)
        return x.mean(dim=0), x.var(dim=0, correction=0)

    def forward(self, x):
        if x.dim() == 3 and self.training:
            mean, var = self.batch_stats(x)  # (C, L): one per feature and position
            self.update(mean.mean(dim=1), var.mean(dim=1), x.size(0) * x.size(2))
            x_hat = (x - mean) / torch.sqrt(var + self.eps)
            return x_hat * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)
        return super().forward(x)


class BNOverFeatures(BatchNormBase):
    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.update(*self.batch_stats(x), x.numel() // x.size(1))
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, correction=0)
        s = self.shape(x)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(s) + self.bias.view(s)


class BNDetachedStats(BatchNormBase):
    def batch_stats(self, x):
        mean, var = super().batch_stats(x)
        return mean.detach(), var.detach()


class BNParametersNotBuffers(BatchNormBase):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        nn.Module.__init__(self)
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean = torch.zeros(num_features)  # a plain attribute
        self.running_var = torch.ones(num_features)


class BNIgnoresMomentum(BatchNormBase):
    def update(self, mean, var, n):
        with torch.no_grad():
            self.running_mean.mul_(0.9).add_(0.1 * mean)
            self.running_var.mul_(0.9).add_(0.1 * var * n / (n - 1))


class BNSubclassesTorch(nn.BatchNorm1d):
    pass


class BNGraphInRunningStats(BatchNormBase):
    def update(self, mean, var, n):
        m = self.momentum
        self.running_mean = (1 - m) * self.running_mean + m * mean
        self.running_var = (1 - m) * self.running_var + m * var * n / (n - 1)


class BNNoEps(BatchNormBase):
    def forward(self, x):
        mean, var = self.batch_stats(x) if self.training else (self.running_mean, self.running_var)
        if self.training:
            self.update(mean, var, x.numel() // x.size(1))
        s = self.shape(x)
        x_hat = (x - mean.view(s)) / torch.sqrt(var.view(s))  # WRONG: no eps
        return x_hat * self.weight.view(s) + self.bias.view(s)


class BNEpsOutside(BatchNormBase):
    def forward(self, x):
        mean, var = self.batch_stats(x) if self.training else (self.running_mean, self.running_var)
        if self.training:
            self.update(mean, var, x.numel() // x.size(1))
        s = self.shape(x)
        x_hat = (x - mean.view(s)) / (torch.sqrt(var.view(s)) + self.eps)  # WRONG
        return x_hat * self.weight.view(s) + self.bias.view(s)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (BNNoEps, r"feature 0 is constant.*NaN.*eps is missing"),
        (BNEpsOutside, r"eps is added to the standard deviation"),
        (BNNoRunningUpdate, r"running_mean and running_var have not changed"),
        (BNUpdatesInEval, r"running statistics changed during an eval-mode forward pass"),
        (BNUnbiasedNormalization, r"normalized with the unbiased batch variance"),
        (BNBiasedRunningVar, r"running_var holds a running average of the biased batch variance"),
        (BNMomentumReversed, r"momentum convention is reversed"),
        (BNBatchStatsInEval, r"eval mode.*uses the batch's own statistics"),
        (BNRunningStatsInTraining, r"in training mode your output uses the running statistics"),
        (BNPerPosition, r"per feature AND per position"),
        (BNOverFeatures, r"taken over the features \(dim 1\)"),
        (BNDetachedStats, r"are the batch mean and variance detached"),
        (BNParametersNotBuffers, r"running_mean is not a buffer"),
        (BNIgnoresMomentum, r"the momentum argument is ignored"),
        (BNSubclassesTorch, r"subclasses PyTorch's batch norm"),
        (BNGraphInRunningStats, r"requires grad"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_batch_norm_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_batch_norm(wrong)


def test_batch_norm_refuses_the_builtin_function():
    class UsesFunctional(BatchNormBase):
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)

    with pytest.raises(CheckFailure, match=r"calls PyTorch's batch norm"):
        check_batch_norm(UsesFunctional)


# --------------------------------------------------------------------------- 6.3 RMSNorm


class RMSBase(nn.Module):
    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class RMSCentered(RMSBase):
    def forward(self, x):
        c = x - x.mean(dim=-1, keepdim=True)
        return c / torch.sqrt((c**2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class RMSSum(RMSBase):
    def forward(self, x):
        return x / torch.sqrt((x**2).sum(dim=-1, keepdim=True) + self.eps) * self.weight


class RMSEpsOutside(RMSBase):
    def forward(self, x):
        return x / ((x**2).mean(dim=-1, keepdim=True).sqrt() + self.eps) * self.weight


class RMSNoEps(RMSBase):
    def forward(self, x):
        return x / (x**2).mean(dim=-1, keepdim=True).sqrt() * self.weight


class RMSNoWeight(RMSBase):
    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + self.eps)


class RMSFixedEps(RMSBase):
    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + 1e-6) * self.weight


class RMSWrongAxis(RMSBase):
    def forward(self, x):
        return x / torch.sqrt((x**2).mean(dim=0, keepdim=True) + self.eps) * self.weight


class RMSNoParameter(RMSBase):
    def __init__(self, normalized_shape, eps=1e-6):
        nn.Module.__init__(self)
        self.eps = eps
        self.weight = torch.ones(normalized_shape)


class RMSSubclassesTorch(nn.RMSNorm):
    pass


class RMSWeightFirst(RMSBase):
    def forward(self, x):
        xw = x * self.weight  # WRONG: scaled before the normalization
        return xw / torch.sqrt((xw**2).mean(dim=-1, keepdim=True) + self.eps)


class RMSInFloat32(RMSBase):
    def forward(self, x):
        x32 = x.float()  # WRONG for a float64 input
        rms = torch.sqrt((x32**2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 / rms).to(x.dtype) * self.weight


@pytest.mark.parametrize(
    "wrong, message",
    [
        (RMSInFloat32, r"float64 input your output has only float32 precision"),
        (RMSWeightFirst, r"weight is applied before the normalization"),
        (RMSCentered, r"subtracted the mean: that is LayerNorm"),
        (RMSSum, r"root of the SUM of squares"),
        (RMSEpsOutside, r"eps is added outside the square root"),
        (RMSNoEps, r"NaN .* is eps missing"),
        (RMSNoWeight, r"ignores weight"),
        (RMSFixedEps, r"the eps argument is ignored"),
        (RMSWrongAxis, r"taken over dim 0"),
        (RMSNoParameter, r"has no parameter `weight`"),
        (RMSSubclassesTorch, r"subclasses torch.nn.RMSNorm"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_rms_norm_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_rms_norm(wrong)


# --------------------------------------------------------------------------- 6.4 ScaledAddNorm


class ScaledBase(nn.Module):
    def __init__(self, d_model, alpha, dropout=0.0):
        super().__init__()
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout)
        self.norm = LayerNorm(d_model)

    def forward(self, x, s):
        return self.norm(self.alpha * x + self.dropout(s))


class ResidualAfterNorm(ScaledBase):
    def forward(self, x, s):
        return self.alpha * x + self.norm(self.dropout(s))


class NormBeforeAdd(ScaledBase):
    def forward(self, x, s):
        return self.norm(self.alpha * x) + self.dropout(s)


class AlphaOnSublayer(ScaledBase):
    def forward(self, x, s):
        return self.norm(x + self.alpha * self.dropout(s))


class AlphaIgnored(ScaledBase):
    def forward(self, x, s):
        return self.norm(x + self.dropout(s))


class NoNorm(ScaledBase):
    def forward(self, x, s):
        return self.alpha * x + self.dropout(s)


class DropoutOnSum(ScaledBase):
    def forward(self, x, s):
        return self.norm(self.dropout(self.alpha * x + s))


class DropoutAlwaysOn(ScaledBase):
    def forward(self, x, s):
        return self.norm(self.alpha * x + F.dropout(s, self.dropout.p, training=True))


class DropoutForgotten(ScaledBase):
    def forward(self, x, s):
        return self.norm(self.alpha * x + s)


class AlphaOnWholeSum(ScaledBase):
    def forward(self, x, s):
        return self.norm(self.alpha * (x + self.dropout(s)))


class DropoutNotRescaled(ScaledBase):
    def forward(self, x, s):
        if self.training:
            s = s * (torch.rand_like(s) >= self.dropout.p)  # WRONG: no 1 / (1 - p)
        return self.norm(self.alpha * x + s)


class NormWithoutAffine(ScaledBase):
    def __init__(self, d_model, alpha, dropout=0.0):
        super().__init__(d_model, alpha, dropout)
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)


class NormWithoutBias(ScaledBase):
    def __init__(self, d_model, alpha, dropout=0.0):
        super().__init__(d_model, alpha, dropout)
        self.norm = nn.LayerNorm(d_model, bias=False)


class NormElsewhere(ScaledBase):
    def __init__(self, d_model, alpha, dropout=0.0):
        super().__init__(d_model, alpha, dropout)
        self.layer_norm = self.norm
        del self.norm

    def forward(self, x, s):
        return self.layer_norm(self.alpha * x + self.dropout(s))


@pytest.mark.parametrize(
    "wrong, message",
    [
        (ResidualAfterNorm, r"added the residual after the norm"),
        (NormBeforeAdd, r"normalized x before adding the sublayer output"),
        (AlphaOnSublayer, r"alpha scales the sublayer output"),
        (AlphaIgnored, r"equals LayerNorm\(x \+ sublayer_output\). Either alpha is ignored"),
        (AlphaOnWholeSum, r"or it multiplies the whole sum, alpha \* \(x \+ sublayer_output\)"),
        (DropoutNotRescaled, r"not rescaled: .*1 / \(1 - p\) = 2"),
        (NormWithoutAffine, r"no learned gain and shift.*elementwise_affine=False"),
        (NormWithoutBias, r"learned gain but no shift.*bias=False"),
        (NoNorm, r"not normalized"),
        (DropoutOnSum, r"dropout reaches the residual x"),
        (DropoutAlwaysOn, r"dropout still active after \.eval\(\)"),
        (DropoutForgotten, r"dropout is not applied"),
        (NormElsewhere, r"no layer norm at `\.norm`"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_scaled_add_norm_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_scaled_add_norm(wrong)


def test_scaled_add_norm_accepts_torch_layer_norm(capsys):
    class WithTorchNorm(ScaledBase):
        def __init__(self, d_model, alpha, dropout=0.0):
            super().__init__(d_model, alpha, dropout)
            self.norm = nn.LayerNorm(d_model)

    check_scaled_add_norm(WithTorchNorm)
    assert "passed" in capsys.readouterr().out
