"""Checks for the exercises of chapter 9, a GPT.

Token ids are lists of ints (exercise 9.1) or tensors of shape ``(batch, L)``; logits
have the vocabulary on the last axis, ``(batch, L, V)``. Every random input comes from
a seeded generator: a check leaves the global random state alone.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from ._core import (
    Caught,
    Mistake,
    call,
    exercise,
    expect_callable,
    expect_close,
    expect_dtype,
    expect_gradient,
    expect_shape,
    expect_tensor,
    fail,
    name_mistake,
    refused,
    same,
)

# PyTorch's own losses, kept before any patching (exercise 9.2 refuses them).
_cross_entropy = F.cross_entropy


def _logits(shape, seed, dtype=torch.float32, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _tokens(shape, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator)


# ----------------------------------------------------------------------------- exercise 9.1


def _merge_variant(ids, pair, new_id, *, step=2, right_to_left=False, keep_last=True,
                   first_only=False, either_order=False):
    """merge_pair with one option per mistake (the defaults give the right answer)."""
    if right_to_left:
        flipped = _merge_variant(list(reversed(ids)), (pair[1], pair[0]), new_id)
        return list(reversed(flipped))
    out, i, merged = [], 0, False
    end = len(ids) if keep_last else len(ids) - 1
    while i < end:
        here = tuple(ids[i : i + 2])
        match = here == tuple(pair) or (either_order and here == (pair[1], pair[0]))
        if i + 1 < len(ids) and match and not (first_only and merged):
            out.append(new_id)
            i += step
            merged = True
        else:
            out.append(ids[i])
            i += 1
    return out


_MERGE = [
    Mistake("after a merge your loop moves on by one token, not two: the pair's second "
            "token is still there (and merged again with the next one). Skip both tokens "
            "of a merged pair (i += 2).", partial(_merge_variant, step=1)),
    Mistake("your merges go from right to left: BPE scans from the left, so in a run "
            "[a, a, a] the pair (a, a) becomes [new, a], not [a, new].",
            partial(_merge_variant, right_to_left=True)),
    Mistake("the last token is lost when it is not part of a merge: a loop over "
            "range(len(ids) - 1) looks at pairs, but every token must be copied.",
            partial(_merge_variant, keep_last=False)),
    Mistake("only the first occurrence of the pair is merged: replace every "
            "(non-overlapping) occurrence, left to right.", partial(_merge_variant, first_only=True)),
    Mistake("you also merge the pair in the other order: (a, b) and (b, a) are different "
            "pairs, compare tuples, not sets.", partial(_merge_variant, either_order=True)),
]


def _chapter_merge() -> list[tuple[object, str]]:
    import transformer_book
    import transformer_book.gpt as gpt

    return [(gpt, "_merge"), (gpt, "BytePairEncoding"), (transformer_book, "BytePairEncoding")]


def _name_list_mistake(result, table, *args):
    """name_mistake for lists: the first mistake whose output equals the student's."""
    for mistake in table:
        if isinstance(mistake, Mistake) and mistake.wrong(*args) == result:
            fail(mistake.says(*args))


@exercise("9.1", "One merge step of byte-pair encoding", mistakes={"merge_pair": _MERGE})
def check_merge_pair(merge_pair):
    """Compare ``merge_pair(ids, pair, new_id)`` with a left-to-right merge."""
    expect_callable(merge_pair, "your merge function", "check_merge_pair(merge_pair)")
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, 3, (60,), generator=generator).tolist()
    cases = [
        ([1, 2, 3, 1, 2], (1, 2), 9),  # two occurrences
        ([5, 5, 5], (5, 5), 9),  # overlapping: left to right, the last 5 stays
        ([5, 5, 5, 5], (5, 5), 7),  # two merges, no overlap left
        ([2, 1, 2, 4], (1, 2), 300),  # the pair in the middle, a lone 4 at the end
        ([2, 1], (1, 2), 9),  # the reversed pair is not the pair
        ([1, 2], (1, 2), 256),  # the whole list
        ([7], (1, 2), 256),  # one token
        ([], (1, 2), 256),  # nothing
        (random_ids, (0, 1), 3),
        (random_ids, (2, 2), 3),
    ]
    for ids, pair, new_id in cases:
        before = list(ids)
        label = f"merge_pair({ids if len(ids) < 10 else 'a list of 60 ids'}, {pair}, {new_id})"
        with refused([merge_pair], _chapter_merge(), "your function calls the chapter's "
                     "BytePairEncoding or its _merge: write the loop yourself."):
            result = call(merge_pair, ids, pair, new_id, what=label)
        if ids != before:
            fail(f"{label} changed its input list in place: build and return a new list.")
        if not isinstance(result, list):
            fail(f"{label} returned a {type(result).__name__}: return a list of ints.")
        expected = _merge_variant(ids, pair, new_id)
        if result != expected:
            _name_list_mistake(result, _MERGE, ids, pair, new_id)
            fail(f"{label} returned {result[:12]}, expected {expected[:12]}: every "
                 "occurrence of the pair, left to right, becomes new_id.")


