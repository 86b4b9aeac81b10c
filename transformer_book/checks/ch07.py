"""Checks for the exercises of chapter 7, the full transformer.

Each check compares the student's code with a reference written here (PyTorch's own where
one exists) on several shapes, seeds and edge cases and, when the two differ, first
compares the result with what the usual mistakes would produce, so that the failure
names the likely misconception. Every random input comes from a seeded generator: a
check leaves the global random state alone.
"""

from __future__ import annotations

import math
import zlib
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ._core import (
    Caught,
    CheckFailure,
    Hint,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_class,
    expect_close,
    expect_dtype,
    expect_shape,
    expect_tensor,
    expect_unchanged,
    fail,
    first_difference,
    name_mistake,
    randn,
    refused,
    same,
    with_weights_of,
)

# PyTorch's cross-entropy, kept before any patching (exercise 7.2 forbids it to the student).
_cross_entropy = F.cross_entropy


# ----------------------------------------------------------------------------- exercise 7.1


def _reference_encoding(positions: torch.Tensor, d_model: int, base: float) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d_model)), PE[p, 2i+1] = cos of the same angle, in float64."""
    i = torch.arange(d_model // 2, dtype=torch.float64)  # (d_model/2,)
    angle = positions.to(torch.float64)[..., None] / base ** (2 * i / d_model)  # (..., d_model/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # (..., d_model)


def _encoding_variant(positions, d_model, base=10000.0, *, order="interleave", exponent="2i",
                      start=0, divide=True, use_base=True, cos_own_index=False, dtype=None,
                      frequencies_dtype=None, odd_check=True, truncate=False):
    """sinusoidal_encoding with one option per mistake (the defaults give the right answer)."""
    if odd_check and d_model % 2:
        raise ValueError(f"d_model must be even, got {d_model}.")
    dtype = dtype or (positions.dtype if positions.is_floating_point() else torch.float32)
    p = (positions.long() if truncate else positions).to(dtype)[..., None] + start  # (..., 1)
    i = torch.arange(d_model // 2, dtype=frequencies_dtype or dtype)
    power = {"2i": 2 * i, "i": i}[exponent]
    scale = (base if use_base else 10000.0) ** (power / d_model)
    angle = (p / scale if divide else p * scale).to(dtype)  # (..., d/2)
    cos_angle = (p / (base ** ((2 * i + 1) / d_model))).to(dtype) if cos_own_index else angle
    if order == "interleave":
        return torch.stack([angle.sin(), cos_angle.cos()], dim=-1).flatten(-2)
    if order == "swapped":
        return torch.stack([angle.cos(), angle.sin()], dim=-1).flatten(-2)
    halves = [angle.sin(), angle.cos()] if order == "sin|cos" else [angle.cos(), angle.sin()]
    return torch.cat(halves, dim=-1)


_ENCODING = [
    Mistake("sin and cos are swapped: even columns 2i hold sin(p / base^(2i/d_model)), odd "
            "columns 2i+1 hold cos of the same angle.", partial(_encoding_variant, order="swapped")),
    Mistake("your table puts all the sines in the first half of the columns and all the cosines "
            "in the second half; the paper's table interleaves them: column 2i is a sine, column "
            "2i+1 the cosine of the same angle.", partial(_encoding_variant, order="sin|cos")),
    Mistake("your table puts all the cosines in the first half and all the sines in the second "
            "half; the paper's table interleaves them: column 2i is sin, column 2i+1 is cos of "
            "the same angle.", partial(_encoding_variant, order="cos|sin")),
    Mistake("the exponent is i / d_model where it should be 2i / d_model (i numbers the sin/cos "
            "pairs, 0 ... d_model/2 - 1): your frequencies only fall to base^(-1/2) instead of "
            "nearly 1/base.", partial(_encoding_variant, exponent="i")),
    Mistake("the cosine column 2i+1 uses the exponent (2i+1)/d_model, its own column index: "
            "both columns of a pair share the angle p / base^(2i/d_model).",
            partial(_encoding_variant, cos_own_index=True), expect=r"uses the exponent \(2i\+1\)/d_model"),
    Mistake("your positions start at 1: the first token has position 0, so its row is sin(0), "
            "cos(0) = 0, 1, 0, 1, ...", partial(_encoding_variant, start=1)),
    Mistake("the angles are p * base^(2i/d_model): the position is divided by "
            "base^(2i/d_model), so the frequencies fall with i.", partial(_encoding_variant, divide=False)),
    Mistake(lambda positions, d_model, base: f"your table is the one for base 10000, but "
            f"base={base} was asked for: the base argument is ignored.",
            partial(_encoding_variant, use_base=False), when=lambda p, d, base: base != 10000.0,
            expect="the base argument is ignored"),
    Mistake("your table rounds fractional positions down to whole numbers (positions.long(), or "
            "rows looked up in a precomputed table): a position p of a floating tensor gets the "
            "angles p / base^(2i/d_model) of p itself.", partial(_encoding_variant, truncate=True)),
]
_ENCODING_CAUGHT = [
    Caught(partial(_encoding_variant, dtype=torch.float32), "returns torch.float32 for float64 positions"),
    Caught(partial(_encoding_variant, dtype=torch.float64), "returns torch.float64 for integer positions"),
    Caught(partial(_encoding_variant, frequencies_dtype=torch.float32), "runs in float32"),
    Caught(partial(_encoding_variant, odd_check=False), "raise ValueError"),
]


def _call_encoding(encoding, positions: torch.Tensor, d_model: int, base: float | None):
    """The student's table, the reference table and the call's label, after the properties:
    the input unchanged, the shape, float32 for integer positions, a floating input's dtype."""
    before = positions.clone()
    kwargs = {} if base is None else {"base": base}
    label = (f"sinusoidal_encoding(positions of shape {tuple(positions.shape)}, {d_model}"
             + (")" if base is None else f", base={base})"))
    table = call(encoding, positions, d_model, what=label, **kwargs)
    expect_unchanged(before, positions, "positions")
    expected = _reference_encoding(positions, d_model, 10000.0 if base is None else base)
    table = expect_shape(table, expected.shape, f"the result of {label}")
    if positions.is_floating_point():
        name = str(positions.dtype).replace("torch.", "")
        expect_dtype(table, positions.dtype, f"{label} returns {table.dtype} for {name} positions: "
                     "keep a floating input's dtype (build the frequencies with "
                     "dtype=positions.dtype).")
    elif table.dtype != torch.float32:
        fail(f"{label} returns {table.dtype} for integer positions: return float32, the "
             "dtype of the model's embeddings (e.g. positions.float() before the maths).")
    return table, expected, label


@exercise("7.1", "Sinusoidal positions for any position tensor",
          mistakes={"sinusoidal_encoding": _ENCODING + _ENCODING_CAUGHT})
def check_sinusoidal_encoding(sinusoidal_encoding):
    """Compare ``sinusoidal_encoding(positions, d_model, base=10000.0)`` with the formula."""
    expect_callable(sinusoidal_encoding, "your encoding function",
                    "check_sinusoidal_encoding(sinusoidal_encoding)")

    left_padded = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])  # (2, 5)
    cases = [
        (torch.arange(6), 8, None),  # the chapter's table, 6 positions
        (left_padded, 6, None),  # a batch of positions, d_model/2 odd
        (torch.arange(40), 16, 100.0),  # another base
        (torch.tensor([0]), 2, None),  # one position, one pair of columns
        (torch.tensor([[3, 17], [250, 1]]), 10, 500.0),  # arbitrary positions
        (torch.tensor([0.5, 1.25, 7.75, 100.5]), 6, None),  # fractional float32 positions
    ]
    for positions, d_model, base in cases:
        table, expected, label = _call_encoding(sinusoidal_encoding, positions, d_model, base)
        if same(table, expected, atol=1e-4, rtol=1e-4):
            continue
        if not torch.isfinite(table).all():
            fail(f"{label} contains NaN or inf: check the division by base^(2i/d_model).")
        name_mistake(table, _ENCODING, positions.double(), d_model,
                     10000.0 if base is None else base, atol=1e-4, rtol=1e-4)
        expect_close(table, expected, f"{label} differs from PE[p, 2i] = sin(p / base^(2i/"
                     "d_model)), PE[p, 2i+1] = cos(p / base^(2i/d_model))", atol=1e-4, rtol=1e-4)

    # float64 positions: float64 all the way, to float64 precision, far into the table.
    positions = torch.arange(0, 3000, 7, dtype=torch.float64)
    table, expected, label = _call_encoding(sinusoidal_encoding, positions, 12, None)
    if not same(table, expected, atol=1e-10, rtol=1e-10):
        if same(table, expected, atol=1e-3, rtol=1e-3):
            fail(f"{label} agrees with the reference only to float32 precision, not to "
                 "float64's: part of the computation runs in float32 (torch.arange(...) and torch.tensor(...) default "
                 "to float32; pass dtype=positions.dtype). At position 3000 an angle needs "
                 "float64 to keep its sine to 1e-10.")
        name_mistake(table, _ENCODING, positions, 12, 10000.0, atol=1e-6, rtol=1e-6)
        expect_close(table, expected, f"{label} differs from the reference in float64",
                     atol=1e-10, rtol=1e-10)

    # an odd d_model has no cosine for its last sine: a clear error
    try:
        call(sinusoidal_encoding, torch.arange(3), 7, what="sinusoidal_encoding(positions, 7)")
    except CheckFailure as failure:
        if isinstance(failure.__cause__, ValueError):
            return
        raise
    fail("sinusoidal_encoding(positions, 7) returned a result: an odd d_model has no cosine column "
         "for its last sine; raise ValueError with one sentence saying d_model must be even.")


