"""The self-assessment that ends every chapter, "Check your understanding".

``quiz("05")`` returns an object that Jupyter, Colab and the book's website show as one
self-contained block of HTML with its own CSS and a few lines of inline JavaScript (no
server, nothing fetched): click an option and its explanation appears, marked right or
not quite; the right answer links back to the section of the chapter that demonstrates
it. In a terminal the same object prints as plain text.

The questions are data (``QUIZZES`` below, one tuple per chapter). Most are multiple
choice whose wrong options are mistakes learners really make: those named by the
exercise checks (``transformer_book/checks``) or made by the texts the course was
written from. Each option records where its mistake is named (``mistake``). Questions
with ``code`` ask what a short piece of code prints; ``quiz`` runs that code before
showing anything and refuses to show a quiz whose right option disagrees with it, so
the book build checks every such answer on the machine that builds it.
"""

from __future__ import annotations

import contextlib
import html
import io
import itertools
import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One answer. ``text`` and ``why`` are plain text: `backticks` mark code, *stars*
    emphasis."""

    text: str
    why: str  # one or two sentences, shown after the option is picked
    right: bool = False
    mistake: str = ""  # where this wrong answer is named as a real mistake, if anywhere


@dataclass(frozen=True)
class Question:
    ask: str
    options: tuple[Option, ...]
    section: str  # the title of the chapter's section that demonstrates the answer
    code: str = ""  # for "what does this print?": the options are candidate outputs


def Q(ask, section, *options, code=""):  # short names: the data below reads as a table
    return Question(ask, tuple(options), section, code)


def R(text, why):  # the right option
    return Option(text, why, right=True)


def W(text, why, mistake=""):  # a wrong option
    return Option(text, why, mistake=mistake)


CH01 = (
    Q(
        "What does this print?",
        "The general function",
        W(
            "(2, 7, 3) (2, 7, 6)",
            "That would be one row per key. The weights have one row per query and one "
            "column per key: (batch, Lq, Lk).",
        ),
        R(
            "(2, 3, 7) (2, 3, 6)",
            "Each of the 3 queries gets a distribution over the 7 keys, and its output "
            "is a weighted mean of the 7 values, each 6 wide: (batch, Lq, d_v).",
        ),
        W(
            "(2, 3, 7) (2, 3, 5)",
            "The output is a mix of the values, so its width is the values' d_v = 6, "
            "not the queries' and keys' d_k = 5.",
        ),
        code=(
            "import torch\n"
            "\n"
            "query = torch.randn(2, 3, 5)  # (batch, Lq, d_k)\n"
            "key = torch.randn(2, 7, 5)  # (batch, Lk, d_k)\n"
            "value = torch.randn(2, 7, 6)  # (batch, Lk, d_v)\n"
            "weights = torch.softmax(query @ key.transpose(-2, -1), dim=-1)\n"
            "output = weights @ value\n"
            "print(tuple(weights.shape), tuple(output.shape))"
        ),
    ),
    Q(
        "The scores `Q @ K.transpose(-2, -1)` have shape (..., Lq, Lk). Over which "
        "dimension must the softmax run so that each query gets weights that sum to 1?",
        "The general function",
        W(
            "`dim=-2`",
            "That normalizes each key's column over the queries. The result has the right "
            "shape, so nothing complains, but the rows no longer sum to 1.",
            mistake="checks ch01/ch02: softmax over dim=-2 instead of dim=-1",
        ),
        W(
            "`dim=0`",
            "Dimension 0 is the batch: the weights would be shared out between sequences, "
            "not between the keys of one query.",
        ),
        R(
            "`dim=-1`",
            "The last axis runs over the keys, so each row, one query, becomes a "
            "probability distribution over the keys.",
        ),
    ),
    Q(
        "The scores are divided by a temperature T > 0 before the softmax. What happens "
        "to the weights as T goes to 0, and as T grows large?",
        "From soft to hard: the temperature",
        R(
            "Small T: one-hot on the best key (a hard lookup). Large T: about 1/n for "
            "each of the n keys (the plain mean of the values).",
            "Dividing by a small T stretches the gaps between scores until the largest "
            "takes all the weight; a large T shrinks them until all weights are equal.",
        ),
        W(
            "Small T: equal weights. Large T: one-hot on the best key.",
            "It is the other way round: a small T makes the gaps between scores larger, "
            "which sharpens the softmax.",
        ),
        W(
            "T can change which key gets the largest weight.",
            "Dividing every score by the same positive T keeps their order, so the best "
            "key stays the best; only how sharply it wins changes.",
        ),
    ),
    Q(
        "Cross-attention: 2 target tokens (the queries) read a source sentence of 6 "
        "tokens (the keys and values). The source grows to 12 tokens. What happens to "
        "the output?",
        "Cross-attention: queries from one sequence, keys and values from another",
        W(
            "It gets 12 rows, one per source token.",
            "Attention returns one row per query, not per key: each row is a mix of all "
            "the source values.",
        ),
        R(
            "Its shape does not change: still 2 rows of width d_v. The weights widen "
            "from (2, 6) to (2, 12).",
            "Every query still gets exactly one weighted mean of the values; a longer "
            "source only gives it more values to mix.",
        ),
        W(
            "It raises an error: queries and keys must have the same length.",
            "Only the widths of queries and keys (d_k) must match; Lq and Lk are free, "
            "which is the point of cross-attention.",
        ),
    ),
    Q(
        "Self-attention with no positional information reads \"the cat sat on the mat\" "
        "and then \"the mat sat on the cat\". What happens to the output vector of "
        "\"cat\"?",
        "Self-attention sees a bag of tokens",
        W(
            "The whole output sequence stays the same, row for row: self-attention is "
            "permutation-invariant.",
            "The rows move with the tokens (cat's vector moves to cat's new place), so the "
            "sequence is not invariant; the precise word is equivariant.",
            mistake="chapter 1: texts that call self-attention permutation-invariant",
        ),
        W(
            "It changes, because \"cat\" is now at another position.",
            "Nothing in the computation knows positions: a word among the same other "
            "words, in any order, gets the same weights and the same output.",
        ),
        R(
            "\"cat\" gets exactly the same vector as before, at its new position.",
            "Permuting the input permutes the output the same way (permutation "
            "equivariance): without positions, a sentence is a bag of tokens.",
        ),
    ),
)

CH02 = (
    Q(
        "Query and key entries are independent with mean 0 and variance 1. Without the "
        "1/√d_k scale, what happens to the softmax over the keys as d_k grows?",
        "Without the scale, the softmax saturates",
        W(
            "Nothing: a softmax does not change when its inputs are rescaled.",
            "A softmax ignores a constant *added* to all its inputs, not a factor: "
            "multiplying the scores sharpens it.",
        ),
        R(
            "It becomes nearly one-hot, and the gradient that reaches the scores "
            "vanishes.",
            "Unscaled scores have standard deviation √d_k, so a large d_k drives the "
            "softmax to one key; the Jacobian diag(A) - A Aᵀ is then almost zero.",
        ),
        W(
            "It becomes uniform: the weights approach 1/L_k.",
            "Larger scores make the softmax sharper, not flatter, as a small temperature "
            "does in chapter 1.",
        ),
    ),
    Q(
        "What does this print?",
        "The function",
        R(
            "(2, 4, 5, 3) (2, 4, 5, 7)",
            "Leading dimensions (batch, heads) pass through; the output has one row per "
            "query and the values' width, the weights one row per query and one column "
            "per key.",
        ),
        W(
            "(2, 4, 7, 3) (2, 4, 7, 5)",
            "This counts rows by keys. Attention gives one row per query: L_q = 5.",
        ),
        W(
            "(2, 4, 5, 8) (2, 4, 5, 7)",
            "The output is a weighted mean of the values, so it has the values' width "
            "d_v = 3, not d_k = 8.",
        ),
        code=(
            "import torch\n"
            "from transformer_book import scaled_dot_product_attention\n"
            "\n"
            "query = torch.randn(2, 4, 5, 8)  # (batch, heads, L_q, d_k)\n"
            "key = torch.randn(2, 4, 7, 8)  # (batch, heads, L_k, d_k)\n"
            "value = torch.randn(2, 4, 7, 3)  # (batch, heads, L_k, d_v)\n"
            "output, weights = scaled_dot_product_attention(query, key, value)\n"
            "print(tuple(output.shape), tuple(weights.shape))"
        ),
    ),
    Q(
        "A query whose keys are all masked: every score in its row is set to -inf. "
        "What does this print?",
        "A query with nothing to attend to",
        W(
            "[0.0, 0.0, 0.0]",
            "Zeros need a finite denominator. The softmax subtracts the row's maximum, "
            "here -inf, and -inf - (-inf) is undefined.",
            mistake="checks ch02/ch04: -inf in a row that has no allowed key",
        ),
        W(
            "[0.333, 0.333, 0.333]",
            "Equal *finite* scores give uniform weights; a row of -inf gives no number "
            "at all.",
        ),
        R(
            "[nan, nan, nan]",
            "-inf - (-inf) is NaN, so the whole row is NaN; the NaN then spreads to the "
            "output, to every token that attends to it, and to the loss.",
        ),
        code=(
            "import torch\n"
            "\n"
            'row = torch.full((3,), float("-inf"))  # every key of this query masked\n'
            "weights = torch.softmax(row, dim=-1)\n"
            "print([round(w, 3) for w in weights.tolist()])"
        ),
    ),
    Q(
        "The package's `scaled_dot_product_attention` fills masked scores with the most "
        "negative *finite* float, then applies a second `torch.where` after the softmax. "
        "Why the second one?",
        "A query with nothing to attend to",
        W(
            "It is not needed: the finite fill already gives every row exact zeros.",
            "In a row with some allowed key, yes. But a row that is masked everywhere "
            "holds equal finite scores, and their softmax is uniform, 1/L_k each.",
        ),
        R(
            "For a query with no allowed key, the softmax of equal finite scores is "
            "uniform; the second `where` sets those weights, and so the output, to 0.",
            "Without it, that query would average the values of exactly the keys it was "
            "told to ignore.",
        ),
        W(
            "Using -inf and `nan_to_num` after the softmax would do the same.",
            "That repairs the forward pass only: the backward pass still goes through the "
            "NaN weights, and the gradient of the empty row is NaN.",
        ),
    ),
    Q(
        "You mean to hide key 1 and pass the float mask `torch.tensor([1.0, 0.0, 1.0])` "
        "as `attn_mask` to `F.scaled_dot_product_attention`. What happens?",
        "The function",
        W(
            "Key 1 gets weight 0, since 0 means \"may not attend\".",
            "Only a boolean mask hides keys. A float mask is added to the scores, so a 0 "
            "changes nothing.",
            mistake="checks ch02/ch04: a 0/1 float mask added to the scores",
        ),
        W(
            "Keys 0 and 2 are hidden, since PyTorch reads 1 as \"blocked\".",
            "Reading True as blocked is `nn.MultiheadAttention`'s boolean convention; a "
            "float mask is not read as allowed or blocked at all, it is added.",
        ),
        R(
            "Nothing is hidden: the mask is added to the scores, so keys 0 and 2 merely "
            "get 1 more than key 1.",
            "That is why the book's function accepts only boolean masks (True = may "
            "attend) and raises a TypeError for anything else.",
        ),
    ),
)

CH03 = (
    Q(
        "`x` holds 3 tokens with 4 features; entry [t, f] is 10t + f. It is split into 2 "
        "heads of width 2, with and without the transpose. What does this print?",
        "The reshape-without-transpose bug",
        W(
            "[[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]\n"
            "[[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]",
            "The two shapes agree, but not the contents: `reshape` keeps memory order, "
            "where all of token 0's features come before any of token 1's.",
            mistake="checks ch03: heads reshaped without the transpose",
        ),
        R(
            "[[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]\n"
            "[[0.0, 1.0], [2.0, 3.0], [10.0, 11.0]]",
            "With the transpose, head 0 holds features 0-1 of tokens 0, 1, 2. Without "
            "it, its \"position 1\" holds token 0's features 2-3, and token 2 is missing.",
        ),
        W(
            "[[0.0, 1.0], [2.0, 3.0], [10.0, 11.0]]\n"
            "[[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]",
            "These are swapped: the version with the transpose is the one whose rows are "
            "whole tokens.",
        ),
        code=(
            "import torch\n"
            "\n"
            "x = (10 * torch.arange(3)[:, None] + torch.arange(4)).float()[None]\n"
            "right = x.reshape(1, 3, 2, 2).transpose(1, 2)  # (batch, heads, L, d_head)\n"
            "buggy = x.reshape(1, 2, 3, 2)  # the same shape, no transpose\n"
            "print(right[0, 0].tolist())\n"
            "print(buggy[0, 0].tolist())"
        ),
    ),
    Q(
        "Multi-head attention with d_model = 512 and 8 heads. By what is each head's "
        "score q·k divided?",
        "The module",
        W(
            "√d_model = √512 ≈ 22.6",
            "The scale corrects for the length of the dot products, and a head's query "
            "and key are only d_head = 64 long.",
        ),
        R(
            "√d_head = √64 = 8",
            "Each head runs scaled dot-product attention on its own d_head-wide queries "
            "and keys: chapter 2's d_k is d_head here.",
        ),
        W(
            "d_head = 64",
            "Dividing by d_k instead of √d_k leaves the scores a variance of 1/d_k instead "
            "of 1: too small, so the weights flatten as the heads get wider.",
            mistake="checks ch02: scores divided by d_k instead of sqrt(d_k)",
        ),
    ),
    Q(
        "Replace one head of width d_model by h heads of width d_model/h. What happens "
        "to the parameters and the matrix-product FLOPs?",
        "What more heads cost",
        W(
            "Both grow h times, since each head has its own projections.",
            "The h per-head projections are slices of one d_model × d_model matrix, so "
            "together they hold exactly the parameters of one big head.",
        ),
        W(
            "Both shrink h times, since each head is h times narrower.",
            "Narrower heads, but h of them: the work per head shrinks by h and the number "
            "of heads grows by h.",
        ),
        R(
            "Neither changes (4·d_model² + 4·d_model parameters); only the number of "
            "softmax entries, B·h·L², grows with h.",
            "The counts with `FlopCounterMode` are identical for 1 to 64 heads; the "
            "softmax, elementwise work, is the only term that scales with h.",
        ),
    ),
    Q(
        "With d_model = 12 and 3 heads, head 0's queries are features 0-3 of "
        "`w_q(x)`. Which features of the input `x` can change head 0's weights?",
        "The module",
        R(
            "All 12: `w_q` and `w_k` mix every input feature into every head's queries "
            "and keys.",
            "The chapter changes only the last input feature and head 0's weights "
            "change: only the projected queries, keys and values are cut into slices.",
        ),
        W(
            "Only features 0-3: each head reads its own slice of the input.",
            "The slices are taken after the projections, not before: each head "
            "reads the whole input through its own rows of the projection matrices.",
        ),
        W(
            "None of them: head 0's weights are fixed at initialization.",
            "The weights are computed from the input at every call; only the projection "
            "matrices are parameters.",
        ),
    ),
    Q(
        "You feed a (batch, L, d_model) tensor to `nn.MultiheadAttention(d_model, "
        "num_heads)` built without `batch_first=True`. What happens?",
        "Pitfall: batch_first",
        W(
            "It raises a shape error.",
            "A (batch, L, d_model) tensor is also a valid (L, batch, d_model) one, so "
            "nothing complains.",
        ),
        R(
            "No error: it reads the batch axis as the sequence, so each position attends "
            "across the sequences of the batch.",
            "Changing one sequence then changes the output of another: the chapter "
            "measures it, and with `batch_first=True` the change disappears.",
        ),
        W(
            "It notices the layout and transposes the input itself.",
            "The module cannot tell a batch-first tensor from a sequence-first one of the "
            "same shape.",
            mistake="seeds (002): nn.MultiheadAttention fed (batch, seq, dim) tensors",
        ),
    ),
)

CH04 = (
    Q(
        "What does this print?",
        "Combining masks",
        W(
            "(2, 5, 5) [True, True, True, False, False]",
            "The padding mask keeps its singleton head axis: (2, 1, 1, 5) & (5, 5) "
            "broadcasts to (2, 1, 5, 5), one mask per sequence shared by all heads.",
        ),
        W(
            "(2, 1, 5, 5) [True, True, True, True, True]",
            "That would be `|`: a key allowed by either mask. With `&` a key must be real "
            "and not in the future, and positions 3 and 4 of sequence 0 are padding.",
            mistake="checks ch04: masks combined with | instead of &",
        ),
        R(
            "(2, 1, 5, 5) [True, True, True, False, False]",
            "Query 4 of sequence 0 may read keys 0-4 (causal), of which 3 and 4 are "
            "padding: only the real keys 0, 1, 2 stay allowed.",
        ),
        code=(
            "import torch\n"
            "from transformer_book import causal_mask, padding_mask\n"
            "\n"
            "tokens = torch.tensor([[5, 9, 3, 0, 0], [4, 8, 6, 7, 0]])  # 0 = padding\n"
            "mask = padding_mask(tokens, 0) & causal_mask(5)\n"
            "print(tuple(mask.shape), mask[0, 0, 4].tolist())"
        ),
    ),
    Q(
        "Instead of masking the scores, you compute `torch.softmax(scores, dim=-1) * "
        "mask`. What goes wrong?",
        "Where a mask acts",
        R(
            "The rows no longer sum to 1: the blocked keys already took their share of "
            "the denominator, so every output shrinks.",
            "A mask must act on the scores, before the softmax; then blocked keys get "
            "exactly 0 and the allowed ones share the whole weight.",
        ),
        W(
            "Nothing: the blocked weights end up 0 either way.",
            "They do end up 0, but the allowed weights are the same as without the mask "
            "and no longer sum to 1.",
            mistake="chapter plan and checks: mask applied after the softmax",
        ),
        W(
            "The result is NaN.",
            "Multiplying by a boolean mask gives zeros, not NaN; the problem is the "
            "missing renormalization.",
        ),
    ),
    Q(
        "Why does `padding_mask(tokens, pad_id)` have the shape (batch, 1, 1, L)?",
        "From token ids",
        W(
            "It hides the padding *queries*: the last axis broadcasts over the keys.",
            "The last axis of the scores (batch, heads, Lq, Lk) is the keys: a "
            "(batch, 1, 1, L) mask varies over the keys and hides padding keys.",
        ),
        R(
            "It hides padding *keys* from every query: it varies only over the batch "
            "and the keys, and the two 1s broadcast over the heads and the queries.",
            "Whichever query asks, a padding position must not be read; so the mask is "
            "the same for every head and every query.",
        ),
        W(
            "The 1s are placeholders that must be filled with one mask per head.",
            "Broadcasting repeats the mask over the heads; a separate copy per head "
            "would be the same numbers h times.",
        ),
    ),
    Q(
        "You pass the book's causal mask (True = may attend) unchanged as `attn_mask` "
        "to `nn.MultiheadAttention`. What happens?",
        "PyTorch's two conventions",
        W(
            "It works: every PyTorch function reads a boolean True as \"may attend\".",
            "`F.scaled_dot_product_attention` does; `nn.MultiheadAttention` reads True as "
            "blocked, the opposite.",
        ),
        R(
            "It blocks exactly the pairs that should be allowed: `nn.MultiheadAttention` "
            "reads True as blocked, so pass `~mask`.",
            "The chapter runs it: without the `~` the only pairs left are padding keys "
            "in the future.",
        ),
        W(
            "It raises an error, because it only accepts float masks.",
            "It accepts boolean masks too, silently, with the opposite meaning; float "
            "masks are added to the scores.",
        ),
    ),
    Q(
        "With left padding and a causal mask, the first queries of a short sequence "
        "have no allowed key. With blocked scores set to -inf, what do two attention "
        "layers give?",
        "Rows with nothing to attend to",
        W(
            "Nothing to worry about: those are padding positions, and their outputs are "
            "ignored.",
            "In the next layer the NaN positions are keys, and a weight of 0 times a "
            "NaN value is still NaN.",
        ),
        R(
            "NaN in the empty rows after one layer, and NaN in the whole sequence after "
            "two.",
            "The empty rows' softmax is 0/0; in layer 2 those positions are keys, and even "
            "a weight of 0 times NaN is NaN. The book's attention returns zeros there.",
        ),
        W(
            "Zeros in the empty rows, because blocked keys get weight 0.",
            "Weight 0 needs a finite denominator; a row in which every score is -inf "
            "has none, and gives NaN.",
            mistake="checks ch02/ch04: -inf in a row that has no allowed key",
        ),
    ),
)

CH05 = (
    Q(
        "A sublayer returns one number per token. What does this print?",
        "The sublayer must keep the shape",
        W(
            "(3, 1)\nResidual raised ValueError",
            "The plain sum broadcasts the (3, 1) output across the 4 features, so it has "
            "shape (3, 4), not (3, 1).",
        ),
        R(
            "(3, 4)\nResidual raised ValueError",
            "Broadcasting lets `x + F(x)` run and quietly add one number to all four "
            "features; `Residual` compares the shapes and refuses.",
        ),
        W(
            "(3, 4)\nResidual accepted it",
            "`Residual` checks `out.shape == x.shape` instead of relying on "
            "broadcasting, so it raises a ValueError naming both shapes.",
        ),
        code=(
            "import torch\n"
            "from torch import nn\n"
            "from transformer_book import Residual\n"
            "\n"
            "x = torch.zeros(3, 4)  # 3 tokens, d_model = 4\n"
            "narrowing = nn.Linear(4, 1)  # (3, 4) -> (3, 1)\n"
            "print(tuple((x + narrowing(x)).shape))\n"
            "try:\n"
            "    Residual(narrowing)(x)\n"
            '    print("Residual accepted it")\n'
            "except ValueError:\n"
            '    print("Residual raised ValueError")'
        ),
    ),
    Q(
        "A sublayer's last layer has weight and bias 0, so F(x) = 0 for every x. What "
        "do a residual block y = x + F(x) and a plain block y = F(x) output?",
        "Identity mapping",
        W(
            "Both output zeros.",
            "The residual block still adds its input: x + 0 = x.",
            mistake="checks ch05: the skip connection is missing (output equals F(x))",
        ),
        R(
            "The residual block outputs x exactly; the plain block outputs zeros and "
            "loses its input.",
            "A residual block can switch itself off by driving its sublayer to zero; a "
            "plain block would have to learn the identity.",
        ),
        W(
            "Both output x: a zero layer passes its input on.",
            "A plain block's output is F(x) and nothing else; with zero weights it is 0.",
        ),
    ),
    Q(
        "What is the Jacobian ∂y/∂x of a residual block y = x + F(x)?",
        "The gradient of a residual block",
        W(
            "∂F/∂x: the skip has no parameters, so it adds nothing to the gradient.",
            "The skip has no parameters, but it is a path from x to y: its derivative "
            "is the identity, and it adds I.",
            mistake="checks ch05: skip path detached; the gradient must flow through it",
        ),
        R(
            "I + ∂F/∂x",
            "A gradient arriving at y reaches x unchanged along the skip, plus whatever "
            "flows back through F; autograd's `jacobian` confirms it in the chapter.",
        ),
        W(
            "I: the gradient never goes through F.",
            "Both paths carry gradient; the identity is added to F's Jacobian, it does "
            "not replace it.",
        ),
    ),
    Q(
        "`Residual(sublayer, dropout=p)` in training mode. Where does the dropout act?",
        "The Residual module",
        W(
            "On the sum: Dropout(x + F(x)).",
            "Dropping the sum would also drop parts of x, and the skip path would no "
            "longer carry the input unchanged.",
        ),
        W(
            "On the input, before the sublayer: x + F(Dropout(x)).",
            "The original transformer applies dropout to each sublayer's *output*, "
            "before it is added.",
        ),
        R(
            "On the branch only: x + Dropout(F(x)); with p = 1 the block returns x.",
            "The skip path is never dropped, which the chapter checks with `dropout=1.0`: "
            "the output is exactly the input.",
        ),
    ),
    Q(
        "A stack of n residual blocks, hₗ = hₗ₋₁ + Fₗ(hₗ₋₁), has the Jacobian "
        "∂hₙ/∂h₀ = (I + Jₙ)⋯(I + J₁), where Jₗ is the Jacobian of Fₗ. What does the "
        "same stack without skips give?",
        "The gradient of a residual block",
        R(
            "Jₙ⋯J₁ alone: if each Jₗ shrinks the vectors it is applied to, the "
            "product, and the gradient at the first layers, shrinks geometrically.",
            "Multiplied out, the residual product holds I plus terms through one, two, "
            "... sublayers; the plain stack keeps only the last term.",
        ),
        W(
            "The same product, since the skips carry no parameters.",
            "Each skip contributes an I to its factor; without them there is no path "
            "that crosses no sublayer.",
        ),
        W(
            "(I + Jₙ)⋯(I + J₁) as well: the chain rule adds the identity at every "
            "layer.",
            "The identity comes from the `x +` of the skip, not from the chain rule; a "
            "plain block's Jacobian is Jₗ alone.",
        ),
    ),
)

CH06 = (
    Q(
        "What does this print?",
        "LayerNorm, one equation at a time",
        W(
            "1.25 1.25",
            "`torch.var` does not compute LayerNorm's variance by default: it divides by "
            "d - 1 unless told `correction=0`.",
        ),
        R(
            "1.25 1.6667",
            "The first is the biased variance LayerNorm uses (divide by d = 4); "
            "`torch.var` defaults to the unbiased one (divide by d - 1 = 3).",
        ),
        W(
            "1.6667 1.6667",
            "The mean of the squared deviations divides by d: 5 / 4 = 1.25.",
        ),
        code=(
            "import torch\n"
            "\n"
            "x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one token, d = 4\n"
            "biased = ((x - x.mean()) ** 2).mean().item()\n"
            "print(round(biased, 4), round(x.var().item(), 4))"
        ),
    ),
    Q(
        "Where does LayerNorm's ε go, and what is PyTorch's default?",
        "LayerNorm, one equation at a time",
        W(
            "Inside the square root, with ε = 0.01; the value hardly matters.",
            "ε = 0.01 is not harmless: a token whose features have standard deviation "
            "0.1 comes out with spread about 0.71 instead of 1.",
            mistake="seeds (003): eps = 0.01",
        ),
        R(
            "Inside the square root, (x - μ) / √(σ² + ε), with ε = 10⁻⁵.",
            "It keeps a constant token (σ² = 0) finite, a row of zeros, and is small "
            "next to the variances the layer normally sees.",
        ),
        W(
            "Outside the root, (x - μ) / (σ + ε): the same thing in practice.",
            "For σ around 1 the difference is invisible, but for quiet tokens, σ near "
            "√ε or below, it changes the output completely.",
            mistake="checks ch06: eps outside the square root",
        ),
    ),
    Q(
        "Activations of shape (B, L, d_model). How many pairs of statistics (mean, "
        "variance) does each norm compute?",
        "Which axes each norm reduces over",
        R(
            "LayerNorm: B·L, each from one token's d_model features. BatchNorm (as "
            "`nn.BatchNorm1d` on sequences): d_model, each from B·L numbers.",
            "A LayerNorm group never leaves its token; a BatchNorm group runs through "
            "every position of every sequence in the batch.",
        ),
        W(
            "LayerNorm: d_model, one per feature over the batch. BatchNorm: B·L, one "
            "per token.",
            "These are swapped: LayerNorm normalizes each token on its own, BatchNorm "
            "each feature across the batch.",
            mistake="chapter plan and checks: normalizing over the wrong axis",
        ),
        W(
            "Both: one pair for the whole tensor.",
            "Neither pools everything: LayerNorm keeps one pair per token, BatchNorm "
            "one per feature.",
        ),
    ),
    Q(
        "What does `nn.BatchNorm1d` do in evaluation mode (after `.eval()`)?",
        "3. Training mode and evaluation mode",
        W(
            "The batch size becomes 1 at inference, so it has nothing left to average.",
            "In evaluation mode the batch plays no role at all: a single token gets "
            "exactly the output it gets inside any batch.",
            mistake="seeds (004): BatchNorm's batch size becomes 1 at inference",
        ),
        W(
            "It normalizes with the current batch's mean and variance, as in training.",
            "That is training mode. After `.eval()` it uses the running averages it kept "
            "during training.",
        ),
        R(
            "It normalizes with the running mean and variance kept during training; "
            "the trouble is that they differ from the batch statistics used in training.",
            "Same batch, two modes, two outputs: the train/evaluation mismatch (and "
            "padding absorbed into the running statistics) is the real problem.",
        ),
    ),
    Q(
        "What does the post-LN Add & Norm of the original transformer compute, for a "
        "sublayer output s = Sublayer(x)?",
        "Add & Norm: the residual first, then the norm",
        W(
            "x + LayerNorm(s): the norm acts before the residual is added.",
            "In post-LN the residual is added first and the *sum* is normalized; this "
            "order does not give the next sublayer tokens of mean 0 and variance 1.",
            mistake="seeds (002): layer norm applied before the residual is added",
        ),
        W(
            "LayerNorm(x) alone: LayerNorm already includes the residual connection.",
            "LayerNorm has no residual in it; combining the two is the job of the "
            "Add & Norm block.",
            mistake="seeds (004): LayerNorm incorporates the residual connection",
        ),
        R(
            "LayerNorm(x + Dropout(s))",
            "Add, then normalize the sum: only this order hands on tokens of mean 0 and "
            "variance 1 (with γ = 1, β = 0).",
        ),
    ),
    Q(
        "A sublayer that outputs zeros, in a pre-LN block and in a post-LN Add & Norm. "
        "What does this print?",
        "The pre-LN placement",
        W(
            "True\nTrue",
            "Post-LN normalizes the sum x + 0, so it returns LayerNorm(x), not x.",
        ),
        R(
            "True\nFalse",
            "Pre-LN is x + F(LayerNorm(x)) = x when F outputs zeros; post-LN still "
            "replaces its input by the normalized input.",
        ),
        W(
            "False\nTrue",
            "Swapped: the pre-LN block has no norm on its residual path, so it is the "
            "one that passes x through untouched.",
        ),
        code=(
            "import torch\n"
            "from torch import nn\n"
            "from transformer_book import AddNorm, PreNormResidual\n"
            "\n"
            "\n"
            "class Zero(nn.Module):\n"
            "    def forward(self, h):\n"
            "        return torch.zeros_like(h)\n"
            "\n"
            "\n"
            "x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # one token, d_model = 4\n"
            "print(torch.equal(PreNormResidual(4, Zero())(x), x))\n"
            "print(torch.equal(AddNorm(4)(x, Zero()(x)), x))"
        ),
    ),
)

CH07 = (
    Q(
        "What does this print?",
        "Positions",
        W(
            "[1.0, 0.0, 1.0, 0.0]",
            "This puts the cosines in the even columns. The table has sines at 2i and "
            "cosines at 2i + 1, and sin 0 = 0.",
            mistake="checks ch07: sin and cos swapped in the positional encoding",
        ),
        R(
            "[0.0, 1.0, 0.0, 1.0]",
            "Position 0 gives every angle 0: (sin 0, cos 0, sin 0, cos 0).",
        ),
        W(
            "[0.0, 0.0, 0.0, 0.0]",
            "Position 0 has angle 0, and cos 0 = 1 in every odd column.",
        ),
        code=(
            "from transformer_book import sinusoidal_positions\n"
            "\n"
            "print(sinusoidal_positions(3, 4)[0].tolist())  # position 0, d_model = 4"
        ),
    ),
    Q(
        "The target sentence is y1 … yn. In training, what does the decoder read, and "
        "what must it predict?",
        "The transformer",
        W(
            "It reads [y1, …, yn, EOS] and predicts [BOS, y1, …, yn].",
            "Input and target are swapped: the decoder reads the target shifted right, "
            "starting with BOS, and predicts the next token at each position.",
            mistake="checks ch07: decoder input and target swapped",
        ),
        R(
            "It reads [BOS, y1, …, yn] and predicts [y1, …, yn, EOS]: the same tokens "
            "shifted by one.",
            "Position t predicts target token t from the tokens before it; BOS lets it "
            "predict the first token from nothing but the source.",
        ),
        W(
            "It reads [BOS, y1, …, yn] and predicts the same [BOS, y1, …, yn].",
            "Then every position is asked for the token it is reading; the target must "
            "be the input shifted by one.",
            mistake="chapter plan: decoder peeking at the target it should predict",
        ),
    ),
    Q(
        "The same model is trained with teacher forcing but without the causal mask in "
        "the decoder. What happens?",
        "Teacher forcing needs the causal mask",
        W(
            "Nothing changes: the encoder gives the decoder all it needs.",
            "Without the mask, position t can read the decoder input at t + 1, which is "
            "the answer at t, and it learns to copy it.",
            mistake="checks ch07: causal mask missing, the decoder peeks",
        ),
        R(
            "The training loss falls to near zero, but greedy decoding fails on almost "
            "every sequence.",
            "At inference the next token does not exist yet, so the copying trick has "
            "nothing to copy; a low training loss proves nothing until you decode.",
        ),
        W(
            "Training diverges and the loss stays high.",
            "The loss falls to near zero: the model found the answer in its own input.",
        ),
    ),
    Q(
        "Targets are padded with PAD to the longest sequence of the batch. What does "
        "`ignore_index=PAD` in `F.cross_entropy` change?",
        "Teacher forcing needs the causal mask",
        R(
            "The padded positions leave the average, so the loss is the same however "
            "far the batch is padded.",
            "The chapter pads the same sequences to 4 and to 30: the same loss with "
            "`ignore_index`, a different one without.",
        ),
        W(
            "Nothing: predicting PAD is easy, so it barely moves the loss.",
            "Without it the model is graded, and trained, on predicting padding, and the "
            "loss depends on how much padding the batch happened to have.",
        ),
        W(
            "It removes the PAD tokens from the decoder input.",
            "It only affects the loss; keeping padding out of attention is the "
            "padding mask's job.",
        ),
    ),
    Q(
        "You build the post-LN model of the paper from `nn.Transformer`. What must you "
        "change to get exactly the paper's architecture?",
        "Equal to torch.nn",
        W(
            "Nothing: `nn.Transformer` with `norm_first=False` is the paper's model.",
            "`nn.Transformer` gives both stacks a final LayerNorm even in post-LN, where "
            "the paper has none.",
        ),
        R(
            "Set `encoder.norm` and `decoder.norm` to None: `nn.Transformer` adds a "
            "final LayerNorm to both stacks even in post-LN.",
            "For pre-LN that final norm is needed; for post-LN it normalizes an output "
            "that is already normalized.",
        ),
        W(
            "Add a final LayerNorm to both stacks, which `nn.Transformer` leaves out.",
            "It is the other way round: the final norms are there, in both placements.",
        ),
    ),
)

CH08 = (
    Q(
        "One attention layer is fed 6 positions one at a time through a cache. What "
        "does this print?",
        "The cache, one layer at a time",
        W(
            "(2, 4, 1, 4)",
            "That is one step's keys: the cache keeps every step's, appended after the "
            "ones already there.",
        ),
        W(
            "(2, 24, 1, 4)",
            "That appends along axis 1, the heads. New positions go along the length "
            "axis, axis 2 of (B, h, L, d_head).",
            mistake="chapter plan and checks ch08: a cache appended on the wrong axis",
        ),
        R(
            "(2, 4, 6, 4)",
            "(batch 2, 4 heads, 6 positions, d_head = 16 / 4 = 4): each step's keys are "
            "appended along the length axis.",
        ),
        code=(
            "import torch\n"
            "from transformer_book import MultiHeadAttention\n"
            "\n"
            "attn = MultiHeadAttention(16, 4).eval()  # d_model = 16, 4 heads\n"
            "x = torch.randn(2, 6, 16)  # (B, L, d_model)\n"
            "cache = {}\n"
            "with torch.no_grad():\n"
            "    for t in range(6):\n"
            "        step = x[:, t : t + 1]  # one position\n"
            "        attn(step, step, step, cache=cache)\n"
            'print(tuple(cache["k"].shape))'
        ),
    ),
    Q(
        "A cached decoding step feeds one new query to self-attention over all the "
        "cached keys, with no causal mask. Why is none needed?",
        "The cache, one layer at a time",
        R(
            "The new query is the latest position: every cached key is in its past.",
            "The causal mask only hides keys after the query; a single newest query "
            "has none.",
        ),
        W(
            "It is needed: without it the query would see future tokens.",
            "Future tokens have not been generated yet, so they are not in the cache.",
        ),
        W(
            "Because the cache already holds the masked weights of the earlier steps.",
            "The cache holds keys and values only; the new query's weights over them "
            "are computed afresh at each step.",
        ),
    ),
    Q(
        "What does the cross-attention cache of a decoder layer hold?",
        "The cache, one layer at a time",
        W(
            "Nothing: the memory's keys and values are projected again at every step.",
            "That gives the right output but repeats the same work at every step: the "
            "memory does not change while the decoder generates.",
            mistake="checks ch08: cross-attention recomputes the memory's keys and values",
        ),
        R(
            "The memory's keys and values, projected once on the first step and reused.",
            "The memory is fixed during decoding, so its projections are made once "
            "(the dict is marked `static`), and they count in the cache's size.",
        ),
        W(
            "One more key and value per step, appended like self-attention's.",
            "Cross-attention reads the encoder's memory, which does not grow while the "
            "decoder generates; appending would repeat it.",
        ),
    ),
    Q(
        "Decoding with the cache, `Transformer.decode` receives only the newest token. "
        "Which positional encoding does it add to it?",
        "The cache, one layer at a time",
        W(
            "Position 0's, as for any sequence of length 1.",
            "Then every generated token would look as if it were the first; the model "
            "was trained with each token at its own position.",
        ),
        R(
            "The encoding of its absolute position t, the number of positions already "
            "cached, kept in the cache under \"length\".",
            "The cache also remembers which earlier tokens were padding, so the new "
            "query hides the same keys the recomputing decoder hides.",
        ),
        W(
            "None: positions are only needed when the whole prefix is recomputed.",
            "Attention knows nothing of positions on either path; the token must carry "
            "its position in its input vector.",
        ),
    ),
    Q(
        "How many bytes does a decoding cache hold for N decoder layers, batch B, L "
        "generated tokens, a source of S tokens and float32 numbers?",
        "What the cache costs in memory",
        W(
            "N · B · L · d_model · 4",
            "This forgets the values (keys *and* values are kept) and cross-attention's "
            "keys and values of the S memory positions.",
        ),
        W(
            "N · 2 · B · L² · d_model · 4",
            "Nothing of size L² is kept: each position contributes one key and one "
            "value of d_model numbers.",
        ),
        R(
            "N · 2 · B · (L + S) · d_model · 4",
            "Per layer, keys and values (the 2) for the L generated positions and the S "
            "memory positions; the chapter checks it byte for byte.",
        ),
    ),
    Q(
        "`MultiHeadAttention` is called with `need_weights=False`. What is "
        "`.attention_weights` afterwards?",
        "The fused path",
        W(
            "The weights of this call, as on the default path.",
            "The fused kernel computes the output tile by tile and never holds the "
            "(L_q, L_k) weights as one tensor.",
        ),
        W(
            "Whatever the previous call stored.",
            "A stale map from another call would mislead; the module resets it.",
        ),
        R(
            "None: the fused kernel never materializes the weights, and the module sets "
            "the attribute to None rather than leave an older map there.",
            "Chapter 7's cross-attention heatmaps use the default path, which keeps "
            "the weights.",
        ),
    ),
)

CH09 = (
    Q(
        "A language model's logits have shape (B, L, V) for tokens of shape (B, L). "
        "Which pairs make the next-token loss?",
        "Training on a CPU",
        R(
            "logits[:, :-1] with tokens[:, 1:]",
            "The output at position t predicts token t + 1; the last position has no "
            "target in the window.",
        ),
        W(
            "logits with tokens, position by position",
            "Each position would be asked for its own input token, which the causal mask "
            "lets it see: the loss falls to near 0 and the model learns nothing useful.",
            mistake="chapter plan and checks ch09: a language-model loss without the shift",
        ),
        W(
            "logits[:, 1:] with tokens[:, :-1]",
            "That asks each position for the token before it, the shift the wrong way.",
            mistake="checks ch09: the shift goes the wrong way",
        ),
        W(
            "logits with tokens.roll(-1, dims=1)",
            "The last position would be asked for the first token of the window, a "
            "target it cannot know.",
            mistake="checks ch09: targets that wrap around",
        ),
    ),
    Q(
        "What does this print?",
        "Sampling: temperature, top-k and top-p",
        W(
            "[0.5, 0.0, 0.0, 0.0]",
            "Those are the kept probabilities before renormalising: they must sum to 1.",
            mistake="checks ch09: top-p without renormalising",
        ),
        W(
            "[0.0, 0.0, 0.0, 0.0]",
            "Keeping only tokens whose cumulative mass is at most p would keep nothing "
            "here, but top-p always keeps the most likely token.",
            mistake="checks ch09: a top-p set that stops before the mass reaches p",
        ),
        R(
            "[1.0, 0.0, 0.0, 0.0]",
            "The most likely token alone already has the mass 0.5 >= p, so it is the "
            "whole set, renormalised to 1.",
        ),
        W(
            "[0.5, 0.2, 0.0, 0.0]",
            "The set is the smallest one reaching p; one token already reaches 0.4.",
        ),
        code=(
            "import torch\n"
            "from transformer_book.gpt import filter_probs\n"
            "\n"
            "logits = torch.tensor([0.5, 0.2, 0.2, 0.1]).log()\n"
            "probs = filter_probs(logits, top_p=0.4)\n"
            "print([round(x, 2) for x in probs.tolist()])"
        ),
    ),
    Q(
        "Held-out topics of `pydoc_data.topics` share 64-character windows with the "
        "training topics. Why does that matter?",
        "A clean split: duplicates and leakage",
        R(
            "The model is graded on text it may have memorised, so the validation loss "
            "overstates how well it predicts new text.",
            "The chapter drops near-duplicate pages and keeps pages that share a window on "
            "one side, which brings the shared windows to 0.",
        ),
        W(
            "It does not: a shared sentence is as hard to predict as any other.",
            "A passage seen in training can be recalled rather than predicted, and the "
            "naive split's loss is lower for it.",
        ),
        W(
            "It only matters for the n-gram baselines, which store counts; a neural network "
            "does not memorise.",
            "Networks memorise too; the chapter's model trains for several passes over the "
            "text.",
        ),
    ),
    Q(
        "Why does generation with a sliding window throw the key/value cache away when the "
        "window moves?",
        "Sampling: temperature, top-k and top-p",
        R(
            "The cached keys and values were computed with each token's old position "
            "embedding; after the move every token has a new position.",
            "So the chapter's window jumps by half its length and rebuilds the cache in "
            "one pass (the prefill).",
        ),
        W(
            "Because the cache would otherwise grow without bound.",
            "A window already bounds it; the problem is that its entries become wrong, not "
            "too many.",
        ),
        W(
            "It need not: dropping the oldest key and value from the cache is enough.",
            "That keeps keys made at positions the tokens no longer have, so the outputs "
            "would differ from recomputing the window.",
        ),
    ),
    Q(
        "A model scores 1.8 bits per byte with a byte vocabulary, another 4.2 bits per "
        "token with a BPE vocabulary whose tokens hold 2.5 bytes on average, on the same "
        "text. Which predicts the text better?",
        "Bytes as tokens, and bits per byte",
        R(
            "The BPE model: 4.2 / 2.5 = 1.68 bits per byte.",
            "Per byte, the only unit the two share, it pays fewer bits for the same text.",
        ),
        W(
            "The byte model: 1.8 < 4.2.",
            "Bits per token of different tokenizers are not comparable: divide by the "
            "bytes each token stands for.",
            mistake="checks ch09: bits per token instead of bits per byte",
        ),
        W(
            "Neither: models with different vocabularies cannot be compared.",
            "They can, per byte of text: total bits over total bytes.",
        ),
    ),
)

QUIZZES: dict[str, tuple[Question, ...]] = {
    "01": CH01,
    "02": CH02,
    "03": CH03,
    "04": CH04,
    "05": CH05,
    "06": CH06,
    "07": CH07,
    "08": CH08,
    "09": CH09,
}


def anchor(title: str) -> str:
    """The id Sphinx gives a section with this title (docutils' ``make_id`` rule)."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9]+", "-", text.lower())
    return re.sub(r"^[-0-9]+|-+$", "", text)


def outcome(code: str) -> str:
    """What ``code`` prints when run in a fresh namespace (stripped), or the exception
    it raises, as ``raises ValueError``. Run in a forked RNG, so it moves no seed."""
    import torch

    buffer = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(buffer):
        try:
            exec(compile(code, "<quiz>", "exec"), {"__name__": "__quiz__"})
        except Exception as error:  # the question may be whether it raises
            print(f"raises {type(error).__name__}")
    return buffer.getvalue().strip()


def check_answers(chapter: str) -> None:
    """Run every "what does this print?" question of ``chapter``; raise if the right
    option is not what the code prints."""
    for number, question in enumerate(QUIZZES[chapter], 1):
        if not question.code:
            continue
        printed = outcome(question.code)
        right = next(o.text for o in question.options if o.right)
        if printed != right.strip():
            raise AssertionError(
                f"quiz {chapter}, question {number}: the right option says {right!r} "
                f"but the code prints {printed!r}."
            )


def _inline(text: str) -> str:
    """Plain text to HTML: escaped, `backticks` as <code>, *stars* as <em>."""
    parts = html.escape(text, quote=False).split("`")
    return "".join(
        f"<code>{p}</code>" if i % 2 else re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", p)
        for i, p in enumerate(parts)
    )


_STYLE = """
.tbq{--tbq-ok:var(--pst-color-success,#1a7f37);--tbq-no:var(--pst-color-danger,#c62828);
 --tbq-line:var(--pst-color-border,#c9ced6);--tbq-accent:var(--pst-color-primary,#0a7d91);
 font-family:var(--pst-font-family-base,inherit);color:inherit;
 border:1px solid var(--tbq-line);border-left:4px solid var(--tbq-accent);
 border-radius:.35rem;padding:.6rem 1rem;margin:.5rem 0 1rem;line-height:1.5}
.tbq [hidden]{display:none!important}
html[data-theme=dark] div.cell_output .text_html:has(.tbq){background:none!important;
 padding:0!important;color:inherit!important}
.tbq ol.tbq-list{margin:0;padding-left:1.4rem}
.tbq li.tbq-q{margin:.8rem 0 1rem}
.tbq .tbq-ask{margin:0 0 .4rem;font-weight:600}
.tbq pre.tbq-code{margin:.3rem 0 .5rem;padding:.5rem .7rem;overflow-x:auto;
 border:1px solid var(--tbq-line);border-radius:.3rem;font-size:.85em;
 background:var(--pst-color-surface,rgba(127,127,127,.08))}
.tbq button.tbq-opt{display:flex;gap:.5rem;align-items:baseline;width:100%;
 text-align:left;font:inherit;color:inherit;background:transparent;cursor:pointer;
 border:1px solid var(--tbq-line);border-radius:.3rem;padding:.3rem .6rem;margin:.3rem 0}
.tbq button.tbq-opt:hover,.tbq button.tbq-opt:focus-visible{border-color:var(--tbq-accent)}
.tbq .tbq-letter{font-weight:600;min-width:1.2rem}
.tbq .tbq-out{white-space:pre-wrap;font-family:var(--pst-font-family-monospace,monospace);
 font-size:.9em;background:none;border:none;padding:0;color:inherit}
.tbq button.tbq-right{border-color:var(--tbq-ok);background:rgba(26,127,55,.09)}
.tbq button.tbq-wrong{border-color:var(--tbq-no);background:rgba(198,40,40,.07)}
.tbq .tbq-why{margin:.1rem 0 .5rem 1.8rem;font-size:.95em}
.tbq .tbq-ok{color:var(--tbq-ok);font-weight:600}
.tbq .tbq-no{color:var(--tbq-no);font-weight:600}
.tbq .tbq-score{margin:.2rem 0 0;font-size:.9em;color:var(--pst-color-text-muted,inherit)}
"""

# Inline, self-contained, no external request. Picking an option shows its explanation;
# picking the right one shows every option's. A link to a section that the page does
# not have under that id (Jupyter names headings differently) scrolls to the heading
# with the same text instead.
_SCRIPT = """
(function () {
  var root = document.getElementById("%(id)s");
  if (!root || root.dataset.ready) return;
  root.dataset.ready = "1";
  var score = root.querySelector(".tbq-score");
  var total = root.querySelectorAll("li.tbq-q").length;
  function update() {
    var done = root.querySelectorAll("li.tbq-q[data-done]").length;
    var first = root.querySelectorAll("li.tbq-q[data-first]").length;
    score.textContent = done + " of " + total + " answered, " + first +
      " of them at the first try.";
  }
  function reveal(option) {
    var why = option.nextElementSibling;
    option.classList.add(option.dataset.right ? "tbq-right" : "tbq-wrong");
    option.setAttribute("aria-expanded", "true");
    why.hidden = false;
  }
  root.addEventListener("click", function (event) {
    var link = event.target.closest("a.tbq-see");
    if (link) {
      var id = link.getAttribute("href").slice(1);
      if (document.getElementById(id)) return;
      var want = link.dataset.title;
      var heads = document.querySelectorAll("h1, h2, h3, h4, h5, h6");
      for (var i = 0; i < heads.length; i++) {
        var text = heads[i].textContent.replace(/[\\u00b6#]\\s*$/, "").trim();
        if (text === want) {
          event.preventDefault();
          heads[i].scrollIntoView({behavior: "smooth"});
          return;
        }
      }
      return;
    }
    var option = event.target.closest("button.tbq-opt");
    if (!option || !root.contains(option)) return;
    var item = option.closest("li.tbq-q");
    if (!item.dataset.tried && option.dataset.right) item.dataset.first = "1";
    item.dataset.tried = "1";
    reveal(option);
    if (option.dataset.right) {
      item.dataset.done = "1";
      item.querySelectorAll("button.tbq-opt").forEach(reveal);
    }
    update();
  });
  update();
})();
"""

_ids = itertools.count(1)


class Quiz:
    """A chapter's questions, displayed as HTML (Jupyter, Colab, the site) or text."""

    def __init__(self, chapter: str, questions: tuple[Question, ...]):
        self.chapter = chapter
        self.questions = questions

    def _repr_html_(self) -> str:
        root = f"tbq-ch{self.chapter}-{next(_ids)}"
        items = []
        for number, question in enumerate(self.questions, 1):
            parts = [f'<li class="tbq-q" id="{root}-q{number}">']
            parts.append(f'<p class="tbq-ask">{_inline(question.ask)}</p>')
            if question.code:
                parts.append(
                    f'<pre class="tbq-code"><code>{html.escape(question.code)}</code></pre>'
                )
            parts.append('<div class="tbq-opts">')
            for letter, option in zip("ABCDEF", question.options):
                text = (
                    f'<code class="tbq-out">{html.escape(option.text)}</code>'
                    if question.code
                    else _inline(option.text)
                )
                flag = ' data-right="1"' if option.right else ""
                parts.append(
                    f'<button type="button" class="tbq-opt"{flag} aria-expanded="false">'
                    f'<span class="tbq-letter">{letter}</span><span>{text}</span></button>'
                )
                verdict = (
                    '<span class="tbq-ok">Right.</span>'
                    if option.right
                    else '<span class="tbq-no">Not quite.</span>'
                )
                see = ""
                if option.right:
                    title = question.section
                    see = (
                        f' <a class="tbq-see" href="#{anchor(title)}" '
                        f'data-title="{html.escape(title)}">'
                        f"See \u201c{html.escape(title)}\u201d.</a>"
                    )
                parts.append(
                    f'<div class="tbq-why" hidden>{verdict} {_inline(option.why)}{see}</div>'
                )
            parts.append("</div></li>")
            items.append("".join(parts))
        return (
            f'<div class="tbq" id="{root}" data-chapter="{self.chapter}">'
            f"<style>{_STYLE}</style>"
            f'<ol class="tbq-list">{"".join(items)}</ol>'
            '<p class="tbq-score" aria-live="polite"></p>'
            f"<script>{_SCRIPT % {'id': root}}</script></div>"
        )

    def __repr__(self) -> str:
        lines = [f"Check your understanding, chapter {int(self.chapter)}"]
        for number, question in enumerate(self.questions, 1):
            lines.append(f"\n{number}. {question.ask}")
            if question.code:
                lines += ["", *("    " + line for line in question.code.splitlines())]
            for letter, option in zip("ABCDEF", question.options):
                text = option.text.replace("\n", "\n     ")
                lines.append(f"  {letter}. {text}")
        lines.append(
            "\n(Run this cell in Jupyter or Colab, or read the book's website, to pick "
            "an answer and see why it is right or not.)"
        )
        return "\n".join(lines)


def quiz(chapter) -> Quiz:
    """The "Check your understanding" block of ``chapter`` ("05" or 5), ready to show.

    Runs the chapter's "what does this print?" questions first and raises if an
    answer disagrees with what the code prints.
    """
    key = f"{int(chapter):02d}" if str(chapter).strip().isdigit() else str(chapter)
    if key not in QUIZZES:
        raise ValueError(
            f"there is no quiz for chapter {chapter!r}; the chapters with one are "
            f"{', '.join(QUIZZES)}."
        )
    check_answers(key)
    return Quiz(key, QUIZZES[key])