# ----------------------------------------------------------------------------- exercise 9.2

_LOSS_FUNCTIONS = [(F, "cross_entropy"), (F, "nll_loss"), (torch._C._nn, "cross_entropy_loss"),
                   (torch._C._nn, "nll_loss"), (torch._C._nn, "nll_loss_nd")]
_LOSS_MESSAGE = ("your function calls F.cross_entropy or F.nll_loss (or their nn modules), "
                 "what the check compares with: write the loss from log_softmax and gather.")


def _nats(logits, targets, dim=-1):
    """-log p(target) at each position, from logits (..., V) and targets (...)."""
    log_p = logits.log_softmax(dim=dim)
    return -log_p.gather(-1, targets[..., None]).squeeze(-1)


def _loss_variant(logits, tokens, *, shift="next", reduce="mean", dim=-1, base=math.e):
    """next_token_loss with one option per mistake (the defaults give the right answer)."""
    if shift == "next":
        logits, targets = logits[:, :-1], tokens[:, 1:]
    elif shift == "previous":
        logits, targets = logits[:, 1:], tokens[:, :-1]
    elif shift == "roll":
        targets = tokens.roll(-1, dims=1)
    else:  # no shift: each position "predicts" its own token
        targets = tokens
    nats = _nats(logits, targets, dim=dim) / math.log(base)
    return nats.sum() if reduce == "sum" else nats.mean()


_LOSS = [
    Mistake("your loss predicts each position's own token: the logits at position t are "
            "the prediction of token t + 1, so compare logits[:, :-1] with tokens[:, 1:].",
            partial(_loss_variant, shift="none")),
    Mistake("the shift goes the wrong way: logits[:, 1:] against tokens[:, :-1] asks each "
            "position to predict the token before it; use logits[:, :-1] with tokens[:, 1:].",
            partial(_loss_variant, shift="previous")),
    Mistake("your targets wrap around (tokens.roll(-1)): the last position is asked to "
            "predict the first token. There is no target for the last position: drop it "
            "(logits[:, :-1], tokens[:, 1:]).", partial(_loss_variant, shift="roll")),
    Mistake("your loss is the sum over positions: return the mean over the batch * (L - 1) "
            "predictions.", partial(_loss_variant, reduce="sum")),
    Mistake("the softmax runs over dim 1, the positions: the vocabulary is the last axis "
            "of (batch, L, V), log_softmax(dim=-1).", partial(_loss_variant, dim=1)),
    Mistake("your loss is in bits (log base 2): return it in nats, the natural log, as "
            "F.cross_entropy does.", partial(_loss_variant, base=2.0)),
]
_LOSS_CAUGHT = [
    Caught(lambda logits, tokens: _cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 tokens[:, 1:].flatten()), "calls F.cross_entropy"),
    Caught(lambda logits, tokens: _loss_variant(logits.detach(), tokens), "carries no gradient"),
]