# ----------------------------------------------------------------------------- exercise 7.2

_CROSS_ENTROPY_FUNCTIONS = [(F, "cross_entropy"), (torch._C._nn, "cross_entropy_loss")]
_CROSS_ENTROPY_MESSAGE = (
    "your function calls F.cross_entropy (or nn.CrossEntropyLoss), the reference it is "
    "compared with: write the loss yourself from log_softmax."
)


def _loss_from(per_token, reduce="real", ignore_padding=True):
    """A loss from per-token terms (log_p (N, V), target (N,), eps, ignore_index) -> (N,)."""

    def label_smoothed_cross_entropy(logits, target, smoothing=0.1, ignore_index=-100):
        log_p = logits.reshape(-1, logits.size(-1)).log_softmax(dim=-1)  # (N, V)
        flat = target.reshape(-1)
        keep = flat != ignore_index if ignore_padding else torch.ones_like(flat, dtype=torch.bool)
        safe = flat.clamp(0, logits.size(-1) - 1)
        loss = per_token(log_p, safe, smoothing, ignore_index) * keep  # (N,)
        if reduce == "real":
            return loss.sum() / keep.sum()
        if reduce == "all":
            return loss.mean()
        if reduce == "sum":
            return loss.sum()
        return (loss.view(target.shape).sum(-1) / keep.view(target.shape).sum(-1)).mean()

    return label_smoothed_cross_entropy


def _nll(log_p, target):
    return -log_p.gather(-1, target[:, None]).squeeze(-1)


def _right_terms(log_p, target, eps, ignore_index):
    return (1 - eps) * _nll(log_p, target) - eps * log_p.mean(-1)


def _spread_over_others(log_p, target, eps, ignore_index):
    others = (-log_p.sum(-1) - _nll(log_p, target)) / (log_p.size(-1) - 1)
    return (1 - eps) * _nll(log_p, target) + eps * others


def _annotated_transformer(log_p, target, eps, ignore_index):
    """The target distribution of the Annotated Transformer: no mass on the padding class."""
    vocab = log_p.size(-1)
    true = torch.full_like(log_p, eps / (vocab - 2))
    true.scatter_(1, target[:, None], 1 - eps)
    if 0 <= ignore_index < vocab:
        true[:, ignore_index] = 0
    return -(true * log_p).sum(-1)


def _kl_divergence(logits, target, smoothing=0.1, ignore_index=-100):
    vocab = logits.size(-1)
    log_p = logits.reshape(-1, vocab).log_softmax(-1)
    flat = target.reshape(-1)
    true = torch.full_like(log_p, smoothing / vocab)
    true.scatter_(1, flat.clamp(0, vocab - 1)[:, None], 1 - smoothing + smoothing / vocab)
    return F.kl_div(log_p, true, reduction="none").sum(-1)[flat != ignore_index].mean()


def _kept(logits, target, ignore_index, dim=-1, log_of_softmax=False):
    log_p = (logits.softmax(dim).log() if log_of_softmax else logits.log_softmax(dim=dim))
    log_p, flat = log_p.reshape(-1, logits.size(-1)), target.reshape(-1)
    keep = flat != ignore_index
    return log_p[keep], flat[keep]


def _loss_args(wrong):
    """``wrong(logits, target, smoothing, ignore_index)`` with the student's signature."""
    return lambda logits, target, smoothing=0.1, ignore_index=-100: wrong(
        logits, target, smoothing, ignore_index)


_LOSS = [  # run on the case in float64, in this order
    Mistake("padding is counted in the mean: you zeroed the loss at ignored positions but "
            "divided by all positions; divide by the number of targets that are not "
            "ignore_index.", _loss_from(_right_terms, reduce="all")),
    Mistake("your loss is the plain cross-entropy: the smoothing is missing (loss = (1 - "
            "smoothing) * (-log p[target]) + smoothing * mean over classes of (-log p)).",
            _loss_from(lambda lp, t, e, i: _nll(lp, t))),
    Mistake("you spread the smoothing mass over the V-1 wrong classes (target gets exactly 1 - "
            "smoothing); F.cross_entropy spreads smoothing/V over all V classes, the target "
            "included, so the target gets 1 - smoothing + smoothing/V.",
            _loss_from(_spread_over_others)),
    Mistake("only the (1 - smoothing) * (-log p[target]) term is there: add smoothing times the "
            "mean over classes of -log p.", _loss_from(lambda lp, t, e, i: (1 - e) * _nll(lp, t))),
    Mistake("the target term is not scaled by (1 - smoothing): loss = (1 - smoothing) * (-log "
            "p[target]) + smoothing * mean_c(-log p[c]).",
            _loss_from(lambda lp, t, e, i: _nll(lp, t) - e * lp.mean(-1))),
    Mistake("the smoothing term sums -log p over the classes; it is the mean (each class gets "
            "smoothing/V).", _loss_from(lambda lp, t, e, i: (1 - e) * _nll(lp, t) - e * lp.sum(-1))),
    Mistake("your loss is the sum over tokens: return the mean over the tokens that are not "
            "ignore_index (reduction='mean').", _loss_from(_right_terms, reduce="sum")),
    Mistake("your loss is smaller than F.cross_entropy's by exactly the entropy of the smoothed "
            "target: you computed the KL divergence (nn.KLDivLoss, as in some tutorials), not "
            "the cross-entropy. They have the same gradient but not the same value.",
            _kl_divergence),
    Mistake("you give the padding class no smoothing mass and spread it as smoothing/(V-2) over "
            "the others (as the Annotated Transformer does); F.cross_entropy spreads "
            "smoothing/V over every class, ignore_index included.",
            _loss_from(_annotated_transformer)),
    Mistake("padding targets are not ignored: they are scored as a class and counted in the "
            "mean; leave out every position whose target is ignore_index.",
            _loss_from(_right_terms, reduce="all", ignore_padding=False),
            expect="padding targets are not ignored|padding is counted"),
    Mistake("you averaged each sequence over its tokens, then the sequences: F.cross_entropy "
            "averages over all real tokens at once, so a long sequence weighs more than a short "
            "one.", _loss_from(_right_terms, reduce="rows")),
    Mistake("the softmax runs over dim 1, the length axis: here the classes are on the last "
            "axis, (batch, L, V); use log_softmax(dim=-1).", _loss_args(lambda *a: _right_terms(
                *_kept(*a[:2], a[3], dim=1), a[2], a[3]).mean())),
    Mistake(lambda logits, target, smoothing, index: "your loss is the one for smoothing=0.1, "
            f"but smoothing={smoothing} was asked for: the smoothing argument is ignored.",
            _loss_args(lambda logits, target, smoothing, ignore_index: _loss_from(_right_terms)(
                logits, target, 0.1, ignore_index)), expect="smoothing argument is ignored"),
]
_LOSS_CAUGHT = [
    Caught(_loss_args(lambda logits, target, smoothing, index: _right_terms(
        *_kept(logits, target, index, log_of_softmax=True), smoothing, index).mean()),
        "use log_softmax"),
    Caught(_loss_args(lambda logits, target, smoothing, index: F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), label_smoothing=smoothing,
        ignore_index=index)), "calls F.cross_entropy"),
    Caught(_loss_args(lambda logits, target, smoothing, index: nn.CrossEntropyLoss(
        ignore_index=index, label_smoothing=smoothing)(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1))), "calls F.cross_entropy"),
    Caught(_loss_args(lambda logits, target, smoothing, index: _right_terms(
        logits.reshape(-1, logits.size(-1)).log_softmax(-1),
        target.reshape(-1).clamp(0, logits.size(-1) - 1), smoothing, index)),
        "one loss per token"),
    Caught(_loss_args(lambda logits, *rest: _loss_from(_right_terms)(logits.float(), *rest)),
           "returns torch.float32 for float64 logits"),
    Caught(_loss_args(lambda logits, *rest: _loss_from(_right_terms)(logits.detach(), *rest)),
           "carries no gradient"),
]


def _reference_loss(logits, target, smoothing, ignore_index):
    vocab = logits.size(-1)
    return _cross_entropy(logits.reshape(-1, vocab), target.reshape(-1),
                          ignore_index=ignore_index, label_smoothing=smoothing)


