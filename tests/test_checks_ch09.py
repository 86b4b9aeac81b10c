"""What the chapter 9 tables cannot express: accepted variants, inputs changed in place, an
empty top-p set, and the refused functions restored afterwards.

Every mistake of the tables in transformer_book/checks/ch09.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformer_book.gpt as gpt
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch09 import (
    _bpb_variant,
    _loss_variant,
    _merge_variant,
    _top_p_variant,
    check_bits_per_byte,
    check_merge_pair,
    check_next_token_loss,
    check_top_p_filter,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_merge_pair(_merge_variant)
    check_next_token_loss(_loss_variant)
    check_top_p_filter(_top_p_variant)
    check_bits_per_byte(_bpb_variant)
    assert capsys.readouterr().out.count("passed") == 4


def test_top_p_accepts_another_way_to_find_the_set(capsys):
    def top_p_filter(logits, p):  # count how many tokens are needed, then keep that many
        probs = logits.softmax(-1)
        ranked, order = probs.sort(-1, descending=True)
        needed = (ranked.cumsum(-1) < p).sum(-1, keepdim=True) + 1  # tokens to reach p
        keep_ranked = torch.arange(probs.size(-1)) < needed
        keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
        kept = probs * keep
        return kept / kept.sum(-1, keepdim=True)

    check_top_p_filter(top_p_filter)
    assert "passed" in capsys.readouterr().out


def test_top_p_names_an_empty_set():
    def top_p_filter(logits, p):  # right, except that one case gets an empty set
        rule = "through" if p == 0.5 else "before"
        return _top_p_variant(logits, p, rule=rule)

    with pytest.raises(CheckFailure, match="contains NaN: is the kept set empty"):
        check_top_p_filter(top_p_filter)


def test_top_p_refuses_the_chapters_filter_and_restores_it():
    original = gpt.filter_probs

    def top_p_filter(logits, p):
        return gpt.filter_probs(logits, top_p=p)

    with pytest.raises(CheckFailure, match="calls the chapter's filter_probs or sample"):
        check_top_p_filter(top_p_filter)
    assert gpt.filter_probs is original


def test_merge_names_an_input_changed_in_place():
    def merge_pair(ids, pair, new_id):
        merged = _merge_variant(ids, pair, new_id)
        ids[:] = merged  # the caller's list changes too
        return merged

    with pytest.raises(CheckFailure, match="changed its input list in place"):
        check_merge_pair(merge_pair)


def test_merge_wants_a_list():
    with pytest.raises(CheckFailure, match="returned a tuple: return a list of ints"):
        check_merge_pair(lambda ids, pair, new_id: tuple(_merge_variant(ids, pair, new_id)))


def test_cross_entropy_is_refused_when_imported_by_name_and_restored():
    namespace = {}
    exec(
        "from torch.nn.functional import cross_entropy\n"
        "def next_token_loss(logits, tokens):\n"
        "    return cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())\n",
        namespace,
    )
    original = F.cross_entropy
    with pytest.raises(CheckFailure, match="calls F.cross_entropy or F.nll_loss"):
        check_next_token_loss(namespace["next_token_loss"])
    assert F.cross_entropy is original and namespace["cross_entropy"] is original


def test_bits_per_byte_accepts_a_float32_result(capsys):
    check_bits_per_byte(lambda *args: _bpb_variant(*args).float())
    assert "passed" in capsys.readouterr().out


def test_merge_refuses_the_chapters_merge_and_restores_it():
    original = gpt._merge

    def merge_pair(ids, pair, new_id):
        return gpt._merge(ids, tuple(pair), new_id)

    with pytest.raises(CheckFailure, match="calls the chapter's BytePairEncoding or its _merge"):
        check_merge_pair(merge_pair)
    assert gpt._merge is original