@exercise("9.2", "The next-token loss", mistakes={"next_token_loss": _LOSS + _LOSS_CAUGHT})
def check_next_token_loss(next_token_loss):
    """Compare ``next_token_loss(logits, tokens)`` with F.cross_entropy, shifted."""
    expect_callable(next_token_loss, "your loss function", "check_next_token_loss(next_token_loss)")
    cases = [  # (batch, L, V), dtype, seed
        ((2, 5, 7), torch.float32, 0),
        ((1, 2, 3), torch.float32, 1),  # one prediction only
        ((3, 9, 11), torch.float64, 2),
        ((4, 6, 6), torch.float32, 3),  # L == V: a softmax over the wrong axis still runs
    ]
    for shape, dtype, seed in cases:
        logits = _logits(shape, seed, dtype).requires_grad_()
        tokens = _tokens(shape[:2], shape[2], seed + 10)
        label = f"next_token_loss(logits {shape}, tokens {shape[:2]})"
        with refused([next_token_loss], _LOSS_FUNCTIONS, _LOSS_MESSAGE):
            loss = call(next_token_loss, logits, tokens, what=label)
        loss = expect_tensor(loss, f"the result of {label}")
        expect_shape(loss, (), f"the result of {label}")
        expect_dtype(loss, dtype, f"{label} returns {loss.dtype} for {dtype} logits: keep "
                     "the logits' dtype.")
        expect_gradient(loss, f"{label} carries no gradient: compute it from the logits "
                        "without detach() or torch.no_grad(), or nothing can be trained.")
        expected = _cross_entropy(logits[:, :-1].flatten(0, 1).detach(), tokens[:, 1:].flatten())
        if not same(loss, expected):
            name_mistake(loss, _LOSS, logits.detach(), tokens)
            expect_close(loss, expected, f"{label} differs from the mean cross-entropy of "
                         "tokens[:, 1:] under logits[:, :-1]")


# ----------------------------------------------------------------------------- exercise 9.3


def _top_p_variant(logits, p, *, rule="before", renormalise=True, descending=True, dim=-1):
    """top_p_filter with one option per mistake (the defaults give the right answer)."""
    probs = logits.softmax(dim=dim)
    ranked, order = probs.sort(dim=-1, descending=descending)
    mass = ranked.cumsum(dim=-1)
    keep_ranked = (mass - ranked < p) if rule == "before" else (mass <= p)
    keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True) if renormalise else probs


def _chapter_filter() -> list[tuple[object, str]]:
    import transformer_book.gpt as gpt

    return [(gpt, "filter_probs"), (gpt, "sample")]


_TOP_P = [
    Mistake("your set stops before the token that makes the mass reach p (you keep tokens "
            "whose cumulative mass, themselves included, is at most p): keep a token while "
            "the mass ranked *before* it is below p, so the set's mass reaches p.",
            partial(_top_p_variant, rule="through")),
    Mistake("the kept probabilities are not renormalised: they sum to less than 1; divide "
            "by their sum.", partial(_top_p_variant, renormalise=False)),
    Mistake("you sorted the probabilities in ascending order, so the set is made of the "
            "*least* likely tokens: sort with descending=True.",
            partial(_top_p_variant, descending=False)),
    Mistake("the softmax runs over dim 0: the vocabulary is the last axis, softmax(dim=-1).",
            partial(_top_p_variant, dim=0)),
]
_TOP_P_CAUGHT = [
    Caught(lambda logits, p: _chapter_filter()[0][0].filter_probs(logits, top_p=p),
           "the chapter's filter_probs"),
]


@exercise("9.3", "Top-p (nucleus) filtering", mistakes={"top_p_filter": _TOP_P + _TOP_P_CAUGHT})
def check_top_p_filter(top_p_filter):
    """Compare ``top_p_filter(logits, p)`` with the smallest set of mass >= p."""
    expect_callable(top_p_filter, "your filter function", "check_top_p_filter(top_p_filter)")
    sure = torch.tensor([[4.0, 1.0, 0.5, 0.0, -1.0]])  # the first token alone has p > 0.9
    cases = [
        (_logits((4, 10), 0), 0.9),
        (_logits((2, 3, 7), 1), 0.75),  # any leading shape
        (sure, 0.5),  # a set of one token
        (_logits((3, 12), 2, torch.float64), 0.6),
        (_logits((2, 8), 3, scale=0.3), 0.99),  # nearly flat: almost every token kept
    ]
    for logits, p in cases:
        label = f"top_p_filter(logits {tuple(logits.shape)}, p={p})"
        with refused([top_p_filter], _chapter_filter(), "your function calls the chapter's "
                     "filter_probs or sample: write the filter yourself, with sort and cumsum."):
            probs = call(top_p_filter, logits.clone(), p, what=label)
        probs = expect_shape(probs, logits.shape, f"the result of {label}")
        expect_dtype(probs, logits.dtype, f"{label} returns {probs.dtype} for {logits.dtype} "
                     "logits: keep the logits' dtype.")
        expected = _top_p_variant(logits, p)
        if same(probs, expected):
            continue
        if not torch.isfinite(probs).all():
            fail(f"{label} contains NaN: is the kept set empty? A set that stops before the "
                 "token that makes the mass reach p is empty when the most likely token "
                 "alone has more than p; keep a token while the mass ranked *before* it is "
                 "below p, so the most likely token is always kept.")
        name_mistake(probs, _TOP_P, logits, p)
        expect_close(probs, expected, f"{label} differs from the renormalised smallest set of "
                     "most likely tokens whose probability reaches p")