def _call_loss(loss_fn, logits, target, smoothing, ignore_index):
    kwargs = {"smoothing": smoothing}
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    label = (f"label_smoothed_cross_entropy(logits {tuple(logits.shape)}, target "
             f"{tuple(target.shape)}, " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")")
    before = (logits.detach().clone(), target.clone())
    with refused([loss_fn], _CROSS_ENTROPY_FUNCTIONS, _CROSS_ENTROPY_MESSAGE):
        loss = call(loss_fn, logits, target, what=label, **kwargs)
    expect_unchanged(before[0], logits.detach(), "logits")
    expect_unchanged(before[1], target, "target")
    loss = expect_tensor(loss, f"the result of {label}")
    if loss.dim() != 0:
        if loss.numel() == target.numel():
            fail(f"{label} returns one loss per token, shape {tuple(loss.shape)}: return their "
                 "mean over the tokens that are not ignore_index, a 0-d tensor.")
        fail(f"{label} returns shape {tuple(loss.shape)}: return a single number, a 0-d tensor.")
    return loss, label


def _targets(shape, vocab: int, seed: int, pad: int | None = None, lengths=None):
    generator = torch.Generator().manual_seed(seed)
    low = 0 if pad is None else 1  # real targets avoid the pad id (pad is 0 when given)
    target = torch.randint(low, vocab, shape, generator=generator)
    if pad is not None:
        for row, length in enumerate(lengths):
            target[row, length:] = pad
    return target


@exercise("7.2", "Label-smoothed cross-entropy that ignores padding",
          mistakes={"label_smoothed_cross_entropy": _LOSS + _LOSS_CAUGHT})
