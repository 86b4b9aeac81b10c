"""The chapter 7 checks name realistic mistakes (what every check must do: test_checks_all.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transformer_book import Transformer, causal_mask, padding_mask
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch07 import (
    check_beam_search,
    check_decoder_batch,
    check_encoder_classifier,
    check_label_smoothed_cross_entropy,
    check_sinusoidal_encoding,
)

# ----------------------------------------------------------------------------- 7.1


def _encoding(
    exponent=lambda two_i, i: two_i,
    start=0,
    order="interleave",
    use_base=True,
    dtype_rule="keep",
    frequencies_dtype=None,
    divide=True,
    odd_check=True,
):
    """A sinusoidal_encoding with one mistake switched on."""

    def sinusoidal_encoding(positions, d_model, base=10000.0):
        if odd_check and d_model % 2:
            raise ValueError("d_model must be even.")
        if dtype_rule == "keep":
            dtype = positions.dtype if positions.is_floating_point() else torch.float32
        else:
            dtype = dtype_rule
        p = positions.to(dtype)[..., None] + start  # (..., 1)
        i = torch.arange(d_model // 2, dtype=frequencies_dtype or dtype)
        scale = (base if use_base else 10000.0) ** (exponent(2 * i, i) / d_model)
        angle = (p / scale if divide else p * scale).to(dtype)  # (..., d/2)
        if order == "interleave":
            return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)
        if order == "swapped":
            return torch.stack([angle.cos(), angle.sin()], dim=-1).flatten(-2)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    return sinusoidal_encoding


def _own_column_index(positions, d_model, base=10000.0):
    """Each column k uses base^(k / d_model): right for the sines, wrong for the cosines."""
    if d_model % 2:
        raise ValueError("d_model must be even.")
    dtype = positions.dtype if positions.is_floating_point() else torch.float32
    k = torch.arange(d_model, dtype=dtype)  # (d_model,)
    angle = positions.to(dtype)[..., None] / base ** (k / d_model)  # (..., d_model)
    return torch.where(k % 2 == 0, angle.sin(), angle.cos())


def _no_odd_check(positions, d_model, base=10000.0):
    # with torch.stack([sin, cos]) an odd d_model silently gives d_model - 1 columns
    return _encoding(odd_check=False)(positions, d_model, base)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (_encoding(order="swapped"), "sin and cos are swapped"),
        (_encoding(order="halves"), "sines in the first half"),
        (_encoding(exponent=lambda two_i, i: i), "the exponent is i / d_model"),
        (_own_column_index, "uses the exponent \\(2i\\+1\\)/d_model"),
        (_encoding(start=1), "positions start at 1"),
        (_encoding(use_base=False), "the base argument is ignored"),
        (_encoding(divide=False), "the angles are p \\* base"),
        (_encoding(dtype_rule=torch.float32), "returns torch.float32 for float64 positions"),
        (_encoding(dtype_rule=torch.float64), "returns torch.float64 for integer positions"),
        (_encoding(frequencies_dtype=torch.float32), "runs in float32"),
        (_no_odd_check, "raise ValueError"),
    ],
)
def test_sinusoidal_encoding_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_sinusoidal_encoding(wrong)


def test_sinusoidal_encoding_names_an_in_place_change():
    right = _encoding()

    def shifts_in_place(positions, d_model, base=10000.0):
        positions -= 0  # harmless, but then:
        positions.add_(0)
        table = right(positions, d_model, base)
        positions.mul_(2)
        return table

    with pytest.raises(CheckFailure, match="changed its input `positions` in place"):
        check_sinusoidal_encoding(shifts_in_place)


# ----------------------------------------------------------------------------- 7.2


def _loss(per_token, reduce="real", ignore_padding=True):
    """A loss from per-token terms (log_p (N, V), target (N,), eps) -> (N,), one mistake on."""

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
        per_row = loss.view(target.shape).sum(-1) / keep.view(target.shape).sum(-1)
        return per_row.mean()

    return label_smoothed_cross_entropy


def _nll(log_p, target):
    return -log_p.gather(-1, target[:, None]).squeeze(-1)


def _right(log_p, target, eps, ignore_index):
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
    keep = flat != ignore_index
    true = torch.full_like(log_p, smoothing / vocab)
    true.scatter_(1, flat.clamp(0, vocab - 1)[:, None], 1 - smoothing + smoothing / vocab)
    per_token = F.kl_div(log_p, true, reduction="none").sum(-1)
    return per_token[keep].mean()


def _log_of_softmax(logits, target, smoothing=0.1, ignore_index=-100):
    log_p = logits.reshape(-1, logits.size(-1)).softmax(-1).log()
    flat = target.reshape(-1)
    keep = flat != ignore_index
    log_p, flat = log_p[keep], flat[keep]
    return ((1 - smoothing) * _nll(log_p, flat) - smoothing * log_p.mean(-1)).mean()


def _softmax_over_dim_1(logits, target, smoothing=0.1, ignore_index=-100):
    log_p = logits.log_softmax(dim=1).reshape(-1, logits.size(-1))
    flat = target.reshape(-1)
    keep = flat != ignore_index
    log_p, flat = log_p[keep], flat[keep]
    return ((1 - smoothing) * _nll(log_p, flat) - smoothing * log_p.mean(-1)).mean()


def _builtin(logits, target, smoothing=0.1, ignore_index=-100):
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        label_smoothing=smoothing,
        ignore_index=ignore_index,
    )


def _module(logits, target, smoothing=0.1, ignore_index=-100):
    loss = torch.nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=smoothing)
    return loss(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _per_token(logits, target, smoothing=0.1, ignore_index=-100):
    log_p = logits.reshape(-1, logits.size(-1)).log_softmax(-1)
    flat = target.reshape(-1)
    return _right(log_p, flat.clamp(0, logits.size(-1) - 1), smoothing, ignore_index)


def _fixed_smoothing(logits, target, smoothing=0.1, ignore_index=-100):
    return _loss(_right)(logits, target, 0.1, ignore_index)


def _float32(logits, target, smoothing=0.1, ignore_index=-100):
    return _loss(_right)(logits.float(), target, smoothing, ignore_index)


def _detached(logits, target, smoothing=0.1, ignore_index=-100):
    return _loss(_right)(logits.detach(), target, smoothing, ignore_index)


LOSS_MISTAKES = {
    "pads in the mean": (_loss(_right, reduce="all"), "padding is counted in the mean"),
    "no smoothing": (_loss(lambda lp, t, e, i: _nll(lp, t)), "plain cross-entropy"),
    "V-1": (_loss(_spread_over_others), "over the\\s+V-1 wrong classes"),
    "no uniform term": (_loss(lambda lp, t, e, i: (1 - e) * _nll(lp, t)), "only the"),
    "target not scaled": (
        _loss(lambda lp, t, e, i: _nll(lp, t) - e * lp.mean(-1)),
        "not scaled by \\(1 - smoothing\\)",
    ),
    "sum over classes": (
        _loss(lambda lp, t, e, i: (1 - e) * _nll(lp, t) - e * lp.sum(-1)),
        "sums\\s+-log p over the classes",
    ),
    "sum reduction": (_loss(_right, reduce="sum"), "the sum over tokens"),
    "KL divergence": (_kl_divergence, "KL divergence"),
    "annotated transformer": (_loss(_annotated_transformer), "no\\s+smoothing mass"),
    "padding not ignored": (
        _loss(_right, reduce="all", ignore_padding=False),
        "padding targets are not ignored|padding is counted",
    ),
    "mean per sequence": (_loss(_right, reduce="rows"), "averaged each sequence"),
    "log of softmax": (_log_of_softmax, "use log_softmax"),
    "softmax over dim 1": (_softmax_over_dim_1, "over dim 1, the length axis"),
    "F.cross_entropy": (_builtin, "calls F.cross_entropy"),
    "nn.CrossEntropyLoss": (_module, "calls F.cross_entropy"),
    "per token": (_per_token, "one loss per token"),
    "smoothing ignored": (_fixed_smoothing, "smoothing argument is ignored"),
    "float32": (_float32, "returns torch.float32 for float64 logits"),
    "detached": (_detached, "carries no gradient"),
}


@pytest.mark.parametrize("wrong, message", LOSS_MISTAKES.values(), ids=LOSS_MISTAKES.keys())
def test_label_smoothing_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_label_smoothed_cross_entropy(wrong)


def test_cross_entropy_is_restored_after_the_check():
    original = F.cross_entropy
    with pytest.raises(CheckFailure):
        check_label_smoothed_cross_entropy(_builtin)
    assert F.cross_entropy is original


# ----------------------------------------------------------------------------- 7.3


def _padded(rows, pad_id, length):
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def _batch(build_tokens, build_mask=None):
    """A make_decoder_batch from a token recipe and a mask recipe."""

    def make_decoder_batch(sequences, bos_id, eos_id, pad_id):
        decoder_input, decoder_target = build_tokens(sequences, bos_id, eos_id, pad_id)
        mask = (build_mask or _right_mask)(decoder_input, pad_id)
        return decoder_input, decoder_target, mask

    return make_decoder_batch


def _right_tokens(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 1
    bos_t, eos_t = torch.tensor([bos]), torch.tensor([eos])
    inputs = _padded([torch.cat([bos_t, s]) for s in sequences], pad, length)
    targets = _padded([torch.cat([s, eos_t]) for s in sequences], pad, length)
    return inputs, targets


def _right_mask(decoder_input, pad):
    return causal_mask(decoder_input.size(1)) & padding_mask(decoder_input, pad)


def _no_shift(sequences, bos, eos, pad):
    inputs, _ = _right_tokens(sequences, bos, eos, pad)
    return inputs, inputs.clone()


def _no_bos(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 1
    full = _padded([torch.cat([s, torch.tensor([eos])]) for s in sequences], pad, length)
    return full[:, :-1], full[:, 1:]


def _eos_in_input(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 2
    full = _padded([torch.cat([torch.tensor([bos]), s, torch.tensor([eos])]) for s in sequences],
                   pad, length)
    return full[:, :-1], full[:, 1:]


def _whole_rows(sequences, bos, eos, pad):
    length = max(len(s) for s in sequences) + 2
    full = _padded([torch.cat([torch.tensor([bos]), s, torch.tensor([eos])]) for s in sequences],
                   pad, length)
    return full, torch.cat([full[:, 1:], torch.full((len(sequences), 1), pad)], dim=1)


def _no_eos(sequences, bos, eos, pad):
    inputs, _ = _right_tokens(sequences, bos, eos, pad)
    return inputs, _padded(list(sequences), pad, inputs.size(1))


def _target_with_bos(sequences, bos, eos, pad):
    inputs, targets = _right_tokens(sequences, bos, eos, pad)
    return inputs, torch.cat([torch.full((len(sequences), 1), bos), targets[:, :-1]], dim=1)


def _swapped(sequences, bos, eos, pad):
    inputs, targets = _right_tokens(sequences, bos, eos, pad)
    return targets, inputs


def _target_minus_100(sequences, bos, eos, pad):
    inputs, targets = _right_tokens(sequences, bos, eos, pad)
    return inputs, targets.masked_fill(inputs == pad, -100)


def _float_tokens(sequences, bos, eos, pad):
    inputs, targets = _right_tokens(sequences, bos, eos, pad)
    return inputs.float(), targets.float()


def _pad_zero(sequences, bos, eos, pad):
    inputs, targets = _right_tokens(sequences, bos, eos, 0)
    return inputs, targets


TOKEN_MISTAKES = {
    "no shift": (_no_shift, "no shift"),
    "no BOS": (_no_bos, "is BOS\\s+missing"),
    "EOS in the input": (_eos_in_input, "contain EOS"),
    "whole rows": (_whole_rows, "never contains EOS"),
    "no EOS": (_no_eos, "has no EOS"),
    "target starts with BOS": (_target_with_bos, "the target starts with BOS"),
    "swapped": (_swapped, "input and target are swapped"),
    "-100 padding": (_target_minus_100, "padded with -100"),
    "float tokens": (_float_tokens, "must be torch.long"),
    "pad id ignored": (_pad_zero, "padded with 0, but pad_id=1"),
}


@pytest.mark.parametrize("tokens, message", TOKEN_MISTAKES.values(), ids=TOKEN_MISTAKES.keys())
def test_decoder_batch_names_the_token_mistake(tokens, message):
    with pytest.raises(CheckFailure, match=message):
        check_decoder_batch(_batch(tokens))


def _causal(length):
    return torch.ones(length, length, dtype=torch.bool).tril()


MASK_MISTAKES = {
    "peeking": (lambda x, pad: padding_mask(x, pad).expand(-1, 1, x.size(1), -1), "peeks"),
    "no padding": (lambda x, pad: _causal(x.size(1)).expand(x.size(0), 1, -1, -1),
                   "padding mask is missing"),
    "inverted": (lambda x, pad: ~_right_mask(x, pad), "polarity is inverted"),
    "inverted padding": (lambda x, pad: _causal(x.size(1)) & (x == pad)[:, None, None, :],
                         "padding part of the target mask is inverted"),
    "query axis": (lambda x, pad: _causal(x.size(1)) & (x != pad)[:, None, :, None],
                   "on the query axis"),
    "or": (lambda x, pad: _causal(x.size(1)) | padding_mask(x, pad), "\\| \\(OR\\)"),
    "no diagonal": (lambda x, pad: _right_mask(x, pad) & ~torch.eye(x.size(1), dtype=torch.bool),
                    "hides the diagonal"),
    "upper triangle": (lambda x, pad: _causal(x.size(1)).T & padding_mask(x, pad),
                       "attend to later ones"),
    "no head axis": (lambda x, pad: _right_mask(x, pad)[:, 0], "add the head axis"),
    "causal only, (L, L)": (lambda x, pad: _causal(x.size(1)), "the same for every"),
    "float": (lambda x, pad: _right_mask(x, pad).float(), "must be torch.bool"),
}


@pytest.mark.parametrize("mask, message", MASK_MISTAKES.values(), ids=MASK_MISTAKES.keys())
def test_decoder_batch_names_the_mask_mistake(mask, message):
    with pytest.raises(CheckFailure, match=message):
        check_decoder_batch(_batch(_right_tokens, mask))


def test_decoder_batch_names_a_missing_tuple():
    def two(sequences, bos_id, eos_id, pad_id):
        return _right_tokens(sequences, bos_id, eos_id, pad_id)

    with pytest.raises(CheckFailure, match="should return a tuple"):
        check_decoder_batch(two)


def test_decoder_batch_accepts_the_right_recipe(capsys):
    check_decoder_batch(_batch(_right_tokens))
    assert "passed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 7.4


def _beam(mistake=None, refill=False, early_stop=False, stop_at_k=False):
    """A beam search with one mistake switched on (or an accepted variant)."""

    def beam_search(model, src, bos_id, eos_id, max_len, beam_size):
        if mistake != "train mode":
            model.eval()
        context = torch.enable_grad() if mistake == "gradients" else torch.no_grad()
        with context:
            memory = model.encode(src)
            live, finished, step = [([bos_id], 0.0)], [], 0
            limit = max_len + 1 if mistake == "max_len + 1" else max_len
            while live and len(live[0][0]) < limit:
                if stop_at_k and len(finished) >= beam_size:
                    break
                step += 1
                if early_stop and finished and max(s for _, s in finished) >= live[0][1]:
                    break  # no live hypothesis can catch up: scores only go down
                k = len(live)
                tgt = torch.tensor([tokens for tokens, _ in live])
                logits = model.decode(tgt, memory.expand(k, -1, -1), src.expand(k, -1))
                last = logits[:, 0] if mistake == "first position" else logits[:, -1]
                if mistake == "logits":
                    scores = last
                elif mistake == "probabilities":
                    scores = last.softmax(-1)
                else:
                    scores = last.log_softmax(-1)
                base = torch.tensor([0.0 if mistake == "not accumulated" else s for _, s in live])
                totals = base[:, None] + scores
                if mistake == "greedy beams" and step > 1:
                    best = totals.argmax(-1)
                    chosen = [(b, int(best[b])) for b in range(k)]
                else:
                    order = totals.flatten().argsort(descending=True)
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
            pool = finished + live
            if mistake == "length normalized":
                tokens, score = max(pool, key=lambda h: h[1] / (len(h[0]) - 1))
            else:
                tokens, score = max(pool, key=lambda h: h[1])
        if mistake == "score without EOS" and tokens[-1] == eos_id:
            with torch.no_grad():
                logits = model.decode(torch.tensor([tokens[:-1]]), memory, src)
            score -= logits[0, -1].log_softmax(-1)[eos_id].item()
        if mistake == "probability":
            score = math.exp(score)
        if mistake == "2-D":
            return torch.tensor([tokens]), score
        if mistake == "no BOS":
            return torch.tensor(tokens[1:]), score
        if mistake == "tokens only":
            return torch.tensor(tokens)
        return torch.tensor(tokens), score

    return beam_search


@pytest.mark.parametrize(
    "variant",
    [_beam(), _beam(refill=True), _beam(early_stop=True), _beam(refill=True, stop_at_k=True)],
    ids=["plain", "refill", "early stop", "fairseq"],
)
def test_beam_search_accepts_the_usual_variants(variant, capsys):
    check_beam_search(variant)
    assert "passed" in capsys.readouterr().out


BEAM_MISTAKES = {
    "not accumulated": "last\\s+token only",
    "logits": "adds raw logits",
    "probabilities": "adds probabilities",
    "greedy beams": "follows only its own best",
    "first position": "logits of position 0",
    "length normalized": "divided by\\s+its length",
    "train mode": "model.eval\\(\\)",
    "gradients": "torch.no_grad\\(\\)",
    "extends finished": "goes on after EOS",
    "max_len + 1": "more than max_len",
    "score without EOS": "leaves out log p\\(EOS\\)",
    "probability": "you return the probability",
    "2-D": "return one sequence, a\\s+1-D tensor",
    "no BOS": "starts with BOS",
    "tokens only": "should return a tuple",
}


@pytest.mark.parametrize("mistake, message", BEAM_MISTAKES.items(), ids=BEAM_MISTAKES.keys())
def test_beam_search_names_the_mistake(mistake, message):
    with pytest.raises(CheckFailure, match=message):
        check_beam_search(_beam(mistake))


# ----------------------------------------------------------------------------- 7.5


def _classifier(variant=None, scale=True, repeat=False, torch_layers=False, no_positions_attr=False):
    """An EncoderClassifier with one mistake switched on."""
    from transformer_book.model import EncoderLayer, PositionalEncoding

    class EncoderClassifier(torch.nn.Module):
        def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                     dropout=0.0, max_len=512, pad_id=0):
            super().__init__()
            self.d_model, self.pad_id = d_model, pad_id
            self.embedding = torch.nn.Embedding(vocab_size, d_model)
            if not no_positions_attr:
                self.positions = PositionalEncoding(d_model, max_len)
            if torch_layers:
                layers = [torch.nn.TransformerEncoderLayer(d_model, num_heads, d_ff, 0.0,
                                                           batch_first=True)
                          for _ in range(num_layers)]
            elif repeat:
                layers = [EncoderLayer(d_model, num_heads, d_ff)] * num_layers
            else:
                layers = [EncoderLayer(d_model, num_heads, d_ff) for _ in range(num_layers)]
            self.layers = torch.nn.ModuleList(layers)
            self.classifier = torch.nn.Linear(d_model, num_classes)

        def forward(self, tokens):
            real = tokens != self.pad_id
            x = self.embedding(tokens) * (math.sqrt(self.d_model) if scale else 1.0)
            if variant == "scale after positions":
                x = self.positions(self.embedding(tokens)) * math.sqrt(self.d_model)
            elif variant != "no positions":
                x = self.positions(x)
            mask = {
                "no mask": None,
                "inverted mask": ~real[:, None, None, :],
                "mask on queries": real[:, None, :, None],
            }.get(variant, real[:, None, None, :])
            for layer in self.layers:
                x = layer(x, mask)
            weights = real[..., None].float()
            if variant == "mean over all":
                pooled = x.mean(1)
            elif variant == "sum":
                pooled = (x * weights).sum(1)
            elif variant == "first":
                pooled = x[:, 0]
            elif variant == "last":
                pooled = x[:, -1]
            elif variant == "max":
                pooled = x.masked_fill(~real[..., None], float("-inf")).amax(1)
            elif variant == "mean with max_len":
                pooled = (x * weights).sum(1) / 512
            else:
                pooled = (x * weights).sum(1) / weights.sum(1)
            return self.classifier(pooled)

    return EncoderClassifier


@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "unscaled"])
def test_encoder_classifier_accepts_both_embedding_scales(scale, capsys):
    check_encoder_classifier(_classifier(scale=scale))
    assert "passed" in capsys.readouterr().out


CLASSIFIER_MISTAKES = {
    "no mask": (_classifier("no mask"), "attend to padding"),
    "inverted mask": (_classifier("inverted mask"), "padding mask is inverted"),
    "mask on queries": (_classifier("mask on queries"), "on the query axis"),
    "mean over all": (_classifier("mean over all"), "padding included"),
    "sum": (_classifier("sum"), "without dividing"),
    "first": (_classifier("first"), "first position only"),
    "last": (_classifier("last"), "from the last position"),
    "max": (_classifier("max"), "maximum over positions"),
    "no positions": (_classifier("no positions"), "positional encoding is not applied"),
    "scale after positions": (_classifier("scale after positions"), "multiplies the positional"),
    "mean with max_len": (_classifier("mean with max_len"), "differ from classifier"),
    "repeated layer": (_classifier(repeat=True), "the same EncoderLayer object"),
    "torch layers": (_classifier(torch_layers=True), "holds TransformerEncoderLayer"),
    "no positions attribute": (_classifier(no_positions_attr=True), "no submodule `positions`"),
}


@pytest.mark.parametrize("wrong, message", CLASSIFIER_MISTAKES.values(),
                         ids=CLASSIFIER_MISTAKES.keys())
def test_encoder_classifier_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailure, match=message):
        check_encoder_classifier(wrong)


def test_beam_search_is_also_run_on_the_chapters_transformer():
    right, greedy = _beam(), _beam()

    def beam_search(model, src, bos_id, eos_id, max_len, beam_size):
        if isinstance(model, Transformer):  # right on the check's lookup models only
            return greedy(model, src, bos_id, eos_id, max_len, 1)
        return right(model, src, bos_id, eos_id, max_len, beam_size)

    with pytest.raises(CheckFailure, match="on the chapter's Transformer .* beam search returns"):
        check_beam_search(beam_search)


def test_cross_entropy_imported_by_name_is_refused_too():
    namespace = {}
    exec(
        "from torch.nn.functional import cross_entropy\n"
        "def label_smoothed_cross_entropy(logits, target, smoothing=0.1, ignore_index=-100):\n"
        "    return cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),\n"
        "                         label_smoothing=smoothing, ignore_index=ignore_index)\n",
        namespace,
    )
    with pytest.raises(CheckFailure, match="calls F.cross_entropy"):
        check_label_smoothed_cross_entropy(namespace["label_smoothed_cross_entropy"])
    assert namespace["cross_entropy"] is F.cross_entropy


def test_encoder_classifier_names_a_wrong_stack():
    from transformer_book.model import Encoder

    right = _classifier()

    class WithEncoder(right):
        def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                     dropout=0.0, max_len=512, pad_id=0):
            super().__init__(vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                             dropout, max_len, pad_id)
            self.layers = Encoder(d_model, num_heads, d_ff, num_layers)

    class OneLayerShort(right):
        def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                     dropout=0.0, max_len=512, pad_id=0):
            super().__init__(vocab_size, num_classes, d_model, num_heads, num_layers - 1, d_ff,
                             dropout, max_len, pad_id)

    with pytest.raises(CheckFailure, match="it is Encoder"):
        check_encoder_classifier(WithEncoder)
    with pytest.raises(CheckFailure, match="holds 1 layers; num_layers=2"):
        check_encoder_classifier(OneLayerShort)