# ----------------------------------------------------------------------------- exercise 9.4


def _bpb_variant(logits, targets, token_bytes, pad_id, *, base=2.0, per="byte",
                 pads_in_loss=False, pads_in_bytes=False, by_row=False):
    """bits_per_byte with one option per mistake (the defaults give the right answer)."""
    real = targets != pad_id  # (B, L)
    loss = _nats(logits.double(), targets) / math.log(base)  # (B, L)
    loss = loss if pads_in_loss else loss * real
    size = token_bytes[targets] if per == "byte" else torch.ones_like(targets)
    size = (size if pads_in_bytes else size * real).double()
    if by_row:
        return (loss.sum(-1) / size.sum(-1)).mean()
    return loss.sum() / size.sum()


_BPB = [
    Mistake("your result is in nats per byte: divide by ln 2 for bits (log2 p = ln p / ln 2).",
            partial(_bpb_variant, base=math.e)),
    Mistake("you divided by the number of tokens, not of bytes: that is bits per token. "
            "Each target token stands for token_bytes[token] bytes; divide the total bits by "
            "the total of those.", partial(_bpb_variant, per="token")),
    Mistake("the padding positions are scored: leave out every position whose target is "
            "pad_id before adding up the bits.", partial(_bpb_variant, pads_in_loss=True)),
    Mistake("the padding's bytes are counted: the total number of bytes must include the "
            "real targets only (token_bytes[pad_id] is not text).",
            partial(_bpb_variant, pads_in_bytes=True)),
    Mistake("you averaged each sequence's bits per byte, then the sequences: a short "
            "sequence then weighs as much as a long one. Add up all the bits and all the "
            "bytes of the batch, then divide.", partial(_bpb_variant, by_row=True)),
]


@exercise("9.4", "Bits per byte from a padded batch", mistakes={"bits_per_byte": _BPB})
def check_bits_per_byte(bits_per_byte):
    """Compare ``bits_per_byte(logits, targets, token_bytes, pad_id)`` with the formula."""
    expect_callable(bits_per_byte, "your function", "check_bits_per_byte(bits_per_byte)")
    cases = []
    for seed, (batch, length, vocab), pad_id, pads in (
        (0, (2, 6, 10), 0, [0, 3]),  # the second row ends with 3 pads
        (1, (3, 5, 8), 7, [2, 0, 4]),  # padding id at the end of the vocabulary
        (2, (2, 4, 6), 0, [0, 0]),  # no padding at all
    ):
        targets = _tokens((batch, length), vocab, seed + 20)
        targets[targets == pad_id] = (pad_id + 1) % vocab  # pads only where placed
        for row, n in enumerate(pads):
            if n:
                targets[row, -n:] = pad_id
        generator = torch.Generator().manual_seed(seed + 30)
        token_bytes = torch.randint(1, 5, (vocab,), generator=generator)
        token_bytes[pad_id] = 5  # the padding token is a string too ("<pad>")
        cases.append((_logits((batch, length, vocab), seed), targets, token_bytes, pad_id))
    cases.append((cases[0][0].double(), cases[0][1], cases[0][2], 0))  # float64
    for logits, targets, token_bytes, pad_id in cases:
        label = (f"bits_per_byte(logits {tuple(logits.shape)}, targets "
                 f"{tuple(targets.shape)}, token_bytes, pad_id={pad_id})")
        value = call(bits_per_byte, logits.clone(), targets.clone(), token_bytes.clone(),
                     pad_id, what=label)
        value = expect_tensor(value, f"the result of {label}")
        expect_shape(value, (), f"the result of {label}")
        expected = _bpb_variant(logits, targets, token_bytes, pad_id)
        if not same(value, expected):
            name_mistake(value, _BPB, logits, targets, token_bytes, pad_id)
            expect_close(value, expected, f"{label} differs from the total bits of the real "
                         "targets divided by their total bytes")