def check_label_smoothed_cross_entropy(label_smoothed_cross_entropy):
    """Compare with ``F.cross_entropy(..., label_smoothing=s, ignore_index=i)``."""
    expect_callable(label_smoothed_cross_entropy, "your loss function",
                    "check_label_smoothed_cross_entropy(label_smoothed_cross_entropy)")
    ignored = torch.tensor([0, 4, 3, 0, 1, 0, 2])  # ignore_index=-100 would never match
    cases = [
        # logits, target, smoothing, ignore_index (None: left at its default, -100)
        (randn(7, 5, seed=1, scale=2.0), ignored, 0.1, None),
        (randn(3, 6, 11, seed=2, scale=2.0), _targets((3, 6), 11, 3, 0, [6, 2, 4]), 0.2, 0),
        (randn(2, 5, 4, seed=4), _targets((2, 5), 4, 5, 0, [5, 1]), 0.0, 0),
        (randn(9, 7, seed=6, scale=3.0), torch.tensor([1, 6, 6, 2, 0, 6, 3, 4, 5]), 0.3, 6),
        (randn(4, 3, 6, seed=7), _targets((4, 3), 6, 8, -100, [3, 1, 2, 3]), 0.1, -100),
    ]
    for logits, target, smoothing, ignore_index in cases:
        index = -100 if ignore_index is None else ignore_index
        loss, label = _call_loss(label_smoothed_cross_entropy, logits, target, smoothing,
                                 ignore_index)
        expected = _reference_loss(logits.double(), target, smoothing, index)
        if same(loss, expected, atol=1e-5, rtol=1e-5):
            continue
        if not torch.isfinite(loss):
            fail(f"{label} is {loss.item()}: with ordinary logits the loss is finite; does a "
                 "position get log(0)?")
        name_mistake(loss, _LOSS, logits.double(), target, smoothing, index, atol=1e-5, rtol=1e-5)
        expect_close(loss, expected, f"{label} differs from F.cross_entropy(..., "
                     f"label_smoothing={smoothing}, ignore_index={index})", atol=1e-5, rtol=1e-5)

    # large logits: log(softmax(x)) underflows to log(0) = -inf; log_softmax does not
    logits = randn(4, 6, seed=9, scale=200.0)
    target = torch.tensor([0, 1, 2, 3])
    loss, label = _call_loss(label_smoothed_cross_entropy, logits, target, 0.1, None)
    expected = _reference_loss(logits.double(), target, 0.1, -100)
    if not torch.isfinite(loss):
        fail(f"{label} is {loss.item()} for logits of size about 200: softmax underflows to 0 "
             "for the unlikely classes and log(0) = -inf; use log_softmax, which subtracts "
             "the max first (log_softmax(x) = x - logsumexp(x)).")
    expect_close(loss, expected, f"{label} differs from F.cross_entropy for large logits",
                 atol=1e-3, rtol=1e-5)

    # float64 stays float64; the gradient matches torch's
    logits = randn(2, 4, 5, seed=10, dtype=torch.float64).requires_grad_()
    target = _targets((2, 4), 5, 11, 0, [4, 2])
    loss, label = _call_loss(label_smoothed_cross_entropy, logits, target, 0.1, 0)
    if loss.dtype != torch.float64:
        fail(f"{label} returns {loss.dtype} for float64 logits: keep the logits' dtype.")
    if not loss.requires_grad:
        fail(f"{label} carries no gradient: is it computed from logits.detach(), logits.data "
             "or through .item()?")
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(_reference_loss(reference, target, 0.1, 0), reference)
    expect_close(grad, grad_ref, f"the gradient of {label} differs from F.cross_entropy's",
                 atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- exercise 7.3


def _reference_batch(sequences, bos_id: int, eos_id: int, pad_id: int):
    """(decoder input, decoder target, target mask), written with loops on purpose."""
    batch, length = len(sequences), max(len(s) for s in sequences) + 1
    decoder_input = torch.full((batch, length), pad_id, dtype=torch.long)
    decoder_target = torch.full((batch, length), pad_id, dtype=torch.long)
    for b, tokens in enumerate(sequences):
        n = len(tokens)
        decoder_input[b, 0] = bos_id
        decoder_input[b, 1 : n + 1] = tokens
        decoder_target[b, :n] = tokens
        decoder_target[b, n] = eos_id
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(i + 1):
                mask[b, 0, i, j] = bool(decoder_input[b, j] != pad_id)
    return decoder_input, decoder_target, mask


def _padded(rows, pad_id, length):
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def _right_tokens(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 1
    bos_t, eos_t = torch.tensor([bos]), torch.tensor([eos])
    inputs = _padded([torch.cat([bos_t, s]) for s in sequences], pad, length)
    targets = _padded([torch.cat([s, eos_t]) for s in sequences], pad, length)
    return inputs, targets


def _causal(length):
    return torch.ones(length, length, dtype=torch.bool).tril()


def _real(x, pad):
    return (x != pad)[:, None, None, :]  # (B, 1, 1, L): the real keys


def _right_mask(x, pad):
    return _causal(x.size(1)) & _real(x, pad)


def _batch(build_tokens=_right_tokens, build_mask=_right_mask):
    """make_decoder_batch from a token recipe and a mask recipe (the defaults are right)."""

    def make_decoder_batch(sequences, bos_id, eos_id, pad_id):
        decoder_input, decoder_target = build_tokens(sequences, bos_id, eos_id, pad_id)
        return decoder_input, decoder_target, build_mask(decoder_input, pad_id)

    return make_decoder_batch


def _query_axis(x, pad):
    return _causal(x.size(1)) & (x != pad)[:, None, :, None]


_OR = "the masks are combined with | (OR): a key must pass both, so use & (AND)."
_MASKS = [  # compared with the mask, the third result
    Mistake("the target mask is the exact opposite of the expected one: the polarity is "
            "inverted. True means 'may attend'.", _batch(build_mask=lambda x, pad: ~_right_mask(x, pad))),
    Mistake("the target mask lets position i attend to later positions: the causal mask is "
            "missing, so in training the decoder peeks at the very token it has to predict (the "
            "next input is the current target) and learns to copy it.",
            _batch(build_mask=lambda x, pad: _real(x, pad).expand(-1, 1, x.size(1), -1))),
    Mistake("the target mask lets every position attend to padding keys: the padding mask is "
            "missing; combine it with the causal mask using &.",
            _batch(build_mask=lambda x, pad: _causal(x.size(1)).expand(x.size(0), 1, -1, -1))),
    Mistake("the padding part of the target mask is inverted: it is True at padding keys. True "
            "means 'may attend', so real tokens are True (tokens != pad_id).",
            _batch(build_mask=lambda x, pad: _causal(x.size(1)) & ~_real(x, pad))),
    *[Mistake("your padding mask is on the query axis (or on both): padding hides keys, the last "
              "axis, so (tokens != pad_id)[:, None, None, :]. Padded query positions may attend "
              "to earlier tokens: their outputs are ignored by the loss.", _batch(build_mask=mask))
      for mask in (_query_axis, lambda x, pad: _query_axis(x, pad) & _real(x, pad))],
    *[Mistake(_OR, _batch(build_mask=mask), expect=r"\| \(OR\)")
      for mask in (lambda x, pad: _causal(x.size(1)) | _real(x, pad),
                   lambda x, pad: _causal(x.size(1)) | ~_real(x, pad))],
    Mistake("the target mask hides the diagonal: position i may attend to itself (keys j <= i). "
            "Use tril(), not tril(diagonal=-1).", _batch(
                build_mask=lambda x, pad: _right_mask(x, pad) & ~torch.eye(x.size(1), dtype=torch.bool))),
]


def _tokens_then(fix):
    return lambda sequences, bos, eos, pad: fix(*_right_tokens(sequences, bos, eos, pad), bos, eos, pad)


def _with_eos_rows(sequences, bos, eos, pad, extra):
    length = max(len(s) for s in sequences) + 2
    full = _padded([torch.cat([torch.tensor([bos]), s, torch.tensor([eos])]) for s in sequences],
                   pad, length)
    if extra:  # the whole rows, target shifted by one
        return full, torch.cat([full[:, 1:], torch.full((len(sequences), 1), pad)], dim=1)
    return full[:, :-1], full[:, 1:]


def _no_bos(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 1
    full = _padded([torch.cat([s, torch.tensor([eos])]) for s in sequences], pad, length)
    return full[:, :-1], full[:, 1:]


def _first_token(token):
    return _tokens_then(lambda i, t, b, e, p: (torch.cat([torch.full((len(i), 1), token(b, e, p)),
                                                          i[:, 1:]], dim=1), t))


_SHAPES = [  # the student's (input, target) of case c, by their shapes
    Mistake(lambda c: f"the decoder input has shape {tuple(c.input.shape)} and the target "
            f"{tuple(c.target.shape)}; they must have the same shape, (batch, L): position t of "
            "the input is where the model predicts position t of the target.",
            _batch(_tokens_then(lambda i, t, b, e, p: (i, t[:, :-1]))),
            symptom=lambda _, c: c.input.shape != c.target.shape, expect="the same shape"),
    Mistake("the decoder input equals the target, so the model is asked to copy the token it is "
            "reading: no shift. The input is the target shifted right by one, starting with BOS: "
            "input [BOS, y1, ..., yn], target [y1, ..., yn, EOS].",
            _batch(_tokens_then(lambda i, t, b, e, p: (i, i.clone()))),
            symptom=lambda _, c: torch.equal(c.input, c.target)),
    Mistake(lambda c: f"your tensors have {c.length - 1} positions, expected {c.length}: is BOS "
            "missing from the input (then the model never learns to predict the first token from "
            "BOS alone), or EOS from the target? Input [BOS, y1, ..., yn], target [y1, ..., yn, "
            "EOS], padded to the longest n + 1.", _batch(_no_bos),
            symptom=lambda _, c: c.input.shape == (c.batch, c.length - 1), expect="is BOS missing"),
    Mistake(lambda c: f"your tensors have {c.length + 1} positions, expected {c.length}: the input "
            "is [BOS, y1, ..., yn] (it never contains EOS: nothing is predicted after EOS) and the "
            "target [y1, ..., yn, EOS].", _batch(lambda *a: _with_eos_rows(*a, extra=True)),
            symptom=lambda _, c: c.input.shape == (c.batch, c.length + 1),
            expect="never contains EOS"),
]
_TOKENS = [  # the same shapes and dtype, other tokens
    Mistake("input and target are swapped: the decoder reads [BOS, y1, ..., yn] and predicts "
            "[y1, ..., yn, EOS].", _batch(_tokens_then(lambda i, t, b, e, p: (t, i))),
            symptom=lambda _, c: torch.equal(c.input, c.right_target)
            and torch.equal(c.target, c.right_input)),
    Mistake(lambda c: f"your rows are padded with 0, but pad_id={c.pad}: pad with the pad_id "
            "argument (torch.full(..., pad_id)).", _batch(lambda s, b, e, p: _right_tokens(s, b, e, 0)),
            when=lambda c: c.pad != 0, symptom=lambda _, c: any(
                torch.equal(mine, zero) for mine, zero in zip(
                    (c.input, c.target), _reference_batch(c.sequences, c.bos, c.eos, 0))),
            expect="padded with 0, but pad_id=1"),
    Mistake(lambda c: f"the decoder input does not start with BOS ({c.bos}) in every row: the "
            "first prediction is made from BOS alone.", _batch(_first_token(lambda b, e, p: e)),
            symptom=lambda _, c: (c.input[:, 0] != c.bos).any(), expect="does not start with BOS"),
]
_TARGET = [  # the target differs
    Mistake("the target starts with BOS: it must be the input shifted left by one, [y1, ..., yn, "
            "EOS]; the model never has to predict BOS.", _batch(_tokens_then(
                lambda i, t, b, e, p: (i, torch.cat([torch.full((len(i), 1), b), t[:, :-1]], 1)))),
            symptom=lambda _, c: (c.target[:, 0] == c.bos).all()),
    Mistake("a row of the target has no EOS: append EOS after y1 ... yn, so that the model learns "
            "when to stop.", _batch(lambda s, b, e, p: (
                _right_tokens(s, b, e, p)[0], _padded(list(s), p, max(len(r) for r in s) + 1))),
            symptom=lambda _, c: not (c.target == c.eos).any(dim=1).all()),
    Mistake(lambda c: f"the target is padded with -100; pad it with pad_id ({c.pad}), the "
            "ignore_index the chapter's loss uses.",
            _batch(_tokens_then(lambda i, t, b, e, p: (i, t.masked_fill(i == p, -100)))),
            symptom=lambda _, c: (c.target == -100).any(), expect="padded with -100"),
]
_INPUT = [  # the input differs
    Mistake("the shortest rows of your input contain EOS: the input is [BOS, y1, ..., yn] and is "
            "padded after yn; EOS belongs to the target only.",
            _batch(lambda *a: _with_eos_rows(*a, extra=False)), symptom=lambda _, c: torch.equal(
                c.input, _with_eos_rows(c.sequences, c.bos, c.eos, c.pad, extra=False)[0])),
]
_BATCH_CAUGHT = [
    Caught(_batch(_tokens_then(lambda i, t, b, e, p: (i.float(), t.float()))), "must be torch.long"),
    Caught(_batch(build_mask=lambda x, pad: _causal(x.size(1)).T & _real(x, pad)), "attend to later ones"),
    Caught(_batch(build_mask=lambda x, pad: _right_mask(x, pad)[:, 0]), "add the head axis"),
    Caught(_batch(build_mask=lambda x, pad: _causal(x.size(1))), "the same for every"),
    Caught(_batch(build_mask=lambda x, pad: _right_mask(x, pad).float()), "must be torch.bool"),
    Caught(lambda *args: _batch()(*args)[:2], "should return a tuple"),
]


def _diagnose_tokens(c) -> None:
    """Name the mistake of the student's tokens ``c.input`` and ``c.target`` (case ``c``)."""
    where = f"{c.where}: "
    name_mistake(c.input, _SHAPES, c, prefix=where)
    expect_shape(c.input, (c.batch, c.length), f"{where}the decoder input")
    if c.input.dtype != torch.long or c.target.dtype != torch.long:
        fail(f"{where}token tensors must be torch.long (token ids index an nn.Embedding); "
             f"yours are {c.input.dtype} and {c.target.dtype}.")
    if torch.equal(c.input, c.right_input) and torch.equal(c.target, c.right_target):
        return
    name_mistake(c.input, _TOKENS, c, prefix=where)
    if not torch.equal(c.target, c.right_target):
        name_mistake(c.input, _TARGET, c, prefix=where, general=f"{where}the decoder target "
                     "differs from [y1, ..., yn, EOS, pad, ...]: "
                     f"{first_difference(c.target, c.right_target)}.")
    name_mistake(c.input, _INPUT, c, prefix=where, general=f"{where}the decoder input differs "
                 f"from [BOS, y1, ..., yn, pad, ...]: {first_difference(c.input, c.right_input)}.")


def _diagnose_mask(mask, decoder_input, expected, pad_id, where, args):
    batch, length = decoder_input.shape
    mask = expect_tensor(mask, f"{where}: the target mask")
    if tuple(mask.shape) == (batch, length, length):
        fail(f"{where}: the target mask has shape {tuple(mask.shape)}: add the head axis, "
             f"({batch}, 1, {length}, {length}), so that it broadcasts over heads.")
    if tuple(mask.shape) != tuple(expected.shape) and tuple(mask.shape) in [
            (length, length), (1, 1, length, length)]:
        fail(f"{where}: the target mask has shape {tuple(mask.shape)}, the same for every "
             f"sequence: it must also hide each sequence's padding, shape ({batch}, 1, "
             f"{length}, {length}).")
    if mask.dtype != torch.bool:
        fail(f"{where}: the target mask has dtype {mask.dtype}; it must be torch.bool, "
             "True = may attend (build it with comparisons and &).")
    expect_shape(mask, expected.shape, f"{where}: the target mask")
    if torch.equal(mask, expected):
        return
    name_mistake(mask, _MASKS, *args, pick=lambda result: result[2], prefix=f"{where}: ")
    causal = _causal(length).expand(expected.shape)
    if (mask & ~causal).any():
        fail(f"{where}: the target mask lets some positions attend to later ones "
             f"({first_difference(mask, expected)}): the decoder peeks at the future.")
    fail(f"{where}: the target mask differs from causal & not-padding: {first_difference(mask, expected)}.")


@exercise("7.3", "The decoder input, target and mask of a batch",
          mistakes={"make_decoder_batch": _SHAPES + _TOKENS + _TARGET + _INPUT + _MASKS
                                            + _BATCH_CAUGHT})
def check_decoder_batch(make_decoder_batch):
    """Compare ``make_decoder_batch(sequences, bos_id, eos_id, pad_id)`` with the reference."""
    expect_callable(make_decoder_batch, "your batch function",
                    "check_decoder_batch(make_decoder_batch)")

    def seqs(*rows):
        return [torch.tensor(row, dtype=torch.long) for row in rows]

    generator = torch.Generator().manual_seed(73)
    random_rows = [torch.randint(4, 20, (int(n),), generator=generator)
                   for n in torch.randint(1, 9, (5,), generator=generator)]
    cases = [
        (seqs([5, 6, 7], [8, 9], [10, 11, 12, 13]), 1, 2, 0),  # three lengths, pad 0
        (seqs([4, 4, 5, 6]), 1, 2, 0),  # batch of one, no padding
        (seqs([7, 8], [9, 10]), 0, 1, 3),  # same lengths; pad id 3, BOS id 0
        (seqs([5, 5, 5], []), 1, 2, 0),  # an empty sequence: input [BOS], target [EOS]
        (random_rows, 2, 3, 1),
    ]
    for sequences, bos_id, eos_id, pad_id in cases:
        where = (f"for sequences {[s.tolist() for s in sequences]} with bos_id={bos_id}, "
                 f"eos_id={eos_id}, pad_id={pad_id}")
        result = call(make_decoder_batch, [s.clone() for s in sequences], bos_id, eos_id,
                      pad_id, what="make_decoder_batch(sequences, bos_id, eos_id, pad_id)")
        if not (isinstance(result, tuple) and len(result) == 3):
            fail("make_decoder_batch should return a tuple (decoder_input, decoder_target, "
                 f"tgt_mask); it returned a {type(result).__name__}"
                 + (f" of length {len(result)}." if isinstance(result, tuple) else "."))
        decoder_input, decoder_target, mask = result
        expected_input, expected_target, expected_mask = _reference_batch(sequences, bos_id,
                                                                          eos_id, pad_id)
        _diagnose_tokens(SimpleNamespace(
            input=expect_tensor(decoder_input, f"{where}: the decoder input"),
            target=expect_tensor(decoder_target, f"{where}: the decoder target"),
            right_input=expected_input, right_target=expected_target, batch=len(sequences),
            length=expected_input.size(1), sequences=sequences, bos=bos_id, eos=eos_id,
            pad=pad_id, where=where))
        _diagnose_mask(mask, expected_input, expected_mask, pad_id, where,
                       ([s.clone() for s in sequences], bos_id, eos_id, pad_id))


# ----------------------------------------------------------------------------- exercise 7.4

_PAD, _BOS, _EOS = 0, 1, 2  # token ids of the check's little models


class _LookupModel(torch.nn.Module):
    """A stand-in for the chapter's Transformer with encode(src) and decode(tgt, memory, src).

    The logits of position t of ``tgt`` depend on the source and on ``tgt[:, :t + 1]`` only
    (as a causal decoder's do), through ``next_logits(source, prefix)``. Every call records
    whether gradients were on and whether the model was in training mode.
    """

    def __init__(self, vocab_size: int, next_logits):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_logits = next_logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that the model has a parameter
        self.grad_enabled_calls = 0
        self.training_calls = 0
        self._cache: dict = {}

    def encode(self, src):
        return F.one_hot(src, 32).float() + self.anchor  # (B, L_src, 32)

    def decode(self, tgt, memory, src=None):
        if torch.is_grad_enabled():
            self.grad_enabled_calls += 1
        if self.training:
            self.training_calls += 1
        if tgt.dim() != 2:
            raise ValueError(f"decode expects tgt of shape (batch, L_tgt), got {tuple(tgt.shape)}")
        batch, length = tgt.shape
        if memory.size(0) not in (1, batch):
            raise ValueError(f"memory has batch {memory.size(0)} but tgt has batch {batch}")
        sources = memory.argmax(dim=-1).expand(batch, -1)  # (B, L_src): the source tokens back
        out = torch.empty(batch, length, self.vocab_size)
        for b in range(batch):
            source = tuple(sources[b].tolist())
            for t in range(length):
                key = (source, tuple(tgt[b, : t + 1].tolist()))
                if key not in self._cache:
                    self._cache[key] = self.next_logits(*key)
                out[b, t] = self._cache[key]
        return out + self.anchor  # (B, L_tgt, V)

    def forward(self, src, tgt):
        return self.decode(tgt, self.encode(src), src)


def _random_next_logits(vocab_size: int, seed: int, scale: float, eos_bias: float):
    """Logits that look random but are a fixed function of (source, prefix)."""

    def next_logits(source, prefix):
        key = zlib.crc32(repr((seed, source, prefix)).encode())
        generator = torch.Generator().manual_seed(key)
        logits = scale * torch.randn(vocab_size, generator=generator)
        logits[_EOS] += eos_bias * len(prefix)  # EOS grows likelier with length
        logits[_PAD] = logits[_BOS] = -30.0  # never predicted
        return logits

    return next_logits


def _table_next_logits(vocab_size: int, table: dict):
    """Log-probabilities from a table {prefix after BOS: {token: probability}}."""

    def next_logits(source, prefix):
        probs = torch.full((vocab_size,), 1e-6)
        for token, p in table.get(prefix[1:], {_EOS: 1.0}).items():
            probs[token] = p
        return (probs / probs.sum()).log()

    return next_logits


# The greedy path is not the most probable one: from BOS, A (0.5) beats B (0.4), but after A
# every continuation is unlikely, while B is almost surely followed by EOS.
_A, _B = 3, 4
_TRAP = {  # greedy: A EOS (0.5 x 0.4 = 0.2); best: B EOS (0.4 x 0.9 = 0.36)
    (): {_A: 0.5, _B: 0.4, _EOS: 0.1},
    (_A,): {_A: 0.3, _B: 0.3, _EOS: 0.4},
    (_B,): {_EOS: 0.9, _A: 0.05, _B: 0.05},
    (_A, _A): {_EOS: 1.0},
    (_A, _B): {_EOS: 1.0},
    (_B, _A): {_EOS: 1.0},
    (_B, _B): {_EOS: 1.0},
}


# The best sequence, A B EOS (0.6 x 0.44 = 0.264), needs two children of the beam A at step 2;
# greedy (and beams that each follow their own best token) end with A A A EOS (0.248).
_TRAP_2 = {
    (): {_A: 0.6, _B: 0.4},
    (_A,): {_A: 0.46, _B: 0.44, _EOS: 0.1},
    (_B,): {_A: 0.5, _B: 0.3, _EOS: 0.2},
    (_A, _A): {_A: 0.9, _EOS: 0.1},
}


# With max_len=3 the best hypothesis, BOS A A (0.57), is unfinished; BOS EOS (0.4) finished.
_TRAP_3 = {(): {_A: 0.6, _EOS: 0.4}, (_A,): {_A: 0.95, _EOS: 0.05}}
# With max_len=3 the best hypothesis, BOS EOS (0.5), finished at the first step.
_TRAP_4 = {(): {_EOS: 0.5, _A: 0.5}, (_A,): {_A: 0.5, _B: 0.5}}


def _teacher_forced(model, src, tokens: list[int]):
    """log p(token | prefix, src) and the raw logit of every token after the first."""
    with torch.no_grad():
        logits = model.decode(torch.tensor([tokens[:-1]]), model.encode(src), src)[0].double()
    log_p = logits.log_softmax(dim=-1)  # (T - 1, V)
    pairs = [(log_p[t, token].item(), logits[t, token].item()) for t, token in enumerate(tokens[1:])]
    return [lp for lp, _ in pairs], [raw for _, raw in pairs]


def _beam_variant(mistake=None, refill=False, early_stop=False, stop_at_k=False, score=None):
    """beam_search with one mistake switched on, or an accepted variant (refill: keep the
    beam full with unfinished extensions; stop_at_k: fairseq's stop; early_stop: stop once
    no live hypothesis can catch up; score: return that wrong score of _SCORES)."""

    def beam_search(model, src, bos_id, eos_id, max_len, beam_size):
        if mistake != "train mode":
            model.eval()
        with torch.enable_grad() if mistake == "gradients" else torch.no_grad():
            memory = model.encode(src)
            live, finished, step = [([bos_id], 0.0)], [], 0
            limit = max_len + 1 if mistake == "max_len + 1" else max_len
            while live and len(live[0][0]) < limit and not (stop_at_k and len(finished) >= beam_size):
                step += 1
                if early_stop and finished and max(s for _, s in finished) >= live[0][1]:
                    break  # no live hypothesis can catch up: scores only go down
                k = len(live)
                tgt = torch.tensor([tokens for tokens, _ in live])
                logits = model.decode(tgt, memory.expand(k, -1, -1), src.expand(k, -1))
                last = (logits[:, 0] if mistake == "first position" else logits[:, -1]).double()
                scores = {"logits": last, "probabilities": last.softmax(-1)}.get(
                    mistake, last.log_softmax(-1))
                base = torch.tensor([0.0 if mistake == "not accumulated" else s for _, s in live],
                                    dtype=torch.float64)
                totals = base[:, None] + scores
                if mistake == "greedy beams" and step > 1:
                    chosen = [(b, int(totals[b].argmax())) for b in range(k)]
                else:
                    order = totals.flatten().argsort(descending=True, stable=True)
                    width = totals.numel() if refill else beam_size
                    chosen = [divmod(int(i), totals.size(1)) for i in order[:width]]
                new_live = []
                for rank, (b, token) in enumerate(chosen):
                    hypothesis = (tgt[b].tolist() + [token], totals[b, token].item())
                    ends = token == eos_id and mistake != "extends finished"
                    if ends and rank < beam_size:
                        finished.append(hypothesis)
                    elif not ends and len(new_live) < beam_size and (refill or rank < beam_size):
                        new_live.append(hypothesis)
                live = new_live
            pool = {"finished only": finished or live, "live only": live or finished}.get(
                mistake, finished + live)
            rank = (lambda h: h[1] / (len(h[0]) - 1)) if mistake == "length normalized" else (lambda h: h[1])
            tokens, total = max(pool, key=rank)
        if score is not None:
            total = _SCORES[score][0](*_teacher_forced(model, src, tokens), tokens)
        shaped = {"2-D": lambda: torch.tensor([tokens]), "no BOS": lambda: torch.tensor(tokens[1:])}
        result = (shaped.get(mistake, lambda: torch.tensor(tokens))(), total)
        return result[0] if mistake == "tokens only" else result

    return beam_search


def _accepted(model, src, max_len: int, beam_size: int) -> list[list[int]]:
    """The tokens of the accepted searches: the plain one, refilled, and fairseq's stop."""
    return [_beam_variant(refill=refill, stop_at_k=stop)(model, src, _BOS, _EOS, max_len,
                                                         beam_size)[0].tolist()
            for refill, stop in [(False, False), (True, False), (True, True)]]


_BEAM = {  # the search mistakes, named by the wrong tokens they return on every case
    "not accumulated": "your search ranks hypotheses by the log-probability of their last token "
    "only: a hypothesis's score is the SUM of the log-probabilities of all its tokens (score of "
    "the parent + log p(new token)).",
    "logits": "your search adds raw logits: turn them into log-probabilities first (log_softmax "
    "over the vocabulary); logits of different prefixes are not comparable.",
    "probabilities": "your search adds probabilities: the probability of a sequence is the "
    "product of its tokens' probabilities, so add their logarithms (log_softmax).",
    "greedy beams": "after the first step each of your beams follows only its own best token: "
    "all extensions of all beams compete for the beam_size places, so a beam may keep two of "
    "its children and another none.",
    "first position": "your search reads the logits of position 0 at every step: the prediction "
    "for the next token is at the last position, logits[:, -1].",
    "length normalized": "your search picks the final hypothesis by its score divided by its "
    "length: this exercise ranks by the total log-probability, without length normalization.",
    "finished only": "your search returns the best finished hypothesis although an unfinished "
    "one, stopped at max_len, has a higher score: return the best hypothesis, finished or not.",
    "live only": "your search returns the best hypothesis still live at the end and forgets "
    "the finished ones it set aside: a finished hypothesis keeps competing to the end.",
}
_BEAM_MISTAKES = [Mistake(message, _beam_variant(name), expect=re_words)
                  for (name, message), re_words in zip(_BEAM.items(), [
                      "last\\s+token only", "adds raw logits", "adds probabilities",
                      "follows only its own best", "logits of position 0",
                      "divided by\\s+its length", "best finished hypothesis",
                      "forgets\\s+the finished ones"])]
_BEAM_CAUGHT = [Caught(_beam_variant(name), expect) for name, expect in [
    ("train mode", "model.eval\\(\\)"), ("gradients", "torch.no_grad\\(\\)"),
    ("extends finished", "goes on after EOS"), ("max_len + 1", "more than max_len"),
    ("2-D", "return one sequence, a\\s+1-D tensor"), ("no BOS", "starts with BOS"),
    ("tokens only", "should return a tuple")]]


def _call_beam(beam_search, model, src, max_len, beam_size, label, hints=()):
    result = call(beam_search, model, src, _BOS, _EOS, max_len, beam_size, what=label, hints=hints)
    if not (isinstance(result, tuple) and len(result) == 2):
        fail(f"{label} should return a tuple (tokens, score); it returned a "
             f"{type(result).__name__}.")
    tokens, score = result
    tokens = expect_tensor(tokens, f"the tokens returned by {label}")
    if tokens.dim() == 2 and tokens.size(0) == 1:
        fail(f"{label} returns tokens of shape {tuple(tokens.shape)}: return one sequence, a "
             "1-D tensor (tokens[0]).")
    if tokens.dim() != 1:
        fail(f"{label} returns tokens of shape {tuple(tokens.shape)}: return a 1-D tensor, "
             "BOS first.")
    if tokens.dtype != torch.long:
        fail(f"{label} returns tokens of dtype {tokens.dtype}: token ids are torch.long.")
    if isinstance(score, torch.Tensor):
        if score.numel() != 1:
            fail(f"{label} returns a score of shape {tuple(score.shape)}: return one number, "
                 "the log-probability of the returned sequence.")
        score = score.item()
    if not isinstance(score, (int, float)):
        fail(f"{label} returns a score of type {type(score).__name__}: return a float.")
    tokens = tokens.tolist()
    if getattr(model, "training_calls", 0):
        fail(f"{label} ran the model in training mode: call model.eval() first (with dropout "
             "on, the search would be random).")
    if getattr(model, "grad_enabled_calls", 0):
        fail(f"{label} ran the model with gradients on: wrap the search in torch.no_grad() "
             "(decoding needs no backward pass, and the graph would keep every step's "
             "activations).")
    if not tokens or tokens[0] != _BOS:
        fail(f"{label} returned {tokens}: the sequence starts with BOS ({_BOS}).")
    if len(tokens) > max_len:
        fail(f"{label} returned {len(tokens)} tokens, more than max_len={max_len}: max_len "
             "counts every token, BOS included.")
    if _EOS in tokens[:-1]:
        fail(f"{label} returned {tokens}, which goes on after EOS ({_EOS}): a hypothesis that "
             "ends with EOS is finished; set it aside instead of extending it.")
    return tokens, float(score)


_SCORES = {  # what a returned score is instead of the sum of log p, from (log p, logits, tokens)
    "no EOS": (lambda lp, raw, tokens: sum(lp[:-1]) if tokens[-1] == _EOS else None,
               "the score you return leaves out log p(EOS): the EOS token is part of the "
               "sequence and its log-probability counts."),
    "probability": (lambda lp, raw, tokens: math.exp(sum(lp)), "you return the probability of "
                    "the sequence; return its log-probability (the sum of the tokens' "
                    "log-probabilities)."),
    "mean": (lambda lp, raw, tokens: sum(lp) / len(lp), "you return the mean log-probability per "
             "token; return the total, the sum of the tokens' log-probabilities."),
    "last": (lambda lp, raw, tokens: lp[-1], "your score is the log-probability of the last token "
             "only: a hypothesis's score is the SUM of the log-probabilities of all its tokens."),
    "logits": (lambda lp, raw, tokens: sum(raw), "your score adds raw logits: turn them into "
               "log-probabilities first (log_softmax over the vocabulary); logits of different "
               "prefixes are not comparable."),
    "probabilities": (lambda lp, raw, tokens: sum(math.exp(v) for v in lp), "your score adds "
                      "probabilities: the probability of a sequence is the product of its "
                      "tokens' probabilities, so add their logarithms."),
}


def _score_is(name):
    def symptom(score, c):
        value = _SCORES[name][0](c.log_p, c.raw, c.tokens)
        return value is not None and math.isclose(score, value, rel_tol=1e-5, abs_tol=1e-6)

    return symptom


_SCORE_MISTAKES = [Mistake(message, _beam_variant(score=name), symptom=_score_is(name))
                   for name, (_, message) in _SCORES.items()]


def _score_mistake(score: float, model, src, tokens: list[int], label: str) -> None:
    """Fail when ``score`` is not the log-probability of ``tokens``, naming the likely slip."""
    log_p, raw = _teacher_forced(model, src, tokens)
    if math.isclose(score, sum(log_p), rel_tol=1e-5, abs_tol=1e-5):
        return
    case = SimpleNamespace(log_p=log_p, raw=raw, tokens=tokens)
    name_mistake(score, _SCORE_MISTAKES, case, prefix=f"{label}: ", general=f"{label}: the score "
                 f"you return, {score:.5f}, is not the log-probability of the tokens you return, "
                 f"{tokens} ({sum(log_p):.5f}): the score is the sum of log p(token | earlier "
                 "tokens, src) over the tokens after BOS, with p the softmax of the model's "
                 "logits over the whole vocabulary.")


def _beam_cases():
    """(label, model, src, max_len, beam_size): two traps, then random little models."""
    cases = []
    for name, table, sizes, max_len in [("trap 1", _TRAP, (1, 2, 3), 6), ("trap 2", _TRAP_2, (2,), 6),
                                        ("trap 3", _TRAP_3, (2,), 3), ("trap 4", _TRAP_4, (2,), 3)]:
        for beam_size in sizes:
            model = _LookupModel(5, _table_next_logits(5, table))
            cases.append((f"beam_search(model, src, bos_id=1, eos_id=2, max_len={max_len}, "
                          f"beam_size={beam_size}) on a hand-built model ({name})", model,
                          torch.tensor([[5, 6, 7]]), max_len, beam_size))
    random = [
        # vocab, seed, scale, eos_bias, max_len, beam_size
        (6, 1, 2.0, 0.8, 6, 1),
        (6, 2, 2.0, 0.8, 6, 2),
        (7, 3, 1.5, 0.5, 7, 3),
        (8, 4, 2.5, 1.0, 6, 4),
        (6, 5, 1.0, -10.0, 5, 3),  # EOS never wins: hypotheses stop at max_len
        (9, 6, 2.0, 0.6, 8, 5),
        (7, 7, 1.0, 0.3, 8, 3),
    ]
    for number, (vocab, seed, scale, eos_bias, max_len, beam_size) in enumerate(random):
        generator = torch.Generator().manual_seed(seed)
        src = torch.randint(3, 20, (1, 4 + number), generator=generator)
        model = _LookupModel(vocab, _random_next_logits(vocab, seed, scale, eos_bias))
        cases.append((f"beam_search(model, src, bos_id=1, eos_id=2, max_len={max_len}, "
                      f"beam_size={beam_size}) on a random model with {vocab} tokens", model,
                      src, max_len, beam_size))
    return cases


@exercise("7.4", "Beam search",
          mistakes={"beam_search": _BEAM_MISTAKES + _SCORE_MISTAKES + _BEAM_CAUGHT})
def check_beam_search(beam_search):
    """Compare ``beam_search(model, src, bos_id, eos_id, max_len, beam_size)`` with a reference.

    The reference keeps the beam_size best extensions at every step and sets aside those
    that end with EOS; keeping the beam full with the next-best unfinished extensions
    (fairseq's and Hugging Face's way), and then stopping once beam_size hypotheses are
    finished (fairseq's rule), are accepted too. A wrong answer is compared with
    what each usual mistake returns on every case; the mistake is named as soon as only
    one of them returns every answer seen so far, right or wrong.
    """
    expect_callable(beam_search, "your beam search function", "check_beam_search(beam_search)")
    suspects = list(_BEAM)
    first_failure = None
    for label, model, src, max_len, beam_size in _beam_cases():
        tokens, score = _call_beam(beam_search, model, src, max_len, beam_size, label)
        reference = _LookupModel(model.vocab_size, model.next_logits)
        expected = _accepted(reference, src, max_len, beam_size)
        # a suspect stays one while it returns what the student returns, right or wrong
        suspects = [name for name in suspects if tokens == _beam_variant(name)(
            reference, src, _BOS, _EOS, max_len, beam_size)[0].tolist()]
        if tokens in expected:
            _score_mistake(score, reference, src, tokens, label)
            continue
        if len(suspects) == 1:
            fail(f"{label}: {_BEAM[suspects[0]]}")
        if beam_size == 1:
            message = (f"{label} returned {tokens}, but greedy decoding gives {expected[0]}: "
                       "with beam_size=1, beam search keeps the single best extension at "
                       "every step, which is greedy decoding.")
        else:
            mine, best = (sum(_teacher_forced(reference, src, t)[0]) for t in (tokens, expected[0]))
            message = (f"{label} returned {tokens} (log-probability {mine:.4f}); beam search "
                       f"returns {expected[0]} (log-probability {best:.4f}).")
        if not suspects:
            _score_mistake(score, reference, src, tokens, label)
            fail(message)
        first_failure = first_failure or message
    if first_failure is not None:
        if suspects:  # several mistakes explain every wrong answer: name the likeliest
            fail(f"{first_failure[:-1]}: {_BEAM[suspects[0]]}")
        fail(first_failure)
    _check_beam_on_transformer(beam_search)


_EXPAND = Hint(RuntimeError, "size", "With k hypotheses in a batch, memory and src need the "
               "batch size k too: memory.expand(k, -1, -1), src.expand(k, -1).")


def _check_beam_on_transformer(beam_search):
    """The same search on the chapter's own (untrained, seeded) Transformer."""
    from ..model import Transformer, greedy_decode

    src = torch.tensor([[3, 4, 5, 6, 7, 0]])  # one padding token at the end
    for beam_size in (1, 3):
        with torch.random.fork_rng():
            torch.manual_seed(72)  # here a beam of 3 finds a far more probable sequence
            model = Transformer(10, 10, d_model=16, num_heads=2, num_encoder_layers=1,
                                num_decoder_layers=1, d_ff=32, dropout=0.1, max_len=32)
        label = (f"beam_search(model, src, bos_id=1, eos_id=2, max_len=7, beam_size={beam_size})"
                 " on the chapter's Transformer (untrained, 10 tokens)")
        tokens, score = _call_beam(beam_search, model, src, 7, beam_size, label, hints=[_EXPAND])
        left_training = model.training
        model.eval()
        with torch.no_grad():
            expected = _accepted(model, src, 7, beam_size)
            if tokens in expected:
                _score_mistake(score, model, src, tokens, label)
                continue
            if left_training:
                fail(f"{label}: the model is in training mode after your search: call "
                     "model.eval() before it (dropout is 0.1 here).")
            if beam_size == 1:
                greedy = greedy_decode(model, src, _BOS, _EOS, 7)[0].tolist()
                fail(f"{label} returned {tokens}, but the chapter's greedy_decode returns "
                     f"{greedy}: with beam_size=1, beam search is greedy decoding.")
            mine, best = (sum(_teacher_forced(model, src, t)[0]) for t in (tokens, expected[0]))
            fail(f"{label} returned {tokens}; beam search returns {expected[0]} (log-"
                 f"probabilities {mine:.4f} and {best:.4f}).")


# ----------------------------------------------------------------------------- exercise 7.5

# vocab, classes, d_model, heads, layers, d_ff, pad_id, lengths of the batch's sequences
_CLASSIFIER_CASES = [
    (11, 3, 8, 2, 2, 16, 0, [5, 2, 4, 1]),  # one sequence of a single token
    (9, 2, 12, 3, 1, 20, 4, [3, 6]),  # pad id 4; d_model not a power of two
    (13, 4, 6, 1, 3, 10, 0, [7, 7, 3]),  # three layers, one head; rows without padding
]


def _classifier_tokens(vocab: int, pad_id: int, lengths, seed: int, extra: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max(lengths) + extra), pad_id, dtype=torch.long)
    real = [t for t in range(vocab) if t != pad_id]
    for row, length in enumerate(lengths):
        picks = torch.randint(0, len(real), (length,), generator=generator)
        tokens[row, :length] = torch.tensor(real)[picks]
    return tokens


def _classifier_parts(model, vocab, classes, d_model, layers, label):
    """The submodules the check reads, each checked for its kind and size."""
    from ..model import EncoderLayer

    names = ["embedding", "positions", "layers", "classifier"]
    missing = [name for name in names if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        fail(f"{label} has no submodule {', '.join(f'`{m}`' for m in missing)}: the check looks "
             "for self.embedding (nn.Embedding), self.positions (PositionalEncoding), "
             "self.layers (nn.ModuleList of EncoderLayer) and self.classifier (nn.Linear).")
    embedding, positions, stack, classifier = (getattr(model, name) for name in names)
    if not isinstance(embedding, nn.Embedding) or tuple(embedding.weight.shape) != (vocab, d_model):
        fail(f"{label}: `embedding` should be nn.Embedding({vocab}, {d_model}) (vocab_size, "
             f"d_model); it is {embedding}.")
    if not isinstance(stack, nn.ModuleList):
        fail(f"{label}: `layers` should be an nn.ModuleList of num_layers={layers} "
             f"EncoderLayers; it is {type(stack).__name__}.")
    if len(stack) != layers:
        fail(f"{label}: `layers` holds {len(stack)} layers; num_layers={layers} were asked for.")
    if not all(isinstance(layer, EncoderLayer) for layer in stack):
        kinds = sorted({type(layer).__name__ for layer in stack})
        fail(f"{label}: `layers` holds {', '.join(kinds)}; use the chapter's EncoderLayer (from "
             "transformer_book.model import EncoderLayer), whose masks say True = may attend.")
    if len({id(layer) for layer in stack}) < layers:
        fail(f"{label}: `layers` holds the same EncoderLayer object several times "
             "([layer] * num_layers repeats one layer, with one set of weights); build a "
             "new EncoderLayer for each place in the list.")
    if not isinstance(classifier, nn.Linear) or (classifier.in_features,
                                                 classifier.out_features) != (d_model, classes):
        fail(f"{label}: `classifier` should be nn.Linear({d_model}, {classes}) (d_model, "
             f"num_classes); it is {classifier}.")
    return embedding, positions, stack, classifier


class _Classifier(nn.Module):
    """EncoderClassifier with one class option per mistake (none: the right classifier)."""

    variant, scale, repeat, torch_layers, positions_attr = None, True, False, False, True
    pass_dropout = pass_max_len = True

    def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                 dropout=0.0, max_len=512, pad_id=0):
        from ..model import EncoderLayer, PositionalEncoding

        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        dropout = dropout if self.pass_dropout else 0.1
        self.embedding = nn.Embedding(vocab_size, d_model)
        if self.positions_attr:
            self.positions = PositionalEncoding(d_model, max_len if self.pass_max_len else 512, dropout)
        if self.torch_layers:
            layers = [nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout, batch_first=True)
                      for _ in range(num_layers)]
        elif self.repeat:
            layers = [EncoderLayer(d_model, num_heads, d_ff, dropout)] * num_layers
        else:
            layers = [EncoderLayer(d_model, num_heads, d_ff, dropout) for _ in range(num_layers)]
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, tokens):
        variant, real = self.variant, tokens != self.pad_id  # (B, L)
        x = self.embedding(tokens) * (math.sqrt(self.d_model) if self.scale else 1.0)
        if variant == "scale after positions":
            x = self.positions(self.embedding(tokens)) * math.sqrt(self.d_model)
        elif variant != "no positions":
            x = self.positions(x)
        mask = {"no mask": None, "inverted mask": ~real[:, None, None, :],
                "mask on queries": real[:, None, :, None]}.get(variant, real[:, None, None, :])
        for layer in self.layers:
            x = layer(x, mask)  # (B, L, d_model)
        weights = real[..., None].to(x.dtype)  # (B, L, 1)
        pooled = {
            "mean over all": lambda: x.mean(1), "sum": lambda: (x * weights).sum(1),
            "first": lambda: x[:, 0], "last": lambda: x[:, -1],
            "max": lambda: x.masked_fill(~real[..., None], float("-inf")).amax(1),
            "mean with max_len": lambda: (x * weights).sum(1) / 512,
        }.get(variant, lambda: (x * weights).sum(1) / weights.sum(1))()  # (B, d_model)
        return self.classifier(pooled)  # (B, num_classes)


def _classifier(variant=None, **options):
    return type("EncoderClassifier", (_Classifier,), {"variant": variant, **options})


_CLASSIFIER = {
    "no mask": "the encoder layers attend to padding: pass the padding mask "
    "(tokens != pad_id)[:, None, None, :] to every layer, layer(x, mask).",
    "inverted mask": "the padding mask is inverted: it is True at padding. In the book True "
    "means 'may attend', so real tokens are True (tokens != pad_id).",
    "mask on queries": "the padding mask is on the query axis, (B, 1, L, 1): padding hides "
    "keys, the last axis, (B, 1, 1, L).",
    "mean over all": "the mean runs over every position, padding included: sum the real "
    "positions only and divide by their number, so that padding does not dilute it.",
    "sum": "you sum over the real positions without dividing by their number: take the mean, "
    "so that long and short sequences are on the same scale.",
    "first": "you classify from the first position only: pool with the mean over all real "
    "positions.",
    "last": "you classify from the last position, which is padding in every padded row: pool "
    "with the mean over the real positions.",
    "max": "you pool with the maximum over positions: the exercise asks for the mean over the "
    "real positions.",
    "no positions": "the positional encoding is not applied: without it the encoder cannot "
    "tell one order of the tokens from another; add self.positions(...) after the embedding.",
    "scale after positions": "the sqrt(d_model) scale multiplies the positional encoding too: "
    "scale the embeddings, then add the positions.",
}
_CLASSIFIER_MISTAKES = [Mistake(message, _classifier(variant)) for variant, message in _CLASSIFIER.items()]
_CLASSIFIER_CAUGHT = [
    Caught(_classifier("mean with max_len"), "differ from classifier"),
    Caught(_classifier(repeat=True), "the same EncoderLayer object"),
    Caught(_classifier(torch_layers=True), "holds TransformerEncoderLayer"),
    Caught(_classifier(positions_attr=False), "no submodule `positions`"),
    Caught(_classifier(pass_dropout=False), "pass dropout to"),
    Caught(_classifier(pass_max_len=False), "max_len=40 was asked for"),
]


def _check_constructor_arguments(EncoderClassifier) -> None:  # noqa: N803
    """Probe: dropout and max_len reach the submodules that use them."""
    args = ("EncoderClassifier(11, 3, d_model=8, num_heads=2, num_layers=2, d_ff=16, "
            "dropout=0.3, max_len=40)")
    with torch.random.fork_rng():
        model = call(EncoderClassifier, 11, 3, d_model=8, num_heads=2, num_layers=2, d_ff=16,
                     dropout=0.3, max_len=40, what=args)
    rates = sorted({m.p for m in model.modules() if isinstance(m, nn.Dropout)})
    if rates != [0.3]:
        fail(f"{args}: its nn.Dropout modules have p = {rates or 'nothing (no dropout at all)'}: "
             "pass dropout to PositionalEncoding and to every EncoderLayer, so that the "
             "classifier trains with the dropout it was given.")
    length = getattr(getattr(model, "positions", None), "max_len", 40)
    if length != 40:
        fail(f"{args}: self.positions holds a table for {length} positions, but max_len=40 was "
             "asked for: pass max_len to PositionalEncoding(d_model, max_len, dropout).")


def _classifier_case(EncoderClassifier, number, case) -> None:  # noqa: N803
    vocab, classes, d_model, heads, layers, d_ff, pad_id, lengths = case
    kwargs = dict(d_model=d_model, num_heads=heads, num_layers=layers, d_ff=d_ff, pad_id=pad_id)
    args = (f"EncoderClassifier({vocab}, {classes}, d_model={d_model}, num_heads={heads}, "
            f"num_layers={layers}, d_ff={d_ff}, pad_id={pad_id})")
    with torch.random.fork_rng():
        torch.manual_seed(70 + number)  # the student's initialization, reproducibly
        model = call(EncoderClassifier, vocab, classes, what=args, **kwargs)
    model.eval()
    _classifier_parts(model, vocab, classes, d_model, layers, args)
    tokens = _classifier_tokens(vocab, pad_id, lengths, seed=number)
    label = f"{args} on a batch of lengths {lengths}"
    with torch.no_grad():
        logits = call(model, tokens.clone(), what=f"{args}(tokens)")
        logits = expect_shape(logits, (len(lengths), classes), f"the logits of {label}")
        run = with_weights_of(model, tokens, build=lambda c: c(vocab, classes, **kwargs))
        right = [run(_classifier(scale=scale)) for scale in (True, False)]
        if any(same(logits, r, atol=1e-5, rtol=1e-4) for r in right):
            return
        if torch.isnan(logits).any():
            fail(f"the logits of {label} contain NaN: does a fully masked row or an "
                 "empty mean (division by zero real tokens) reach them?")
        name_mistake(logits, _CLASSIFIER_MISTAKES, run=run, prefix=f"{label}: ")
        longer = _classifier_tokens(vocab, pad_id, lengths, seed=number, extra=3)
        padded = call(model, longer, what=f"{args}(tokens)")
        if not same(padded, logits, atol=1e-5, rtol=1e-4):
            fail(f"{label}: adding three more padding positions to the batch changes the "
                 "logits: padding must not count, neither in attention (pass the padding "
                 "mask to every layer) nor in the pooling (mean over real tokens only).")
        expect_close(logits, right[0], f"the logits of {label} differ from classifier(masked mean "
                     "of layers(positions(embedding(tokens) * sqrt(d_model)), padding mask))")


@exercise("7.5", "An encoder-only classifier",
          mistakes={"EncoderClassifier": _CLASSIFIER_MISTAKES + _CLASSIFIER_CAUGHT})
def check_encoder_classifier(EncoderClassifier):  # noqa: N803 - the argument is a class
    """Compare the classifier's logits with its own modules' wiring, on padded batches."""
    expect_class(EncoderClassifier, nn.Module, "your classifier class",
                 "check_encoder_classifier(EncoderClassifier)")
    for number, case in enumerate(_CLASSIFIER_CASES):
        _classifier_case(EncoderClassifier, number, case)
    _check_constructor_arguments(EncoderClassifier)
